"""Where a network can be cut, what each cut costs, and why a requested cut is refused.

A cut is the output of one layer: everything up to it runs on one side, everything after
on the other, and only that tensor crosses. That is possible exactly when the layer

- is called once in the model and returns a single tensor (a shared layer or a
  multi-output layer has no one tensor to send), and
- dominates the output: every input -> output path passes through it. Inside a residual
  or dense block the shortcut carries a second tensor around the layer, so such blocks
  can only be cut between blocks.

Dominance is decided on a topological order of the model's call graph: a layer at
position p is a cut iff no edge jumps from before p to after p. (Every layer of a Keras
functional model lies on some input -> output path, so a jumping edge u -> v extends to
a path input -> u -> v -> output that avoids p, and without one every path must step
onto p.) That makes finding all cuts of an 800-layer network linear.

Costs per cut are per sample: the bytes of the cut tensor at float32, the parameters on
each side (trainable and not, as ``count_params``), and approximate forward FLOPs on
each side, with a multiply-add counted as 2 FLOPs (see ``layer_flops``).
"""

from __future__ import annotations

import difflib
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from shared_schema.layers import (
    DEVICE_ONLY_LAYERS,
    REFUSED_WHY,
    SUPPORTED_ACTIVATIONS,
    SUPPORTED_LAYERS,
)

from ._exceptions import ConverterError, InvalidCut, UnsupportedLayer

__all__ = [
    "DEVICE_ONLY_LAYERS",
    "SUPPORTED_ACTIVATIONS",
    "SUPPORTED_LAYERS",
    "check_supported",
    "find_cuts",
    "server_refusal",
    "validate_cuts",
]

# Tensor ranks a cut may carry: NHWC feature maps, NWC sequences and NC vectors (the
# manifest's layouts).
CUT_RANKS = (2, 3, 4)
FLOAT32_BYTES = 4

# Which layer classes each slice and runtime carries, and why not, is one table:
# shared_schema/layers.json (also read by the TF.js device's tests). SUPPORTED_LAYERS:
# every runtime, every slice (checked once more per layer by server_refusal for B);
# DEVICE_ONLY_LAYERS: A or C only, with the reason B cannot train them (measured: each
# fails or would train a different function in B, every other supported layer verifies
# to ~1e-15 in float64).
_UNSUPPORTED_WHY = REFUSED_WHY


def server_refusal(layer: Any) -> str | None:
    """Why a layer every device runtime carries cannot train in slice B, or None."""
    name = type(layer).__name__
    if name in DEVICE_ONLY_LAYERS:
        return DEVICE_ONLY_LAYERS[name]
    if name == "BatchNormalization":
        try:
            rank = len(layer.input_shape)
        except (AttributeError, RuntimeError):  # shared: several input shapes
            rank = 4
        if rank != 4:
            return (
                f"over a rank-{rank} input tf2onnx exports it as inference arithmetic "
                "(moving statistics folded into constants), so it would not normalise with "
                "batch statistics in training (over NHWC feature maps it trains)"
            )
    if name == "ReLU" and float(getattr(layer, "threshold", 0.0) or 0.0) != 0.0:
        return "a ReLU threshold becomes ONNX ThresholdedRelu, which onnx2torch cannot convert"
    dilated = any(int(d) > 1 for d in getattr(layer, "dilation_rate", ()) or ())
    if dilated and getattr(layer, "padding", None) == "same":
        nodes = getattr(layer, "_inbound_nodes", [])
        before = nodes[0].inbound_layers if len(nodes) == 1 else []
        before = before if isinstance(before, list) else [before]
        if any(type(b).__name__ == "ZeroPadding2D" for b in before):
            return (
                "tf2onnx folds the ZeroPadding2D before it into the dilated convolution and "
                "loses its 'same' padding (the torch output comes out smaller)"
            )
    return None


@dataclass(frozen=True)
class CutPoint:
    """One valid cut: the output of ``layer``, at ``position`` in the layer order.

    ``position`` indexes the topological order of the model's layer calls, the input
    layer being 0 (for a functional model it is the index in ``model.layers``).
    "before" is the slice ending at the cut (the layer included), "after" the rest.
    """

    position: int
    layer: str
    shape: tuple[int, ...]  # without the batch dimension
    bytes_per_sample: int  # at float32
    params_before: int
    params_after: int
    flops_before: int  # per sample, forward, multiply-add = 2
    flops_after: int

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class _Call:
    """One call of a layer in the model (a node of the call graph)."""

    layer: Any
    shape: tuple[int | None, ...] | None  # output shape without batch; None if not one tensor
    parents: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    flops: int = 0


