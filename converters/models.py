"""Where models come from: the built-in ``digits-cnn``, the application zoo, or a file.

``digits-cnn`` is the embedded default: small enough to train in a minute on two
cores, with a BatchNormalization inside the server slice so the demo exercises the
hard part of cross-framework training (BN statistics), and with its natural cut points
named ``a_out`` and ``b_out``.
"""

from __future__ import annotations

from pathlib import Path

from ._exceptions import ConverterError

BUILTIN = "digits-cnn"
DIGITS_CUTS = ("a_out", "b_out")
DIGITS_INPUT = (8, 8, 1)


def digits_cnn(num_classes: int = 10, seed: int = 0):
    """Input 8x8x1 (scikit-learn's digits) -> logits. Cuts: ``a_out`` | ``b_out``."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    image = L.Input(DIGITS_INPUT, name="image")
    h = L.Conv2D(16, 3, padding="same", name="a_conv")(image)
    h = L.ReLU(name="a_out")(h)
    h = L.Conv2D(32, 3, padding="same", use_bias=False, name="b_conv1")(h)
    h = L.BatchNormalization(momentum=0.9, name="b_bn1")(h)
    h = L.ReLU(name="b_relu1")(h)
    h = L.MaxPooling2D(2, name="b_pool")(h)
    h = L.Conv2D(32, 3, padding="same", use_bias=False, name="b_conv2")(h)
    h = L.BatchNormalization(momentum=0.9, name="b_bn2")(h)
    h = L.ReLU(name="b_out")(h)
    h = L.Flatten(name="c_flatten")(h)
    logits = L.Dense(num_classes, name="c_logits")(h)
    return keras.Model(image, logits, name="digits_cnn")


def load_model(
    name_or_path: str, input_size: int | None = None, num_classes: int = 10, seed: int = 0
):
    """A tf_keras functional model, and whether its output is logits.

    Returns ``(model, from_logits)``.
    """
    if name_or_path == BUILTIN:
        return digits_cnn(num_classes, seed), True
    try:
        from . import zoo
    except ImportError:  # zoo not shipped in this build
        zoo = None
    if zoo is not None and name_or_path in zoo.names():
        return zoo.build(name_or_path, input_size=input_size, num_classes=num_classes, seed=seed)
    path = Path(name_or_path)
    if not path.exists():
        known = [BUILTIN, *(zoo.names() if zoo is not None else [])]
        raise ConverterError(
            f"unknown model {name_or_path!r}: not a file and not one of {', '.join(known)}"
        )
    import tf_keras as keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # the toolchain's own errors, translated at the boundary
        raise ConverterError(f"cannot load tf_keras model {path}: {exc}") from exc
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise ConverterError(f"{path}: only functional/sequential tf_keras models can be split")
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    from_logits = getattr(activation, "__name__", "linear") != "softmax"
    return model, from_logits
