"""Slice B in training: forward, backward and the optimizer step, with numpy at the edges.

The trainer speaks the wire's layout (NHWC for images, as the TensorFlow device sends
them) and translates to torch's NCHW by *viewing* the incoming buffer permuted, never by
copying it: the NHWC array becomes a leaf tensor that requires grad, B sees it as an
NCHW view (a channels_last tensor), and dL/da lands on the leaf already in NHWC. The
only copy on the way out is the one that makes B's output contiguous for the wire.

It knows nothing of sessions or HTTP, holds at most one pending forward (split learning
trains one device's batch at a time through B; ``sessions`` enforces the turn-taking),
and validates everything it is handed before B is touched, so a rejected call changes
neither B's parameters nor its BatchNorm statistics nor its optimizer state.

Finite inputs can still break B (values near float32's limit overflow inside a
BatchNorm, a gradient's square overflows Adam's second moment). So every step is
guarded: B's buffers are copied before each forward (they are small), the output, the
input gradient and every parameter gradient must be finite, and when a gradient or a
parameter is large enough that the update could overflow, the parameters and the
optimizer state are copied before the update and checked after it. A step that would
leave anything non-finite is undone and refused (:class:`UnstableStep`, 422): B, its
BatchNorm statistics and its optimizer state are bit for bit what they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared_schema import FrameSpecMismatch, Manifest, TensorSpec
from shared_schema.manifest import AdamSpec, SGDSpec

from .errors import LabelOutOfRange, NonFinite, StepConflict, UnstableStep
from .keras_compat import KerasAdam, KerasSGD
from .losses import keras_loss, keras_sparse_ce

# Keras' backend epsilon: probabilities are clipped to [eps, 1 - eps] before the log.
KERAS_EPSILON = 1e-7
# Below these magnitudes an optimizer update from finite state cannot overflow float32
# (Adam squares the gradient: 1e15**2 = 1e30 < 3.4e38), so the step needs no copy of the
# parameters and optimizer state to be undone; above them it is copied first.
SAFE_GRADIENT = 1e15
SAFE_PARAMETER = 1e30


def build_optimizer(spec: SGDSpec | AdamSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The manifest's optimizer with Keras' update rule (see keras_compat)."""
    if isinstance(spec, SGDSpec):
        return KerasSGD(
            params, lr=spec.learning_rate, momentum=spec.momentum, nesterov=spec.nesterov
        )
    if isinstance(spec, AdamSpec):
        return KerasAdam(
            params,
            lr=spec.learning_rate,
            beta_1=spec.beta_1,
            beta_2=spec.beta_2,
            epsilon=spec.epsilon,
        )
    raise TypeError(f"no optimizer for {spec!r}")  # pragma: no cover - the manifest forbids it


# The label holder's losses (tf_keras' five, checked on tests/golden/math.json) live in
# server_torch/losses.py; keras_sparse_ce stays importable from here.
__all__ = ["Trainer", "as_float32", "build_optimizer", "keras_loss", "keras_sparse_ce"]


