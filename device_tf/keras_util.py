"""Small tf_keras helpers the device and the converters share."""

from __future__ import annotations

from shared_schema.naming import named_variables

__all__ = ["keras_loss", "keras_optimizer", "named_variables"]


def keras_optimizer(spec):
    """The tf_keras optimizer a manifest names, with its exact hyper-parameters.

    The server's ``KerasSGD``/``KerasAdam`` implement these same update formulas.
    """
    import tf_keras as keras

    if spec.name == "sgd":
        return keras.optimizers.SGD(
            learning_rate=spec.learning_rate, momentum=spec.momentum, nesterov=spec.nesterov
        )
    return keras.optimizers.Adam(
        learning_rate=spec.learning_rate,
        beta_1=spec.beta_1,
        beta_2=spec.beta_2,
        epsilon=spec.epsilon,
    )


def keras_loss(spec):
    """The tf_keras loss the manifest names (``device_tf.losses``)."""
    from .losses import keras_loss as _keras_loss

    return _keras_loss(spec)
