"""Cut a tf_keras functional model at one or two single-tensor cut points.

Each slice becomes its own functional model, rebuilt from config with fresh layers and
the original weights, so A, B and C can be saved, converted and trained independently
while starting from exactly the unsplit model's initial values. The input layer of a
slice is named after the cut it starts at, which is also the tensor's name on the wire.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from shared_schema import TensorSpec
from shared_schema.naming import named_variables  # noqa: F401  (re-exported)

from ._exceptions import InvalidCut, UnsupportedLayer
from .cuts import check_supported

LABELS = "labels"


@dataclass
class Slices:
    """The sliced model. ``c`` is None for a single split (B then ends at the output)."""

    a: Any
    b: Any
    c: Any | None
    input: TensorSpec
    cuts: list[TensorSpec]
    output: TensorSpec
    labels: TensorSpec

    @property
    def split_mode(self) -> str:
        return "double" if self.c is not None else "single"


def tensor_spec(name: str, shape, dtype: str = "float32") -> TensorSpec:
    dims = [None, *[int(d) for d in shape[1:]]]
    layout = {4: "NHWC", 3: "NWC", 2: "NC"}.get(len(dims))
    if layout is None:
        raise InvalidCut(
            f"tensor {name!r} has rank {len(dims)}; cuts support rank 4 (NHWC), 3 (NWC) or 2"
        )
    if any(d is None for d in dims[1:]):
        raise InvalidCut(f"tensor {name!r} has an unknown dimension {dims}; fix the input size")
    return TensorSpec(name=name, shape=dims, dtype=dtype, layout=layout)


def _input_dtype(tensor) -> str:
    """The model input's dtype on the device: float32, or int32 token ids (an Embedding's)."""
    dtype = tensor.dtype.name
    if dtype in ("float32", "int32"):
        return dtype
    raise UnsupportedLayer(
        f"the model input {tensor.name!r} is {dtype}; spliteasy feeds float32 (or int32 ids): "
        "build the Input with dtype='float32' or 'int32'"
    )


def _check_cuts(model, cut_names: list[str]) -> None:
    """Order, existence and single-use checks; the dominance check lives in ``cuts``."""
    try:
        from .cuts import validate_cuts
    except ImportError:
        validate_cuts = None
    if validate_cuts is not None:
        validate_cuts(model, list(cut_names))
        return
    names = [layer.name for layer in model.layers]
    for cut in cut_names:
        if cut not in names:
            raise InvalidCut(f"unknown layer {cut!r}")
    positions = [names.index(c) for c in cut_names]
    if positions != sorted(positions) or len(set(positions)) != len(positions):
        raise InvalidCut(f"cuts {cut_names} are out of order or repeated")
    if positions[0] == 0 or positions[-1] == len(names) - 1:
        raise InvalidCut("a cut at the input or the output layer leaves a slice empty")


def _submodel(keras, inputs, outputs, input_name: str, name: str):
    """A standalone copy of the graph between two tensors, with fresh layers."""
    try:
        view = keras.Model(inputs, outputs, name=name)
    except ValueError as exc:
        raise InvalidCut(
            f"slice {name} is not closed between its cuts (a path bypasses a cut): {exc}"
        ) from exc
    config = view.get_config()
    old_inputs = [entry[0] for entry in config["input_layers"]]
    if len(old_inputs) != 1:
        raise InvalidCut(f"slice {name} has {len(old_inputs)} inputs; a cut must be one tensor")
    if old_inputs[0] != input_name:
        _rename_layer(config, old_inputs[0], input_name)
    custom = {type(layer).__name__: type(layer) for layer in view.layers}
    try:
        clean = keras.Model.from_config(config, custom_objects=custom)
    except Exception as exc:  # a layer whose config cannot be rebuilt
        raise UnsupportedLayer(f"slice {name}: cannot rebuild from config: {exc}") from exc
    clean.set_weights(view.get_weights())
    return clean


@contextmanager
def _graph_untouched(model):
    """Undo what building the view models does to ``model``'s layers.

    A functional model built on intermediate tensors (the view in ``_submodel``) clones
    the call nodes it spans and appends the clones to the original layers, so after one
    slicing every layer past the first cut looks called twice, and slicing the same
    model again refused its cuts as shared layers.
    """
    saved = [
        (layer, list(layer._inbound_nodes), list(layer._outbound_nodes)) for layer in model.layers
    ]
    try:
        yield
    finally:
        for layer, inbound, outbound in saved:
            layer._inbound_nodes[:] = inbound
            layer._outbound_nodes[:] = outbound


def _rename_layer(config: dict, old: str, new: str) -> None:
    def fix(obj):
        if isinstance(obj, list):
            if obj and obj[0] == old and len(obj) >= 3 and isinstance(obj[1], int):
                obj[0] = new
            for item in obj:
                fix(item)
        elif isinstance(obj, dict):
            for value in obj.values():
                fix(value)

    for layer in config["layers"]:
        if layer["name"] == old:
            layer["name"] = new
            layer["config"]["name"] = new
        fix(layer.get("inbound_nodes", []))
    fix(config["input_layers"])
    fix(config["output_layers"])


def slice_model(model, cut_names: list[str]) -> Slices:
    """A, B[, C] as independent tf_keras models; one cut = single split, two = double."""
    import tf_keras as keras

    if len(cut_names) not in (1, 2):
        raise InvalidCut(f"give one cut (single split) or two (double split), got {len(cut_names)}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayer("only models with one input and one output can be split")
    # Every layer must be carriable before anything is exported (one error naming it,
    # not a converter's stack trace); B is checked again below, stricter.
    check_supported(model, device=True)
    _check_cuts(model, cut_names)
    for cut in cut_names:
        layer = model.get_layer(cut)
        if len(layer._inbound_nodes) != 1:
            raise InvalidCut(f"layer {cut!r} is shared (called {len(layer._inbound_nodes)} times)")
    cut_tensors = [model.get_layer(c).output for c in cut_names]
    input_name = model.layers[0].name
    input_spec = tensor_spec(input_name, model.inputs[0].shape, _input_dtype(model.inputs[0]))
    cuts = [tensor_spec(c, t.shape) for c, t in zip(cut_names, cut_tensors, strict=True)]
    out_shape = model.outputs[0].shape
    if len(out_shape) != 2:
        raise UnsupportedLayer(f"the model's output must be (batch, classes), got {out_shape}")
    output = TensorSpec(name="logits", shape=[None, int(out_shape[1])], layout="NC")
    labels = TensorSpec(name=LABELS, shape=[None], dtype="int32", layout="N")

    with _graph_untouched(model):
        a = _submodel(keras, model.inputs[0], cut_tensors[0], input_name, "A")
        if len(cut_names) == 2:
            b = _submodel(keras, cut_tensors[0], cut_tensors[1], cut_names[0], "B")
            c = _submodel(keras, cut_tensors[1], model.outputs[0], cut_names[1], "C")
        else:
            b = _submodel(keras, cut_tensors[0], model.outputs[0], cut_names[0], "B")
            c = None
    check_supported(b)
    return Slices(a, b, c, input_spec, cuts, output, labels)
