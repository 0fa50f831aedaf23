"""Which loss a bundle trains with: the user's compiled model's, else ``--loss``.

Every side that holds the labels implements the same five tf_keras losses (see
``device_tf/losses.py`` for the table); the bundle's manifest names one of them with its
``from_logits``. A model saved after ``model.compile(loss=...)`` carries its loss; it is
taken as compiled (a string loss such as ``"binary_crossentropy"`` means
``from_logits=False``, as in tf_keras). A compiled loss spliteasy cannot reproduce on
every side (another loss, label smoothing, another axis or reduction) is refused naming
it, rather than silently trained as something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared_schema import LossSpec
from shared_schema.manifest import SCORE_LOSSES

from ._exceptions import ConverterError

# Names and aliases tf_keras accepts for the five losses -> the manifest's name.
ALIASES = {
    "sparse_categorical_crossentropy": "sparse_categorical_crossentropy",
    "categorical_crossentropy": "categorical_crossentropy",
    "binary_crossentropy": "binary_crossentropy",
    "mean_squared_error": "mean_squared_error",
    "mse": "mean_squared_error",
    "mean_absolute_error": "mean_absolute_error",
    "mae": "mean_absolute_error",
}
# tf_keras loss classes -> the manifest's name
CLASSES = {
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "CategoricalCrossentropy": "categorical_crossentropy",
    "BinaryCrossentropy": "binary_crossentropy",
    "MeanSquaredError": "mean_squared_error",
    "MeanAbsoluteError": "mean_absolute_error",
}
# Configuration a loss object may hold with its tf_keras default; anything else is refused.
NEUTRAL = {
    "label_smoothing": 0.0,
    "axis": -1,
    "ignore_class": None,
    "reduction": ("auto", "sum_over_batch_size"),
    "name": None,
    "fn": None,
}


def output_activation(model: Any) -> str:
    """The name of the last layer's activation ('linear' when it has none)."""
    activation = getattr(model.layers[-1], "activation", None)
    return getattr(activation, "__name__", "linear")


def loss_spec(name: str, model: Any, from_logits: bool | None = None) -> LossSpec:
    """``--loss NAME`` for ``model``: ``from_logits`` unless given is whether the output
    is raw scores (no softmax or sigmoid on the last layer)."""
    canonical = ALIASES.get(name.lower())
    if canonical is None:
        raise ConverterError(
            f"unknown loss {name!r}; spliteasy trains {', '.join(sorted(set(ALIASES.values())))}"
        )
    if canonical not in SCORE_LOSSES:
        if from_logits:
            raise ConverterError(f"--from-logits does not apply to {canonical}")
        return LossSpec(name=canonical, from_logits=False)
    if from_logits is None:
        from_logits = output_activation(model) not in ("softmax", "sigmoid")
    return LossSpec(name=canonical, from_logits=from_logits)


def compiled_loss(path: Path | str) -> LossSpec | None:
    """The loss a saved tf_keras model was compiled with, or None (not compiled, or not a
    file tf_keras can load compiled)."""
    import tf_keras as keras

    try:
        model = keras.models.load_model(path, compile=True)
    except Exception:  # not compiled, custom objects, ...: the caller falls back to --loss
        return None
    loss = getattr(model, "loss", None)
    if loss is None:
        return None
    return spec_of_keras_loss(loss)


def spec_of_keras_loss(loss: Any) -> LossSpec:
    """A tf_keras loss (string, function or ``Loss`` object) as a manifest ``LossSpec``."""
    if isinstance(loss, dict | list | tuple):
        raise ConverterError("the model is compiled with several losses; spliteasy trains one")
    if isinstance(loss, str):
        name = ALIASES.get(loss.lower())
        if name is None:
            raise ConverterError(
                f"the model is compiled with loss {loss!r}, which spliteasy does not train; pass --loss"
            )
        return LossSpec(name=name, from_logits=False)  # tf_keras' string losses take probabilities
    cls = type(loss).__name__
    if cls in CLASSES:
        config = loss.get_config()
        for key, value in config.items():
            if key == "from_logits" or key not in NEUTRAL:
                if key != "from_logits" and value not in (None, 0, 0.0, -1, False):
                    raise ConverterError(
                        f"the model's {cls} has {key}={value!r}, which spliteasy does not train"
                    )
                continue
            neutral = NEUTRAL[key]
            ok = (
                value in neutral
                if isinstance(neutral, tuple)
                else (neutral is None or value == neutral)
            )
            if not ok:
                raise ConverterError(
                    f"the model's {cls} has {key}={value!r}, which spliteasy does not train"
                )
        name = CLASSES[cls]
        return LossSpec(
            name=name, from_logits=bool(config.get("from_logits", False)) and name in SCORE_LOSSES
        )
    fn_name = getattr(loss, "__name__", cls)
    name = ALIASES.get(fn_name.lower())
    if name is None:
        raise ConverterError(
            f"the model is compiled with loss {fn_name!r}, which spliteasy does not train; pass --loss"
        )
    return LossSpec(name=name, from_logits=False)