class Analysis:
    """The call graph of a single-input, single-output tf_keras model, in topological order."""

    def __init__(self, model: Any):
        if not getattr(model, "_is_graph_network", False) or not hasattr(model, "_nodes_by_depth"):
            raise ConverterError(
                f"model {getattr(model, 'name', model)!r} is not a functional or Sequential "
                "tf_keras model; only those have a graph spliteasy can cut"
            )
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ConverterError(
                f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
                "outputs; spliteasy splits single-input, single-output models"
            )
        self.model = model
        nodes = [
            n
            for depth in sorted(model._nodes_by_depth, reverse=True)
            for n in model._nodes_by_depth[depth]
        ]
        rank = {id(layer): i for i, layer in enumerate(model.layers)}
        # Stable topological order: by depth from the output (deepest first), ties by the
        # order of model.layers, so positions match model.summary() for functional models.
        order = _toposort(nodes, lambda n: rank.get(id(n.layer), -1))
        index = {id(n): i for i, n in enumerate(order)}
        self.calls: list[_Call] = []
        for n in order:
            self.calls.append(_Call(layer=n.layer, shape=_single_shape(n)))
        for i, n in enumerate(order):
            for p in n.parent_nodes:
                j = index.get(id(p))
                if j is None:
                    continue  # produced outside this model (cannot happen for a built model)
                self.calls[i].parents.append(j)
                self.calls[j].children.append(i)
            self.calls[i].flops = layer_flops(
                n.layer, _shapes(n.input_shapes), _shapes(n.output_shapes)
            )
        self.ncalls: dict[int, int] = {}
        for c in self.calls:
            self.ncalls[id(c.layer)] = self.ncalls.get(id(c.layer), 0) + 1
        self.by_name = {c.layer.name: i for i, c in enumerate(self.calls)}
        self.input = index[id(_producer(model.inputs[0]))]
        self.output = index[id(_producer(model.outputs[0]))]
        self._has_shared = any(n > 1 for n in self.ncalls.values())
        self._check_all_on_paths()
        # Prefix sums: a shared layer's weights count once, at its first call (a cut that
        # would split its calls is refused anyway).
        self._prefix_params, self._prefix_flops = [0], [0]
        counted: set[int] = set()
        for c in self.calls:
            params = 0 if id(c.layer) in counted else c.layer.count_params()
            counted.add(id(c.layer))
            self._prefix_params.append(self._prefix_params[-1] + params)
            self._prefix_flops.append(self._prefix_flops[-1] + c.flops)
        # reach[p]: the furthest position any edge leaving positions < p lands on.
        self._reach = [0] * len(self.calls)
        furthest = -1
        for p, c in enumerate(self.calls):
            self._reach[p] = furthest
            for child in c.children:
                furthest = max(furthest, child)
        self.valid = [self.why_not(p) is None for p in range(len(self.calls))]

    def _check_all_on_paths(self) -> None:
        seen = _bfs(self.calls, self.input, forward=True)
        stray = [c.layer.name for i, c in enumerate(self.calls) if i not in seen]
        if stray:
            raise ConverterError(
                f"layers {stray[:5]} of model {self.model.name!r} do not depend on its input; "
                "spliteasy cannot place them on a side"
            )

    # -- validity -------------------------------------------------------------------------

    def why_not(self, p: int) -> str | None:
        """None if position ``p`` is a valid cut, else why not (one sentence)."""
        c = self.calls[p]
        if p == self.input:
            return "it is the model input: the slice before it would be empty"
        if p == self.output:
            return "it is the model output: the slice after it would be empty"
        if self.ncalls[id(c.layer)] > 1:
            return f"the layer is shared (called {self.ncalls[id(c.layer)]} times), so no one tensor is its output"
        if c.shape is None:
            return "it returns several tensors; a cut carries exactly one"
        if self._reach[p] > p:
            return f"it is inside a branching (residual, dense or inception) block: {self._bypass(p)} bypasses it"
        if any(d is None for d in c.shape):
            return f"its output has an unknown dimension {list(c.shape)}; fix the input size"
        if len(c.shape) + 1 not in CUT_RANKS:
            return (
                f"its output has rank {len(c.shape) + 1}; a cut carries rank 4 (NHWC), "
                "rank 3 (NWC) or rank 2 (NC) tensors"
            )
        spanning = self._shared_across(p) if self._has_shared else None
        if spanning:
            return f"layer {spanning!r} is shared by calls on both sides of it"
        return None

    def _shared_across(self, p: int) -> str | None:
        side: dict[int, bool] = {}
        for i, c in enumerate(self.calls):
            before = i <= p
            if side.setdefault(id(c.layer), before) != before:
                return c.layer.name
        return None

    def _bypass(self, p: int) -> str:
        """A short path around ``p``: from an ancestor of p, over an edge that jumps p, to a
        descendant of p."""
        ancestors = _bfs(self.calls, p, forward=False)
        descendants = _bfs(self.calls, p, forward=True)
        u, v = next((u, v) for u in range(p - 1, -1, -1) for v in self.calls[u].children if v > p)
        back = _shortest(self.calls, u, ancestors, forward=False, avoid=p)
        ahead = _shortest(self.calls, v, descendants, forward=True, avoid=p)
        path = [*reversed(back), *ahead]
        names = [self.calls[i].layer.name for i in path]
        if len(names) > 7:
            names = [*names[:3], "...", *names[-3:]]
        return "the path " + " -> ".join(names)

    # -- costs ----------------------------------------------------------------------------

    def cut_point(self, p: int) -> CutPoint:
        c = self.calls[p]
        shape = tuple(int(d) for d in c.shape)  # type: ignore[union-attr]
        params, flops = self._prefix_params[p + 1], self._prefix_flops[p + 1]
        return CutPoint(
            position=p,
            layer=c.layer.name,
            shape=shape,
            bytes_per_sample=FLOAT32_BYTES * math.prod(shape),
            params_before=params,
            params_after=self._prefix_params[-1] - params,
            flops_before=flops,
            flops_after=self._prefix_flops[-1] - flops,
        )

    @property
    def total_params(self) -> int:
        return self._prefix_params[-1]

    @property
    def total_flops(self) -> int:
        return self._prefix_flops[-1]

    def cuts(self) -> list[CutPoint]:
        return [self.cut_point(p) for p, ok in enumerate(self.valid) if ok]

    def nearest(self, p: int) -> str:
        before = next((i for i in range(p - 1, -1, -1) if self.valid[i]), None)
        after = next((i for i in range(p + 1, len(self.calls)) if self.valid[i]), None)
        parts = []
        if before is not None:
            parts.append(f"{self.calls[before].layer.name!r} (before)")
        if after is not None:
            parts.append(f"{self.calls[after].layer.name!r} (after)")
        if not parts:
            return "the model has no valid cut"
        return "nearest valid cuts: " + ", ".join(parts)


