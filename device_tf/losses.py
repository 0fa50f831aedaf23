"""The losses a bundle may train with, on the Python TF device, and how a run is scored.

The loss *is* tf_keras' own loss object (``keras_loss``), so the Python TF runtime is
tf_keras by construction; the other sides that hold labels reimplement the same
formulas and are checked against tf_keras on ``tests/golden/math.json``: TFLite traces
these same objects into its ``train`` signature (``converters/export/tflite.py``), TF.js
has ``device_tf/js/src/losses.mjs``, the torch server (single split) ``server_torch/
trainer.py``.

Names (``manifest.loss.name``) and labels (``manifest.labels``):

==================================  ==========================  ==============================
loss                                 labels                      validation score
==================================  ==========================  ==============================
sparse_categorical_crossentropy      int32 class index, (N,)     accuracy (argmax)
categorical_crossentropy             float32 one-hot, (N, K)     accuracy (argmax of both)
binary_crossentropy                  float32 in [0, 1], (N, K)   binary accuracy (threshold 0.5,
                                                                 or 0 on logits), per element
mean_squared_error                   float32 targets, (N, K)     mean squared error
mean_absolute_error                  float32 targets, (N, K)     mean absolute error
==================================  ==========================  ==============================
"""

from __future__ import annotations

import numpy as np

LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
)


def keras_loss(spec):
    """The tf_keras loss object ``spec`` (a manifest ``LossSpec``) names, reduction
    ``SUM_OVER_BATCH_SIZE`` (the mean over the batch), as ``model.compile`` would use."""
    import tf_keras as keras

    name = getattr(spec, "name", "sparse_categorical_crossentropy")
    from_logits = bool(getattr(spec, "from_logits", True))
    if name == "sparse_categorical_crossentropy":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    if name == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(from_logits=from_logits)
    if name == "binary_crossentropy":
        return keras.losses.BinaryCrossentropy(from_logits=from_logits)
    if name == "mean_squared_error":
        return keras.losses.MeanSquaredError()
    if name == "mean_absolute_error":
        return keras.losses.MeanAbsoluteError()
    raise ValueError(f"unknown loss {name!r}; spliteasy trains {', '.join(LOSSES)}")


def metric_name(spec) -> str:
    """What :func:`score` measures for this loss (printed beside each epoch)."""
    name = getattr(spec, "name", "sparse_categorical_crossentropy")
    return {
        "binary_crossentropy": "binary accuracy",
        "mean_squared_error": "mean squared error",
        "mean_absolute_error": "mean absolute error",
    }.get(name, "accuracy")


def score(spec, outputs: np.ndarray, y: np.ndarray) -> float:
    """The validation score of model ``outputs`` against labels ``y`` (see the table)."""
    name = getattr(spec, "name", "sparse_categorical_crossentropy")
    outputs = np.asarray(outputs)
    y = np.asarray(y)
    if name == "sparse_categorical_crossentropy":
        return float((outputs.argmax(-1) == y.reshape(-1)).mean())
    if name == "categorical_crossentropy":
        return float((outputs.argmax(-1) == y.argmax(-1)).mean())
    if name == "binary_crossentropy":
        threshold = 0.0 if getattr(spec, "from_logits", True) else 0.5
        return float(((outputs > threshold) == (y > 0.5)).mean())
    diff = outputs.astype(np.float64) - y.astype(np.float64)
    if name == "mean_squared_error":
        return float(np.mean(diff**2))
    return float(np.mean(np.abs(diff)))
