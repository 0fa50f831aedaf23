"""Small tf_keras helpers the device and the converters share."""

from __future__ import annotations


def named_variables(model) -> dict[str, object]:
    """Variables keyed ``layer/variable`` (e.g. ``b_bn1/moving_mean``), in model order.

    Keras' own ``variable.name`` depends on the name scope a layer was built in (a model
    rebuilt from config loses it), so spliteasy names variables by layer itself; the
    names are equal in the unsplit model and in the slice that holds the layer.
    """
    out: dict[str, object] = {}
    for layer in model.layers:
        for var in layer.weights:
            short = var.name.split("/")[-1].split(":")[0]
            out[f"{layer.name}/{short}"] = var
    return out


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
    import tf_keras as keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=spec.from_logits)