def find_cuts(model: Any) -> list[CutPoint]:
    """Every valid cut of ``model``, in order from the input to the output."""
    return Analysis(model).cuts()


def validate_cuts(model: Any, cut_names: list[str]) -> list[CutPoint]:
    """The cut points for ``cut_names`` (one: single split, two: double split), in order.

    Raises ``InvalidCut`` naming the problem: an unknown layer (with close names), a layer
    that is not a single-tensor cut point (with the path that bypasses it and the nearest
    valid cuts), duplicate or out-of-order cuts, or a cut that leaves a slice empty.
    """
    if len(cut_names) not in (1, 2):
        raise InvalidCut(f"give one cut (single split) or two (double split), got {len(cut_names)}")
    analysis = Analysis(model)
    positions = []
    for name in cut_names:
        p = analysis.by_name.get(name)
        if p is None:
            close = difflib.get_close_matches(name, list(analysis.by_name), n=3, cutoff=0.6)
            hint = (
                f"; did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else ("; `spliteasy cuts MODEL` lists the valid cuts")
            )
            raise InvalidCut(f"model {model.name!r} has no layer named {name!r}{hint}")
        positions.append(p)
    if len(positions) == 2 and positions[0] == positions[1]:
        raise InvalidCut(
            f"cut {cut_names[0]!r} is given twice: slice B between the cuts would be empty"
        )
    for name, p in zip(cut_names, positions, strict=True):
        why = analysis.why_not(p)
        if why is None:
            continue
        if p == analysis.input:
            raise InvalidCut(
                f"cannot cut at {name!r}: it is the model input, so slice A would be empty"
            )
        if p == analysis.output:
            last = "C" if len(cut_names) == 2 else "B"
            raise InvalidCut(
                f"cannot cut at {name!r}: it is the model output, so slice {last} would be empty"
            )
        raise InvalidCut(f"{name!r} is not a single-tensor cut point: {why}; {analysis.nearest(p)}")
    if len(positions) == 2 and positions[0] > positions[1]:
        a, b = cut_names
        raise InvalidCut(
            f"cuts out of order: {a!r} (position {positions[0]}) comes after {b!r} "
            f"(position {positions[1]}); give them as {b},{a}"
        )
    return [analysis.cut_point(p) for p in positions]


