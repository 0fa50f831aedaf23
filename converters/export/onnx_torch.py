"""Server slice B: tf_keras -> ONNX (tf2onnx) -> trainable torch (onnx2torch + passes).

The hard part is knowing, for every Keras variable, which torch tensor it became and in
which axis order: tf2onnx renames, transposes and may merge equal constants, and
onnx2torch turns some weights into buffers. We find out by *probing*: before export,
every variable of B is filled with unique random values, so after conversion each one
is recognised by value alone (up to an axis permutation and reshape, which we search).
Nothing can merge, nothing can hide. The real initial values are then written into the
ONNX initializers and the torch module through that map.

tf2onnx's back-to-back optimizer is left out: it folds BatchNorm into the preceding
convolution, which is right for inference and wrong for training. The transposes it
would have cancelled are removed on the torch side by the ``fold_transposes`` pass.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_schema import TensorSpec

from .._exceptions import ConverterError, UnsupportedLayer

OPSET = 17


@dataclass
class ServerSliceExport:
    spec: object  # server_torch.spec.TorchSpec
    module: object  # torch.fx.GraphModule, real initial weights, training semantics
    onnx_path: Path
    weights_path: Path
    spec_path: Path
    onnx_nodes: dict[str, int]


def _match_axes(keras_value: np.ndarray, candidate: np.ndarray) -> list[int] | None:
    """The axes permutation (then reshape) that turns the Keras array into the candidate."""
    if keras_value.size != candidate.size:
        return None
    for axes in itertools.permutations(range(keras_value.ndim)):
        moved = keras_value.transpose(axes)
        if moved.size == candidate.size and np.array_equal(
            moved.reshape(candidate.shape), candidate
        ):
            return list(axes)
    return None


def _match_all(
    probes: dict[str, np.ndarray], candidates: dict[str, np.ndarray]
) -> dict[str, tuple[str, list[int]]]:
    """Keras variable name -> (candidate name, axes). Fingerprints keep this linear."""
    index: dict[tuple, list[str]] = {}
    for name, value in candidates.items():
        if value.size == 0 or value.dtype != np.float32:
            continue
        index.setdefault((value.size, float(value.min()), float(value.max())), []).append(name)
    found: dict[str, tuple[str, list[int]]] = {}
    for kname, kvalue in probes.items():
        for cname in index.get((kvalue.size, float(kvalue.min()), float(kvalue.max())), []):
            axes = _match_axes(kvalue, candidates[cname])
            if axes is not None:
                found[kname] = (cname, axes)
                break
    return found


def _tf2onnx(b_model, cut_in: TensorSpec, out_spec: TensorSpec):
    import tensorflow as tf
    import tf2onnx
    from tf2onnx import optimizer as tf2onnx_optimizer

    optimizers = {
        name: opt
        for name, opt in tf2onnx_optimizer._optimizers.items()
        if name != "remove_back_to_back"
    }
    signature = (tf.TensorSpec([None, *cut_in.sample_shape], tf.float32, name=cut_in.name),)
    out_name = b_model.output_names[0]
    try:
        model_proto, _ = tf2onnx.convert.from_keras(
            b_model,
            input_signature=signature,
            opset=OPSET,
            inputs_as_nchw=[cut_in.name] if cut_in.layout == "NHWC" else None,
            outputs_as_nchw=[out_name] if out_spec.layout == "NHWC" else None,
            optimizers=optimizers,
        )
    except Exception as exc:  # tf2onnx's own errors, translated at the boundary
        raise UnsupportedLayer(f"tf2onnx cannot convert slice B: {exc}") from exc
    return model_proto


def _no_converter(proto, exc: Exception) -> str:
    """onnx2torch's error, with the Keras layers the unconvertible ONNX op came from."""
    found = re.search(r"operation_type='([^']+)'", str(exc))
    op = found.group(1) if found else None
    layers = sorted(
        {n.name.split("/")[1] for n in proto.graph.node if n.op_type == op and "/" in n.name}
    )
    where = f" (from layer {', '.join(layers)})" if layers else ""
    return f"onnx2torch cannot convert ONNX op {op or '?'}{where} in slice B: {exc}"


