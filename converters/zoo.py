"""The model zoo: the paper's six ImageNet networks and MobileNetV2, built untrained.

No weights can be downloaded here, so every network is built with ``weights=None``,
initialised from a seed, at any square RGB input size the architecture allows, with a
``num_classes`` head that ends in **logits** (``classifier_activation=None``): the loss
is then ``sparse_categorical_crossentropy(from_logits=True)``, which is numerically
safer than a softmax followed by a log and is what every spliteasy runtime computes.

Two things make a stock ``tf_keras.applications`` build unfit for splitting, and both are
fixed here rather than downstream:

- Auto-generated layer names (InceptionV3 names almost nothing) depend on how many layers
  the process built before, so ``conv2d_94`` in one run is ``conv2d`` in the next and a
  cut given by name would not be reproducible. Builds run in a fresh name scope.
- InceptionResNetV2 scales its residuals with ``CustomScaleLayer``, a Python-only layer
  that TF.js cannot deserialise. It is rewritten as ``Rescaling`` + ``Add`` (the same
  arithmetic, ``x + r * scale``) named after its block, e.g. ``block35_1_scale`` and
  ``block35_1_add``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._exceptions import ConverterError


class ZooError(ConverterError):
    """A zoo network asked for with arguments it cannot be built with."""


class UnknownModel(ZooError):
    """Neither a zoo name nor anything else spliteasy knows."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    application: str  # attribute of tf_keras.applications
    default_size: int  # the size the paper (and ImageNet) uses
    min_size: int  # the smallest input the architecture's strides survive
    from_logits: bool = True  # heads are built with classifier_activation=None
    # extra keyword arguments of the application (as pairs, so the entry stays hashable)
    options: tuple[tuple[str, Any], ...] = ()


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("resnet50", "ResNet50", 224, 32),
        ZooEntry("resnet152", "ResNet152", 224, 32),
        ZooEntry("densenet121", "DenseNet121", 224, 32),
        ZooEntry("densenet201", "DenseNet201", 224, 32),
        ZooEntry("inceptionv3", "InceptionV3", 299, 75),
        ZooEntry("inceptionresnetv2", "InceptionResNetV2", 299, 75),
        ZooEntry("mobilenetv2", "MobileNetV2", 224, 32),
        # The paper's Figure 3 network, with its fully connected head (fc1, fc2, logits).
        ZooEntry("vgg16", "VGG16", 224, 32),
        # Squeeze-excitation (GlobalAveragePooling2D, Reshape, Multiply), swish. No
        # stochastic depth and no top dropout (0 rates): B trains an inference-exported
        # graph, which cannot carry Dropout, and stochastic depth puts one in every block,
        # so no cut could be valid. Its Normalization (identity without ImageNet weights)
        # becomes a Rescaling(1, 0): see ``replace_scalar_layers``.
        ZooEntry(
            "efficientnetb0",
            "EfficientNetB0",
            224,
            32,
            options=(("drop_connect_rate", 0.0), ("dropout_rate", 0.0)),
        ),
        # Squeeze-excitation, hard-swish and Rescaling preprocessing; its hard-sigmoid's
        # `x + 3` and `x / 6` (TFOpLambda) become Rescaling layers; no head dropout.
        ZooEntry("mobilenetv3small", "MobileNetV3Small", 224, 32, options=(("dropout_rate", 0.0),)),
    ]
}


