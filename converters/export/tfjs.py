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

from .._exceptions import ConverterError, UnsupportedLayer

MODEL_JSON = "model.json"

# Layer classes @tensorflow/tfjs-layers 4.22.0 deserialises (its SerializationMap).
# tests/test_js_export.py keeps this list in step with the installed package.
TFJS_LAYER_CLASSES = frozenset(
    [
        "Activation",
        "Add",
        "AlphaDropout",
        "Average",
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "BatchNormalization",
        "Bidirectional",
        "CategoryEncoding",
        "CenterCrop",
        "Concatenate",
        "Conv1D",
        "Conv2D",
        "Conv2DTranspose",
        "Conv3D",
        "Conv3DTranspose",
        "ConvLSTM2D",
        "Cropping2D",
        "Dense",
        "DepthwiseConv2D",
        "Dot",
        "Dropout",
        "ELU",
        "Embedding",
        "Flatten",
        "Functional",
        "GRU",
        "GaussianDropout",
        "GaussianNoise",
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "Identity",
        "InputLayer",
        "LSTM",
        "LayerNormalization",
        "LeakyReLU",
        "Masking",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
        "Maximum",
        "Minimum",
        "Model",
        "Multiply",
        "PReLU",
        "Permute",
        "RNN",
        "RandomWidth",
        "ReLU",
        "RepeatVector",
        "Rescaling",
        "Reshape",
        "Resizing",
        "SeparableConv2D",
        "Sequential",
        "SimpleRNN",
        "Softmax",
        "SpatialDropout1D",
        "ThresholdedReLU",
        "TimeDistributed",
        "UpSampling2D",
        "ZeroPadding2D",
    ]
)

# Noise layers whose random draw TF.js cannot repeat: A's backward recomputes A's forward
# (TF.js' tape cannot stay open across the server round trip), so a fresh draw would
# differentiate a different function. Dropout is fine: the harness reseeds it per step.
_UNREPEATABLE = frozenset({"AlphaDropout", "GaussianDropout", "GaussianNoise"})


class TfjsExportError(ConverterError):
    """The tensorflowjs converter failed on a slice that passed the layer check."""


def unsupported_layers(model: Any) -> list[str]:
    """``name (Class)`` of every layer, nested models included, TF.js cannot carry."""
    bad: list[str] = []
    for layer in model.layers:
        cls = type(layer).__name__
        if hasattr(layer, "layers") and cls in {"Functional", "Model", "Sequential"}:
            bad.extend(unsupported_layers(layer))
        elif cls not in TFJS_LAYER_CLASSES:
            bad.append(f"{layer.name} ({cls})")
        elif cls in _UNREPEATABLE:
            bad.append(f"{layer.name} ({cls}: its random draw cannot be repeated in backward)")
    return bad


def export_tfjs(model: Any, out_dir: Path) -> None:
    """Write ``model`` (a tf_keras functional or sequential model) as a TF.js layers model
    into ``out_dir`` (created; must not hold a previous export).

    Raises UnsupportedLayer naming every layer TF.js cannot rebuild or train.
    """
    out_dir = Path(out_dir)
    bad = unsupported_layers(model)
    if bad:
        raise UnsupportedLayer(
            f"slice {model.name} cannot run in TF.js: unsupported layer(s) {', '.join(bad)}"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TfjsExportError(f"{out_dir} is not empty; export into a fresh directory")
    from tensorflowjs.converters import save_keras_model

    try:
        # No quantisation and one shard per 4 MiB: the weights must be the Keras ones, bit
        # for bit, or TF.js would not start from the unsplit model's initial values.
        save_keras_model(model, str(out_dir))
    except (ValueError, TypeError, NotImplementedError, KeyError) as exc:
        raise TfjsExportError(f"tensorflowjs could not export slice {model.name}: {exc}") from exc
    _check_written(out_dir)


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
