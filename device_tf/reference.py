"""Unsplit training of the same model: the baseline split training must equal.

Plain Keras (``compile`` + ``train_on_batch``) with the manifest's optimizer and loss,
so the comparison is against what a user would have run without spliteasy.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .keras_util import keras_loss, keras_optimizer


def clone_with_weights(model):
    """An independent copy of a functional model with the same current weights."""
    import tf_keras as keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def train_unsplit(
    model, batches: Iterable[tuple[np.ndarray, np.ndarray]], optimizer_spec, loss_spec
) -> list[float]:
    model.compile(optimizer=keras_optimizer(optimizer_spec), loss=keras_loss(loss_spec))
    return [float(model.train_on_batch(x, y)) for x, y in batches]


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, verbose=0, batch_size=256).argmax(-1) == y).mean())