def export_server_slice(
    b_model, cut_in: TensorSpec, out_spec: TensorSpec, out_dir: Path, seed: int = 0
) -> ServerSliceExport:
    """Write ``model.onnx``, ``weights.safetensors`` and ``torch_spec.json`` for B."""
    import onnx
    from onnx import numpy_helper
    from onnx2torch import convert
    from safetensors.torch import save_file
    from torch import nn

    from server_torch.rebuild import build_module
    from server_torch.spec import BatchNormSpec, TorchSpec, VariableSpec

    out_dir.mkdir(parents=True, exist_ok=True)
    from shared_schema.naming import named_variables

    variables = named_variables(b_model)
    names = list(variables)
    if len(names) != len(b_model.weights):
        raise ConverterError("slice B has variables outside its layers or two with one name")
    owner = {
        f"{layer.name}/{v.name.split('/')[-1].split(':')[0]}": layer
        for layer in b_model.layers
        for v in layer.weights
    }
    trainable_ids = {id(v) for v in b_model.trainable_weights}
    trainable = {n for n, v in variables.items() if id(v) in trainable_ids}
    real = {n: v.numpy() for n, v in variables.items()}

    rng = np.random.default_rng(seed)
    probes = {}
    for n, v in variables.items():
        probes[n] = rng.uniform(0.5, 1.5, size=v.shape).astype(np.float32)
        v.assign(probes[n])
    try:
        probe_proto = _tf2onnx(b_model, cut_in, out_spec)
    finally:
        for n, v in variables.items():
            v.assign(real[n])

    # Keras variable -> torch tensor, found on the raw onnx2torch graph of the probe.
    try:
        raw = convert(probe_proto)
    except NotImplementedError as exc:  # onnx2torch has no converter for an op
        raise UnsupportedLayer(_no_converter(probe_proto, exc)) from exc
    tensors = {
        n: t.detach().numpy() for n, t in raw.state_dict().items() if t.dtype.is_floating_point
    }
    to_torch = _match_all(probes, tensors)
    missing = [n for n in names if n not in to_torch]
    if missing:
        layers = sorted({owner[n].name for n in missing})
        raise UnsupportedLayer(
            f"variables {missing} of layer(s) {layers} were not carried into the torch graph "
            "(folded or rewritten by the converter); this layer cannot train on the server"
        )

    bn_specs: dict[str, BatchNormSpec] = {}
    bn_param_names: set[str] = set()
    for mod_name, mod in raw.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        stat = next((k for k, (t, _) in to_torch.items() if t == f"{mod_name}.running_mean"), None)
        if stat is None:
            raise UnsupportedLayer(
                f"BatchNorm {mod_name} does not come from a Keras BatchNormalization"
            )
        layer = owner[stat]
        if getattr(layer, "renorm", False) or getattr(layer, "virtual_batch_size", None):
            raise UnsupportedLayer(
                f"layer {layer.name}: BatchNormalization renorm/virtual batches are not supported"
            )
        bn_specs[mod_name] = BatchNormSpec(
            keras_layer=layer.name,
            momentum=float(layer.momentum),
            epsilon=float(layer.epsilon),
            center=bool(layer.center),
            scale=bool(layer.scale),
            unbiased_running_var=bool(layer.fused),
        )
        bn_param_names.update({f"{mod_name}.weight", f"{mod_name}.bias"})

    var_specs = [
        VariableSpec(
            keras=n,
            keras_shape=list(real[n].shape),
            torch=to_torch[n][0],
            torch_shape=list(tensors[to_torch[n][0]].shape),
            axes=to_torch[n][1],
            trainable=n in trainable,
        )
        for n in names
    ]
    mapped = {v.torch for v in var_specs}
    frozen = [n for n, _ in raw.named_parameters() if n not in mapped and n not in bn_param_names]
    spec = TorchSpec(batchnorm=bn_specs, variables=var_specs, frozen=frozen)

    # The bundle's ONNX holds the real initial values: patch each probed initializer.
    inits = {i.name: numpy_helper.to_array(i) for i in probe_proto.graph.initializer}
    to_onnx = _match_all(probes, inits)
    missing = [n for n in names if n not in to_onnx]
    if missing:
        raise UnsupportedLayer(f"variables {missing} are not plain ONNX initializers")
    by_init = {cname: (kname, axes) for kname, (cname, axes) in to_onnx.items()}
    for init in probe_proto.graph.initializer:
        if init.name in by_init:
            kname, axes = by_init[init.name]
            value = real[kname].transpose(axes).reshape(inits[init.name].shape)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), init.name))
    onnx_path = out_dir / spec.onnx
    onnx.save(probe_proto, str(onnx_path))

    module = build_module(probe_proto, spec)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    weights_path = out_dir / spec.weights
    save_file(state, str(weights_path))
    spec_path = spec.save(out_dir)
    nodes: dict[str, int] = {}
    for node in probe_proto.graph.node:
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
    return ServerSliceExport(spec, module, onnx_path, weights_path, spec_path, nodes)
