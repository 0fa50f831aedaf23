"""Where models come from: the built-in ``digits-cnn``, the application zoo, or a file.

``digits-cnn`` is the embedded default: small enough to train in a minute on two
cores, with a BatchNormalization inside the server slice so the demo exercises the
hard part of cross-framework training (BN statistics), and with its natural cut points
named ``a_out`` and ``b_out``.

``digits-bn`` is the same idea with BatchNormalization in every slice (A, B and C, at
the same cuts), so the device runtimes' own BN training and moving statistics are
exercised end to end, not only the server's.
"""

from __future__ import annotations

from pathlib import Path

from ._exceptions import ConverterError

BUILTIN = "digits-cnn"
DIGITS_BN = "digits-bn"
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


def digits_bn(num_classes: int = 10, seed: int = 0):
    """``digits-cnn`` with BatchNormalization in A and C too. Cuts: ``a_out`` | ``b_out``.

    No convolution before a BN has a bias: its exact gradient would be zero, and the
    rounding noise it gets instead is not something two runtimes can agree on (README,
    "Any runtime with Adam"). A's BN has momentum 0.8 so its moving statistics move
    visibly in a few steps; C's BN sits over a 4-D tensor (Keras' fused rule, unbiased
    moving variance), so the single split, whose B holds C's layers, converts too.
    """
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    image = L.Input(DIGITS_INPUT, name="image")
    h = L.Conv2D(8, 3, padding="same", use_bias=False, name="a_conv")(image)
    h = L.BatchNormalization(momentum=0.8, name="a_bn")(h)
    h = L.ReLU(name="a_out")(h)
    h = L.Conv2D(16, 3, padding="same", use_bias=False, name="b_conv1")(h)
    h = L.BatchNormalization(momentum=0.9, name="b_bn1")(h)
    h = L.ReLU(name="b_relu1")(h)
    h = L.MaxPooling2D(2, name="b_pool")(h)
    h = L.Conv2D(16, 3, padding="same", use_bias=False, name="b_conv2")(h)
    h = L.BatchNormalization(momentum=0.9, name="b_bn2")(h)
    h = L.ReLU(name="b_out")(h)
    h = L.Conv2D(16, 3, padding="same", use_bias=False, name="c_conv")(h)
    h = L.BatchNormalization(momentum=0.9, epsilon=1e-3, name="c_bn")(h)
    h = L.ReLU(name="c_relu")(h)
    h = L.Flatten(name="c_flatten")(h)
    logits = L.Dense(num_classes, name="c_logits")(h)
    return keras.Model(image, logits, name="digits_bn")


TABULAR_MLP = "tabular-mlp"
TABULAR_FEATURES = 64


def tabular_mlp(num_classes: int = 10, seed: int = 0):
    """A tabular MLP: 64 float features (the digits, flattened) -> logits; 2-D cuts.

    Every cut tensor is rank 2 (layout NC). No BatchNormalization in B: over rank 2 Keras
    takes its non-fused path, which the server refuses in training (converters/cuts.py).
    Cuts: ``a_out`` | ``b_out``.
    """
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    features = L.Input((TABULAR_FEATURES,), name="features")
    h = L.Dense(48, name="a_dense")(features)
    h = L.ReLU(name="a_out")(h)
    h = L.Dense(32, activation="tanh", name="b_dense1")(h)
    h = L.Dense(32, name="b_dense2")(h)
    h = L.LeakyReLU(0.1, name="b_out")(h)
    logits = L.Dense(num_classes, name="c_logits")(h)
    return keras.Model(features, logits, name="tabular_mlp")


TEXT_CNN = "text-cnn"
TEXT_LENGTH = 16
TEXT_VOCAB = 50


def text_cnn(num_classes: int = 10, seed: int = 0):
    """A text classifier: 16 int32 token ids -> Embedding (A) -> Conv1D and pooling (B) ->
    Dense (C). Cuts: ``a_out`` (the embedded tokens, NWC) | ``b_out`` (NC).

    The device feeds integer ids; only A's float32 embedding crosses the wire (NWC, as
    TensorFlow holds it), and torch B computes its convolutions on NCW.
    """
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    tokens = L.Input((TEXT_LENGTH,), dtype="int32", name="tokens")
    h = L.Embedding(TEXT_VOCAB, 8, name="a_out")(tokens)
    h = L.Conv1D(16, 3, padding="same", activation="relu", name="b_conv1")(h)
    h = L.MaxPooling1D(2, name="b_maxpool")(h)
    h = L.Conv1D(16, 3, padding="valid", name="b_conv2")(h)
    h = L.ReLU(name="b_relu2")(h)
    h = L.AveragePooling1D(2, padding="same", name="b_avgpool")(h)
    top = L.GlobalMaxPooling1D(name="b_gmax")(h)
    mean = L.GlobalAveragePooling1D(name="b_gavg")(h)
    h = L.Concatenate(name="b_out")([top, mean])
    h = L.Dense(16, activation="relu", name="c_dense")(h)
    logits = L.Dense(num_classes, name="c_logits")(h)
    return keras.Model(tokens, logits, name="text_cnn")


# Built-in test models: name -> (builder, natural cuts).
BUILTINS = {
    BUILTIN: (digits_cnn, DIGITS_CUTS),
    DIGITS_BN: (digits_bn, DIGITS_CUTS),
    TABULAR_MLP: (tabular_mlp, DIGITS_CUTS),
    TEXT_CNN: (text_cnn, DIGITS_CUTS),
}


def builtin_cuts(name: str) -> tuple[str, ...]:
    """The natural cut points of a built-in model (double split; the first alone: single)."""
    return BUILTINS[name][1]


def load_model(
    name_or_path: str, input_size: int | None = None, num_classes: int = 10, seed: int = 0
):
    """A tf_keras functional model, and whether its output is logits.

    Returns ``(model, from_logits)``.
    """
    if name_or_path in BUILTINS:
        return BUILTINS[name_or_path][0](num_classes, seed), True
    try:
        from . import zoo
    except ImportError:  # zoo not shipped in this build
        zoo = None
    if zoo is not None and name_or_path in zoo.names():
        return zoo.build(name_or_path, input_size=input_size, num_classes=num_classes, seed=seed)
    path = Path(name_or_path)
    if not path.exists():
        known = [*BUILTINS, *(zoo.names() if zoo is not None else [])]
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
