"""A device slice as a TF.js *layers* model: ``model.json`` plus binary weight shards.

A layers model (not a graph model) is what TF.js can train: its layers come back as
``tf.LayersModel`` with variables ``tf.variableGrads`` differentiates. The tensorflowjs
converter writes whatever Keras saves, and TF.js only fails much later, in the browser,
when it meets a layer class it does not know. So the slice is checked here first, against
the layer classes ``@tensorflow/tfjs`` 4.22 registers, and a slice TF.js cannot rebuild
is refused with the layer's name.

BatchNormalization with ``scale=False`` or ``center=False`` (InceptionV3) loads in TF.js but
crashes in training (tfjs #2868); the JS harness (``device_tf/js/src/layers.mjs``)
replaces TF.js' training path with Keras' formula, so such slices are exported as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared_schema.layers import TFJS_LAYER_CLASSES, UNREPEATABLE_LAYERS

from .._exceptions import ConverterError, UnsupportedLayer

MODEL_JSON = "model.json"

# Layer classes @tensorflow/tfjs-layers 4.22.0 deserialises (its SerializationMap), and
# the noise layers whose random draw TF.js cannot repeat (A's backward recomputes A's
# forward, so a fresh draw would differentiate a different function; Dropout is fine: the
# harness reseeds it per step): both in shared_schema/layers.json.
# tests/test_js_runtime.py keeps the class list in step with the installed package.
_UNREPEATABLE = UNREPEATABLE_LAYERS


class TfjsExportError(ConverterError):
    """The tensorflowjs converter failed on a slice that passed the layer check."""


def unsupported_layers(model: Any, training: bool = True) -> list[str]:
    """``name (Class)`` of every layer, nested models included, TF.js cannot carry
    (``training=False``: for inference only, where noise layers are identities)."""
    bad: list[str] = []
    for layer in model.layers:
        cls = type(layer).__name__
        if hasattr(layer, "layers") and cls in {"Functional", "Model", "Sequential"}:
            bad.extend(unsupported_layers(layer, training))
        elif cls not in TFJS_LAYER_CLASSES:
            bad.append(f"{layer.name} ({cls})")
        elif training and cls in _UNREPEATABLE:
            bad.append(f"{layer.name} ({cls}: its random draw cannot be repeated in backward)")
    return bad


def export_tfjs(model: Any, out_dir: Path, training: bool = True) -> None:
    """Write ``model`` (a tf_keras functional or sequential model) as a TF.js layers model
    into ``out_dir`` (created; must not hold a previous export).

    Raises UnsupportedLayer naming every layer TF.js cannot rebuild or (``training``)
    train; ``spliteasy export`` writes the trained model for inference with
    ``training=False``.
    """
    out_dir = Path(out_dir)
    bad = unsupported_layers(model, training)
    if bad:
        raise UnsupportedLayer(
            f"slice {model.name} cannot run in TF.js: unsupported layer(s) {', '.join(bad)}"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TfjsExportError(f"{out_dir} is not empty; export into a fresh directory")
    import os
    import tempfile

    # tensorflowjs imports tensorflow_decision_forests, whose import-time banner calls
    # IPython (not installed) whenever sys.stdout is not a terminal or file (pytest's
    # capture, notebooks); the variable skips the banner.
    os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
    from tensorflowjs.converters.keras_h5_conversion import (
        h5_merged_saved_model_to_tfjs_format,
        write_artifacts,
    )

    try:
        with tempfile.TemporaryDirectory() as tmp:
            h5 = Path(tmp) / "slice.h5"
            model.save(h5, include_optimizer=False)
            topology, _ = h5_merged_saved_model_to_tfjs_format(str(h5))
    except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
        raise TfjsExportError(f"tensorflowjs could not export slice {model.name}: {exc}") from exc
    topology = _tfjs_separable(_tfjs_regularizers(topology))
    # The converter names each weight after Keras' variable name, which a slice rebuilt
    # from config (as converters.slicing makes them) has lost its layer scope in
    # ("kernel", not "a_conv/kernel"), and orders them by layer name. TF.js finds weights
    # by "layer/variable", so they are written here from the layers themselves. No
    # quantisation: TF.js must start from the unsplit model's values, bit for bit.
    weights = [
        {"name": f"{layer.name}/{_short(var)}", "data": var.numpy()}
        for layer in _leaf_layers(model)
        for var in layer.weights
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_artifacts(topology, [weights], str(out_dir))
    _check_written(out_dir)


def _short(var: Any) -> str:
    return var.name.split("/")[-1].split(":")[0]


def _leaf_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        if type(layer).__name__ in {"Functional", "Model", "Sequential"}:
            out.extend(_leaf_layers(layer))
        else:
            out.append(layer)
    return out


def _tfjs_regularizers(node: Any) -> Any:
    """Keras' ``L1``/``L2`` regularisers as the ``L1L2`` TF.js knows (same penalty)."""
    if isinstance(node, list):
        return [_tfjs_regularizers(v) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("class_name") in ("L1", "L2") and isinstance(node.get("config"), dict):
        cfg = node["config"]
        return {
            **node,
            "class_name": "L1L2",
            "config": {"l1": float(cfg.get("l1", 0.0)), "l2": float(cfg.get("l2", 0.0))},
        }
    return {k: _tfjs_regularizers(v) for k, v in node.items()}


# Keras' SeparableConv config inherits Conv's kernel_* fields, which the layer never uses
# (its kernels are depthwise_* and pointwise_*); TF.js' SeparableConv2D refuses a config
# that has them ("Fields kernelInitializer, kernelRegularizer and kernelConstraint are
# invalid for SeparableConv2D"), so they are dropped from the exported topology.
_SEPARABLE = {"SeparableConv1D", "SeparableConv2D"}
_UNUSED_SEPARABLE_FIELDS = ("kernel_initializer", "kernel_regularizer", "kernel_constraint")


def _tfjs_separable(node: Any) -> Any:
    """Every SeparableConv layer's config without the ``kernel_*`` fields it ignores."""
    if isinstance(node, list):
        return [_tfjs_separable(v) for v in node]
    if not isinstance(node, dict):
        return node
    if node.get("class_name") in _SEPARABLE and isinstance(node.get("config"), dict):
        cfg = {k: v for k, v in node["config"].items() if k not in _UNUSED_SEPARABLE_FIELDS}
        return {**node, "config": _tfjs_separable(cfg)}
    return {k: _tfjs_separable(v) for k, v in node.items()}


def _check_written(out_dir: Path) -> None:
    """The directory holds model.json and exactly the shards it lists (its tree hash is
    the artefact's identity, so a stray file would make the manifest lie)."""
    spec = json.loads((out_dir / MODEL_JSON).read_text())
    listed = {p for group in spec["weightsManifest"] for p in group["paths"]}
    present = {p.name for p in out_dir.iterdir()} - {MODEL_JSON}
    if listed != present:
        raise TfjsExportError(
            f"{out_dir}: shards {sorted(present)} but model.json lists {sorted(listed)}"
        )