def names() -> list[str]:
    return list(ZOO)


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownModel(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build(
    name: str, input_size: int | None = None, num_classes: int = 10, seed: int = 0
) -> tuple[Any, bool]:
    """Build zoo network ``name``; returns ``(model, from_logits)``.

    Same name, size, classes and seed give the same layer names and the same initial
    weights in any process, whatever was built before.
    """
    e = entry(name)
    size = e.default_size if input_size is None else input_size
    if isinstance(size, bool) or not isinstance(size, int) or size < e.min_size:
        raise ZooError(f"{name} needs an integer input size >= {e.min_size}, got {size!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ZooError(f"num_classes must be an integer >= 2, got {num_classes!r}")

    import tf_keras as keras

    factory: Callable[..., Any] = getattr(keras.applications, e.application)
    options = dict(e.options)
    if e.application == "EfficientNetB0":  # its dropout_rate is not a keyword of B0
        from tf_keras.src.applications import efficientnet

        options.pop("dropout_rate")
        factory = functools.partial(
            efficientnet.EfficientNet, 1.0, 1.0, 224, 0.0, model_name="efficientnetb0"
        )
    keras.utils.set_random_seed(seed)
    with fresh_names():
        model = factory(
            weights=None,
            input_shape=(size, size, 3),
            classes=num_classes,
            classifier_activation=None,
            **options,
        )
        model = replace_custom_scale_layers(model)
        model = replace_scalar_layers(model)
    return model, e.from_logits


_SCALAR_OPS = {"__operators__.add": "add", "math.multiply": "mul"}


def replace_scalar_layers(model: Any) -> Any:
    """``model`` with scalar arithmetic and identity normalisation as ``Rescaling`` layers.

    MobileNetV3's hard-sigmoid is ``ReLU6(x + 3) * (1/6)`` written with TF operators, which
    Keras records as ``TFOpLambda`` layers (Python-only: TF.js and the converters cannot
    carry them); each ``x + c`` becomes ``Rescaling(1, c)`` and ``x * c`` becomes
    ``Rescaling(c, 0)``, named ``<op>_const[_k]``. EfficientNet's ``Normalization`` holds
    mean 0 and variance 1 without ImageNet weights (the identity) and becomes
    ``Rescaling(1, 0)`` under its own name; one with other statistics is left alone (and
    refused downstream, naming it). Same arithmetic; weights are copied by layer name.
    """
    config = model.get_config()
    layers = config.get("layers")
    if not isinstance(layers, list):
        return model
    renamed: dict[str, str] = {}
    changed = False
    for layer in layers:
        cls, cfg = layer.get("class_name"), layer["config"]
        rescale = None
        if cls == "TFOpLambda" and cfg.get("function") in _SCALAR_OPS:
            calls = layer["inbound_nodes"]
            kwargs = calls[0][3] if len(calls) == 1 and len(calls[0]) == 4 else {}
            y = kwargs.get("y") if isinstance(kwargs, dict) else None
            if not isinstance(y, (int, float)) or set(kwargs) - {"y", "name"}:
                continue
            op = _SCALAR_OPS[cfg["function"]]
            rescale = (1.0, float(y)) if op == "add" else (float(y), 0.0)
            new_name = layer["name"].replace("tf.__operators__.", "").replace("tf.math.", "")
            new_name = new_name.replace("add", "add_const", 1).replace("multiply", "mul_const", 1)
            renamed[layer["name"]] = new_name
            layer["inbound_nodes"] = [[[*calls[0][:3], {}]]]
        elif cls == "Normalization":
            norm = model.get_layer(layer["name"])
            weights = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in norm.weights}
            if not (
                np.all(weights.get("mean", 1) == 0) and np.all(weights.get("variance", 0) == 1)
            ):
                continue
            rescale = (1.0, 0.0)
            layer["inbound_nodes"] = [
                [ref[:3] + [{}] for ref in call] for call in layer["inbound_nodes"]
            ]
        if rescale is None:
            continue
        changed = True
        name = renamed.get(layer["name"], layer["name"])
        layer["class_name"] = "Rescaling"
        layer.pop("module", None)
        layer.pop("registered_name", None)
        layer["name"] = name
        layer["config"] = {
            "name": name,
            "trainable": True,
            "dtype": cfg.get("dtype", "float32"),
            "scale": rescale[0],
            "offset": rescale[1],
        }
    if not changed:
        return model

    import tf_keras as keras

    def rename(ref: list) -> list:
        return [renamed.get(ref[0], ref[0]), *ref[1:]]

    for layer in layers:  # a call is a list of refs, or (TFOpLambda) one flat ref
        layer["inbound_nodes"] = [
            rename(call) if isinstance(call[0], str) else [rename(ref) for ref in call]
            for call in layer["inbound_nodes"]
        ]
    config["output_layers"] = [rename(ref) for ref in config["output_layers"]]
    return _rebuilt_with_weights(keras, config, model)


@contextlib.contextmanager
def fresh_names() -> Iterator[None]:
    """Auto-generated layer names restart from zero inside, and never collide after.

    tf_keras numbers unnamed layers per graph for the whole process; this swaps in a
    fresh counter for the build and then keeps, per prefix, the larger of the two so
    layers built later still get names unused by either side.
    """
    import tensorflow as tf
    from tf_keras.src import backend

    uids = getattr(backend, "PER_GRAPH_OBJECT_NAME_UIDS", None)
    if uids is None:  # another tf_keras layout: names stay process-dependent
        yield
        return
    # Layers count in the default graph's map, inputs and models in Keras' own graph's.
    graphs = {backend.get_graph(), tf.compat.v1.get_default_graph()}
    saved = {g: uids.get(g) for g in graphs}
    for g in graphs:
        uids[g] = collections.defaultdict(int)
    try:
        yield
    finally:
        for g, before in saved.items():
            if before is None:
                continue
            for prefix, count in uids[g].items():
                before[prefix] = max(before[prefix], count)
            uids[g] = before


def replace_custom_scale_layers(model: Any) -> Any:
    """``model`` with every InceptionResNetV2 ``CustomScaleLayer`` as Rescaling + Add.

    The layer computes ``inputs[0] + inputs[1] * scale``. The rewrite goes through the
    model config (public API) and copies every weight across by layer name, so a trained
    model keeps its values; a model without such layers is returned unchanged.
    """
    config = model.get_config()
    layers = config.get("layers")
    if not isinstance(layers, list) or not any(
        layer.get("class_name") == "CustomScaleLayer" for layer in layers
    ):
        return model

    import tf_keras as keras

    renamed: dict[str, str] = {}  # CustomScaleLayer name -> the Add that replaces it
    new_layers: list[dict] = []
    for layer in layers:
        if layer.get("class_name") != "CustomScaleLayer":
            new_layers.append(layer)
            continue
        (call,) = layer["inbound_nodes"]  # called once, on [block input, residual]
        shortcut, residual = call
        block = residual[0].removesuffix("_conv")
        scale_name, add_name = f"{block}_scale", f"{block}_add"
        scale = float(layer["config"]["scale"])
        dtype = layer["config"].get("dtype", "float32")
        new_layers.append(
            {
                "class_name": "Rescaling",
                "config": {
                    "name": scale_name,
                    "trainable": True,
                    "dtype": dtype,
                    "scale": scale,
                    "offset": 0.0,
                },
                "name": scale_name,
                "inbound_nodes": [[residual]],
            }
        )
        new_layers.append(
            {
                "class_name": "Add",
                "config": {"name": add_name, "trainable": True, "dtype": dtype},
                "name": add_name,
                "inbound_nodes": [[shortcut, [scale_name, 0, 0, {}]]],
            }
        )
        renamed[layer["name"]] = add_name

    def rename(ref: list) -> list:
        return [renamed.get(ref[0], ref[0]), *ref[1:]]

    for layer in new_layers:
        layer["inbound_nodes"] = [[rename(ref) for ref in call] for call in layer["inbound_nodes"]]
    config["layers"] = new_layers
    config["output_layers"] = [rename(ref) for ref in config["output_layers"]]
    return _rebuilt_with_weights(keras, config, model)


def _rebuilt_with_weights(keras: Any, config: dict, model: Any) -> Any:
    """The model of an edited functional ``config``, carrying ``model``'s weights by
    layer name (the edits keep every weighted layer's name)."""
    rebuilt = keras.Model.from_config(config)
    for layer in rebuilt.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return rebuilt