def to_torch_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Wire layout -> torch layout, as a view."""
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def to_wire(t: torch.Tensor, layout: str, dtype: str) -> np.ndarray:
    """Torch layout -> contiguous numpy array in the wire layout and dtype (one copy at most)."""
    if layout == "NHWC":
        t = t.permute(0, 2, 3, 1)
    arr = t.detach().contiguous().numpy()
    return arr if arr.dtype.name == dtype else arr.astype(dtype)


_FLOAT32 = np.dtype(np.float32)


def as_float32(arr: np.ndarray, what: str, dtype: np.dtype = _FLOAT32) -> np.ndarray:
    """The float32 (or ``dtype``) array torch will view; rejects NaN/Inf before anything
    is computed."""
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    elif not arr.flags.writeable:
        arr = arr.copy()  # torch.from_numpy wants writable memory; the app hands over its own
    if not np.isfinite(arr).all():
        raise NonFinite(f"{what}: contains NaN or Inf")
    return arr


@dataclass
class _Pending:
    leaf: torch.Tensor  # the incoming activation in wire layout, requires grad
    out: torch.Tensor  # B's output in torch layout, graph attached


class Trainer:
    """B, its optimizer and its loss, driven one call at a time (callers serialise)."""

    def __init__(
        self, module: nn.Module, manifest: Manifest, dtype: torch.dtype = torch.float32
    ) -> None:
        """``dtype`` is B's compute dtype. The wire and the server are float32; float64 is
        for tests that compare this very class with a float64 twin of Keras (float32
        cannot carry a 1e-4 comparison through a deep net's ReLU kinks), and then arrays
        go in and come out in float64 too, never rounded to the wire's float32."""
        self.dtype = dtype
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self.module = module.to(dtype)
        self.module.train()
        self.manifest = manifest
        self.in_spec: TensorSpec = manifest.server_input
        self.out_spec: TensorSpec = manifest.server_output
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(manifest.optimizer, params)
        self.steps = 0  # optimizer steps applied to B
        self.refused = 0  # steps undone by the finiteness guard
        self._pending: _Pending | None = None
        self._buffer_copy: list[torch.Tensor] | None = None

    # -- checks (all run before B is touched) ------------------------------------------

    def _check(self, arr: np.ndarray, spec: TensorSpec, what: str) -> np.ndarray:
        if (
            arr.ndim != len(spec.shape)
            or tuple(arr.shape[1:]) != spec.sample_shape
            or arr.shape[0] < 1
        ):
            raise FrameSpecMismatch(
                f"{what}: shape {list(arr.shape)}, manifest says {['N', *spec.sample_shape]}"
            )
        return as_float32(arr, what, self._np_dtype)

    def _out_dtype(self, spec: TensorSpec) -> str:
        return spec.dtype if self.dtype == torch.float32 else self._np_dtype.name

    def _check_labels(self, labels: np.ndarray, batch: int) -> torch.Tensor:
        """The labels as the manifest's loss takes them: int class indices in [0, K), or
        finite floats shaped like the output (one-hot, binary / multi-label, regression)."""
        spec = self.manifest.labels
        if spec.dtype != "int32":
            if labels.shape != (batch, *spec.sample_shape):
                raise FrameSpecMismatch(
                    f"labels: shape {list(labels.shape)}, expected {[batch, *spec.sample_shape]}"
                )
            return torch.from_numpy(as_float32(labels, "labels", self._np_dtype))
        if labels.ndim != 1 or labels.shape[0] != batch:
            raise FrameSpecMismatch(f"labels: shape {list(labels.shape)}, expected [{batch}]")
        if labels.dtype.kind not in "iu":
            raise FrameSpecMismatch(f"labels: dtype {labels.dtype.name}, expected integers")
        n = self.manifest.num_classes
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise LabelOutOfRange(
                f"labels must lie in [0, {n}); got [{labels.min()}, {labels.max()}]"
            )
        return torch.from_numpy(labels.astype(np.int64))

    @property
    def pending_batch(self) -> int | None:
        return None if self._pending is None else int(self._pending.leaf.shape[0])

    # -- training ----------------------------------------------------------------------

    def _run(self, a: np.ndarray) -> _Pending:
        leaf = torch.from_numpy(a).requires_grad_(True)
        with torch.enable_grad():
            out = self.module(to_torch_layout(leaf, self.in_spec.layout))
        return _Pending(leaf, out)

    def forward(self, a: np.ndarray) -> np.ndarray:
        """B(a) in training mode; the graph is kept for :meth:`backward`."""
        a = self._check(a, self.in_spec, self.in_spec.name)
        self._pending = None
        self._save_buffers()
        p = self._run(a)
        if not self._all_ranks_ok(bool(torch.isfinite(p.out).all())):
            self._refuse("B's output on this batch")
        self._pending = p
        return to_wire(p.out, self.out_spec.layout, self._out_dtype(self.out_spec))

    def backward(self, g: np.ndarray, *, target: bool = False) -> np.ndarray:
        """Backprop through the pending forward, step the optimizer, return dL/da.

        With ``target`` the array is the auxiliary label c_hat = c - g: B minimises
        1/2 ||c_hat - c||^2, whose gradient at c is c - c_hat, and the reply is the
        target a_hat = a - dL/da in the same form.
        """
        p = self._pending
        if p is None:
            raise StepConflict("no forward is pending: send the forward of this step first")
        g = self._check(g, self.out_spec, self.out_spec.name)
        if g.shape[0] != p.leaf.shape[0]:
            raise FrameSpecMismatch(
                f"{self.out_spec.name}: batch {g.shape[0]}, the forward had {p.leaf.shape[0]}"
            )
        g_t = to_torch_layout(torch.from_numpy(g), self.out_spec.layout)
        if target:
            g_t = p.out.detach() - g_t  # d/dc 1/2 ||c_hat - c||^2
        self._pending = None
        p.out.backward(g_t)
        return self._finish(p.leaf, target)

    def step_single(
        self, a: np.ndarray, labels: np.ndarray, *, target: bool = False
    ) -> tuple[np.ndarray, float]:
        """Single split: B forward, the loss on the server's labels, backward, update."""
        a = self._check(a, self.in_spec, self.in_spec.name)
        y = self._check_labels(labels, a.shape[0])
        self._pending = None
        self._save_buffers()
        p = self._run(a)
        with torch.enable_grad():
            loss = keras_loss(p.out, y, self.manifest.loss)
        if not self._all_ranks_ok(bool(torch.isfinite(loss.detach()))):
            self._refuse("the loss on this batch")
        loss.backward()
        return self._finish(p.leaf, target), float(loss.detach())

    # -- the guard ------------------------------------------------------------------------

    @torch.no_grad()
    def _save_buffers(self) -> None:
        bufs = list(self.module.buffers())
        if self._buffer_copy is None or len(self._buffer_copy) != len(bufs):
            self._buffer_copy = [b.detach().clone() for b in bufs]
        else:
            for c, b in zip(self._buffer_copy, bufs, strict=True):
                c.copy_(b)

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        if self._buffer_copy is not None:
            for b, c in zip(self.module.buffers(), self._buffer_copy, strict=True):
                b.copy_(c)

    # Replicas of B on several workers (``server_torch.distributed``) decide together:
    # these hooks turn one process's verdict into all ranks' (one process: as is).

    def _all_ranks_ok(self, ok: bool) -> bool:
        return ok

    def _reduce_max(self, value: float) -> float:
        return value

    def _refuse(self, what: str) -> None:
        """Undo what this step did so far (gradients, BatchNorm statistics) and refuse it."""
        self._pending = None
        self.optimizer.zero_grad(set_to_none=True)
        self._restore_buffers()
        self.refused += 1
        raise UnstableStep(
            f"{what} would make B non-finite (overflow); the step was refused and B, its "
            "BatchNorm statistics and its optimizer state are unchanged"
        )

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def _finish(self, leaf: torch.Tensor, target: bool) -> np.ndarray:
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        # one pass each: a max-norm is NaN or Inf as soon as one element is
        top = _abs_max([leaf.grad, *grads]) if leaf.grad is not None else float("nan")
        top = self._reduce_max(top)
        if not math.isfinite(top):
            self._refuse("the gradients of this batch")
        risky = top > SAFE_GRADIENT or _abs_max(params) > SAFE_PARAMETER
        saved = self._copy_update_state(params) if risky else None
        self.optimizer.step()
        if saved is not None and not (
            _all_finite(params) and _all_finite(self._opt_tensors(params))
        ):
            self._restore_update_state(params, saved)
            self._refuse("the update of this batch")
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        g_a = leaf.grad
        assert g_a is not None
        if target:
            g_a = leaf.detach() - g_a
        arr = g_a.contiguous().numpy()
        dtype = self._out_dtype(self.in_spec)
        return arr if arr.dtype.name == dtype else arr.astype(dtype)

    @torch.no_grad()
    def _copy_update_state(self, params: list[torch.Tensor]) -> tuple[list, list]:
        """Copies of the parameters and optimizer state an update would change."""
        opt = [
            {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            if (st := self.optimizer.state.get(p)) is not None
            else None
            for p in params
        ]
        return [p.detach().clone() for p in params], opt

    @torch.no_grad()
    def _restore_update_state(self, params: list[torch.Tensor], saved: tuple[list, list]) -> None:
        values, opt = saved
        for p, v, st in zip(params, values, opt, strict=True):
            p.copy_(v)
            if st is None:
                self.optimizer.state.pop(p, None)
            else:
                self.optimizer.state[p] = st

    def _opt_tensors(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            v
            for p in params
            for v in self.optimizer.state.get(p, {}).values()
            if torch.is_tensor(v) and v.is_floating_point()
        ]

    def discard(self) -> None:
        """Forget the pending forward (its device went away or lost its turn)."""
        self._pending = None

    # -- state (checkpoints; call between steps) ---------------------------------------

    def _opt_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def module_state(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """B's parameters and buffers by torch name: detached copies (safe to keep), or with
        ``copy=False`` B's own memory, for a caller that serialises it at once between steps."""
        sd = self.module.state_dict()
        return {k: (v.detach().clone() if copy else v.detach()).contiguous() for k, v in sd.items()}

    def load_module_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put a :meth:`module_state` back, exactly: same names, shapes and dtypes, or an error."""
        own = self.module.state_dict()
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(
                f"B's state does not fit: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for k, v in own.items():
            if v.shape != state[k].shape or v.dtype != state[k].dtype:
                raise ValueError(
                    f"B's {k}: {state[k].dtype} {list(state[k].shape)} in the state, "
                    f"{v.dtype} {list(v.shape)} in B"
                )
        self.module.load_state_dict(state, strict=True)

    def optimizer_state(
        self, copy: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, int | float | bool]]:
        """The optimizer's per-parameter state keyed ``"<param index>/<slot>"``: tensors
        (momentum, Adam's m and v) apart from plain numbers (Adam's step count), so the
        tensors go to safetensors and the numbers to JSON. Index = position among the
        optimizer's parameters (the module's trainable parameters, in order). ``copy`` as
        in :meth:`module_state`."""
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, int | float | bool] = {}
        for i, p in enumerate(self._opt_params()):
            for slot, v in self.optimizer.state.get(p, {}).items():
                key = f"{i}/{slot}"
                if torch.is_tensor(v):
                    tensors[key] = (v.detach().clone() if copy else v.detach()).contiguous()
                elif isinstance(v, bool | int | float):
                    scalars[key] = v
                else:  # pragma: no cover - our optimizers keep tensors and numbers only
                    raise TypeError(f"optimizer state {key} is a {type(v).__name__}")
        return tensors, scalars

    def load_optimizer_state(
        self, tensors: dict[str, torch.Tensor], scalars: dict[str, int | float | bool]
    ) -> None:
        """Replace the optimizer's state by an :meth:`optimizer_state`, checking every slot."""
        params = self._opt_params()
        state: dict[torch.Tensor, dict] = {}
        entries: list[tuple[int, int, str, str, object]] = []
        for rank, items in ((0, scalars.items()), (1, sorted(tensors.items()))):
            for key, v in items:
                idx, _, slot = key.partition("/")
                if not idx.isdigit() or int(idx) >= len(params) or not slot:
                    raise ValueError(f"optimizer state {key!r} names no parameter of B")
                entries.append((int(idx), rank, slot, key, v))
        # parameter order, numbers before tensors: the order the optimizers create them in
        for idx, _, slot, key, v in sorted(entries, key=lambda e: e[:3]):
            p = params[idx]
            if torch.is_tensor(v) and (v.shape != p.shape or v.dtype != p.dtype):
                raise ValueError(
                    f"optimizer state {key}: {v.dtype} {list(v.shape)}, parameter is "
                    f"{p.dtype} {list(p.shape)}"
                )
            state.setdefault(p, {})[slot] = v
        self.optimizer.state.clear()
        for p, slots in state.items():
            self.optimizer.state[p] = slots

    # -- inference ---------------------------------------------------------------------

    @torch.no_grad()
    def infer(self, a: np.ndarray) -> np.ndarray:
        """B(a) in inference mode; B's state (and any pending graph) is left as it was."""
        a = self._check(a, self.in_spec, self.in_spec.name)
        was_training = self.module.training
        self.module.eval()
        try:
            out = self.module(to_torch_layout(torch.from_numpy(a), self.in_spec.layout))
        finally:
            self.module.train(was_training)
        return to_wire(out, self.out_spec.layout, self.out_spec.dtype)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@torch.no_grad()
def _abs_max(tensors: list[torch.Tensor]) -> float:
    """max |x| over all tensors; NaN if any element is NaN, Inf if any is infinite. One
    aminmax pass per tensor (a 9M-element B: ~10 ms on one core; the inf-norm of
    ``_foreach_norm`` takes ~60 ms)."""
    tops = []
    for t in tensors:
        if t.numel():
            lo, hi = torch.aminmax(t.detach())
            tops.append(torch.maximum(-lo, hi))
    return float(torch.stack(tops).max()) if tops else 0.0