def check_supported(model: Any, device: bool = False) -> None:
    """Raise ``UnsupportedLayer`` naming the first layer spliteasy's runtimes cannot carry.

    By default every layer must be able to train in slice B on the server; with
    ``device=True`` the layers only the device can train (``server_refusal``) pass.
    ``slice_model`` checks the whole model with ``device=True`` and then B without it.
    """
    where = f"slice {model.name}: " if model.name in ("A", "B", "C") else ""
    for layer in model.layers:
        cls = type(layer)
        name = cls.__name__
        builtin = cls.__module__.startswith(("tf_keras.", "keras."))
        refusal = server_refusal(layer) if builtin else None
        if refusal is not None:
            if device:
                continue
            raise UnsupportedLayer(
                f"layer {layer.name!r} ({name}) cannot be carried in slice B (the server): "
                f"{refusal}; place the cuts so that it falls in A or C, which train on the device"
            )
        if name not in SUPPORTED_LAYERS or not builtin:
            why = _UNSUPPORTED_WHY.get(name) or (
                "it is a custom layer class"
                if not builtin
                else "no spliteasy runtime implements it"
            )
            raise UnsupportedLayer(
                f"{where}layer {layer.name!r} ({name}) cannot be carried: {why}. "
                f"Supported layers: {', '.join(sorted(SUPPORTED_LAYERS - {'InputLayer'}))}"
                f" ({', '.join(sorted(DEVICE_ONLY_LAYERS))} in A or C only)"
            )
        activation = getattr(layer, "activation", None)
        if activation is not None:
            act = getattr(activation, "__name__", type(activation).__name__)
            if act not in SUPPORTED_ACTIVATIONS:
                raise UnsupportedLayer(
                    f"{where}layer {layer.name!r} ({name}) uses activation {act!r}, which spliteasy "
                    f"cannot carry; supported: {', '.join(sorted(SUPPORTED_ACTIVATIONS))}"
                )


# -- FLOPs ------------------------------------------------------------------------------

_ELEMENTWISE_1 = {"Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax", "ThresholdedReLU"}
_MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}


def layer_flops(layer: Any, input_shapes: list[tuple], output_shapes: list[tuple]) -> int:
    """Approximate forward FLOPs of one call, per sample; a multiply-add counts 2.

    Convolutions and Dense count 2 per weight use plus 1 per output for the bias;
    BatchNormalization 2 per element (the inference form, a folded scale and shift);
    activations 1 per element; merges (k-1) per output element for k inputs; pooling one
    per window element per output; global pooling one per input element; Rescaling 2 per
    element. Reshaping, padding, concatenation and inputs move data and count 0.
    """
    out = sum(_elems(s) for s in output_shapes)
    inp = sum(_elems(s) for s in input_shapes)
    kind = next((k.__name__ for k in type(layer).__mro__ if k.__name__ in _FLOP_KINDS), None)
    bias = out if getattr(layer, "use_bias", False) else 0
    if kind in ("Conv1D", "Conv2D", "Conv3D"):
        return 2 * math.prod(layer.kernel.shape[:-1]) * out + bias
    if kind in ("Conv2DTranspose", "Conv1DTranspose", "Conv3DTranspose"):
        return 2 * math.prod(layer.kernel.shape[:-1]) * inp + bias
    if kind in ("DepthwiseConv2D", "DepthwiseConv1D"):
        return 2 * math.prod(layer.depthwise_kernel.shape[:-2]) * out + bias
    if kind in ("SeparableConv2D", "SeparableConv1D"):
        dk = layer.depthwise_kernel.shape
        mid_channels = dk[-2] * dk[-1]
        spatial = out // output_shapes[0][-1]
        return 2 * math.prod(dk[:-2]) * spatial * mid_channels + 2 * mid_channels * out + bias
    if kind == "Dense":
        return 2 * int(layer.kernel.shape[0]) * out + bias
    if kind in ("BatchNormalization", "Rescaling"):
        return 2 * out
    if kind in _ELEMENTWISE_1:
        return out
    if kind in _MERGE:
        return max(len(input_shapes) - 1, 1) * out
    if kind in ("MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D"):
        return math.prod(layer.pool_size) * out
    if kind in (
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
        "GlobalAveragePooling1D",
        "GlobalMaxPooling1D",
    ):
        return inp
    if kind == "CustomScaleLayer":
        return 2 * out
    return 0


_FLOP_KINDS = {
    "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Dense",
    "BatchNormalization", "Rescaling", "MaxPooling1D", "MaxPooling2D", "AveragePooling1D",
    "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "CustomScaleLayer",
} | _ELEMENTWISE_1 | _MERGE  # fmt: skip


# -- graph helpers ----------------------------------------------------------------------


def _elems(shape: tuple) -> int:
    return math.prod(int(d) for d in shape[1:] if d is not None)


def _shapes(s: Any) -> list[tuple]:
    """Node shapes as a list of tuples, whether Keras gave one shape or several."""
    if s is None:
        return []
    if isinstance(s, dict):
        s = list(s.values())
    if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple)):
        return [tuple(x) for x in s]
    if hasattr(s, "as_list"):
        return [tuple(s.as_list())]
    return [tuple(s)]


def _producer(tensor: Any) -> Any:
    """The call (node) that produced a symbolic tensor."""
    layer, node_index, _ = tensor._keras_history
    return layer._inbound_nodes[node_index]


def _single_shape(node: Any) -> tuple[int | None, ...] | None:
    outputs = node.outputs
    if isinstance(outputs, (list, tuple, dict)):
        if len(outputs) != 1:
            return None
        outputs = next(iter(outputs.values())) if isinstance(outputs, dict) else outputs[0]
    return tuple(outputs.shape[1:])


def _toposort(nodes: list[Any], key) -> list[Any]:
    """Kahn's algorithm, always taking the ready node that comes first by ``key``."""
    import heapq

    ids = {id(n): n for n in nodes}
    indegree = {id(n): sum(1 for p in n.parent_nodes if id(p) in ids) for n in nodes}
    children: dict[int, list[Any]] = {id(n): [] for n in nodes}
    for n in nodes:
        for p in n.parent_nodes:
            if id(p) in ids:
                children[id(p)].append(n)
    seq = {id(n): i for i, n in enumerate(nodes)}
    heap = [(key(n), seq[id(n)], id(n)) for n in nodes if indegree[id(n)] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, _, nid = heapq.heappop(heap)
        n = ids[nid]
        order.append(n)
        for child in children[nid]:
            indegree[id(child)] -= 1
            if indegree[id(child)] == 0:
                heapq.heappush(heap, (key(child), seq[id(child)], id(child)))
    if len(order) != len(nodes):
        raise ConverterError("the model's call graph has a cycle")
    return order


def _bfs(calls: list[_Call], start: int, forward: bool) -> set[int]:
    seen = {start}
    queue = deque([start])
    while queue:
        i = queue.popleft()
        for j in calls[i].children if forward else calls[i].parents:
            if j not in seen:
                seen.add(j)
                queue.append(j)
    return seen


def _shortest(
    calls: list[_Call], start: int, targets: set[int], forward: bool, avoid: int
) -> list[int]:
    """Shortest path from ``start`` to any of ``targets`` (excluding ``avoid``), start first."""
    goal = targets - {avoid}
    prev: dict[int, int | None] = {start: None}
    queue = deque([start])
    while queue:
        i = queue.popleft()
        if i in goal:
            path = []
            cur: int | None = i
            while cur is not None:
                path.append(cur)
                cur = prev[cur]
            return list(reversed(path))
        for j in calls[i].children if forward else calls[i].parents:
            if j != avoid and j not in prev:
                prev[j] = i
                queue.append(j)
    return [start]
