"""Writes tests/golden/math.json: the math every runtime implements, computed by tf_keras.

One (two-step) optimizer run of SGD (plain, momentum, Nesterov) and Adam; Keras'
BatchNormalization forward/backward in training mode with its moving-statistics update
(fused 4-D and non-fused 2-D); the sparse categorical cross-entropy on logits and on
(unnormalised) probabilities with its gradient; the auxiliary-label transform; and the
other losses (categorical and binary cross-entropy, MSE, MAE) with their gradients.
Small fixed shapes, seeded values. The torch side, the Python TF runtime, TFLite's
update formulas and TF.js assert these within 1e-6 relative (tests/test_golden_math.py,
device_tf/js/test/golden_math.test.mjs). Regenerate with ``make golden``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "math.json"

OPTIMIZERS = {
    "sgd": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0, "nesterov": False},
    "sgd_momentum": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": False},
    "sgd_nesterov": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
    "adam": {
        "name": "adam",
        "learning_rate": 0.01,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
    },
}


def _list(a) -> list:
    return np.asarray(a, np.float32).tolist()


def optimizer_cases(rng: np.random.Generator) -> dict:
    import tensorflow as tf
    import tf_keras as keras

    out = {}
    for key, spec in OPTIMIZERS.items():
        w0 = rng.normal(size=(2, 3)).astype(np.float32)
        grads = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(3)]
        if spec["name"] == "sgd":
            opt = keras.optimizers.SGD(
                learning_rate=spec["learning_rate"],
                momentum=spec["momentum"],
                nesterov=spec["nesterov"],
            )
        else:
            opt = keras.optimizers.Adam(
                learning_rate=spec["learning_rate"],
                beta_1=spec["beta_1"],
                beta_2=spec["beta_2"],
                epsilon=spec["epsilon"],
            )
        var = tf.Variable(w0)
        after = []
        for g in grads:
            opt.apply_gradients([(tf.constant(g), var)])
            after.append(_list(var.numpy()))
        out[key] = {
            "spec": spec,
            "w0": _list(w0),
            "grads": [_list(g) for g in grads],
            "after": after,
        }
    return out


def batchnorm_cases(rng: np.random.Generator) -> dict:
    import tensorflow as tf
    import tf_keras as keras

    out = {}
    for key, shape in {"nhwc_fused": (2, 3, 3, 4), "nc_nonfused": (6, 4)}.items():
        channels = shape[-1]
        x = (rng.normal(size=shape) * 2 + 0.5).astype(np.float32)
        dy = rng.normal(size=shape).astype(np.float32)
        gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        beta = rng.normal(size=channels).astype(np.float32)
        moving_mean = rng.normal(size=channels).astype(np.float32)
        moving_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
        layer.build(shape)
        layer.set_weights([gamma, beta, moving_mean, moving_var])
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        out[key] = {
            "momentum": 0.9,
            "epsilon": 1e-3,
            "unbiased_moving_variance": len(shape) == 4,
            "x": _list(x),
            "dy": _list(dy),
            "gamma": _list(gamma),
            "beta": _list(beta),
            "moving_mean": _list(moving_mean),
            "moving_variance": _list(moving_var),
            "y": _list(y),
            "dx": _list(dx),
            "dgamma": _list(dgamma),
            "dbeta": _list(dbeta),
            "new_moving_mean": _list(layer.moving_mean.numpy()),
            "new_moving_variance": _list(layer.moving_variance.numpy()),
        }
    return out


def loss_cases(rng: np.random.Generator) -> dict:
    import tensorflow as tf
    import tf_keras as keras

    logits = rng.normal(size=(4, 5)).astype(np.float32) * 2
    labels = np.asarray([0, 3, 4, 1], np.int32)
    # probabilities that do not sum to 1 (Keras normalises them) and one tiny entry (clipped)
    probs = (tf.nn.softmax(logits).numpy() * np.float32(1.3)).astype(np.float32)
    probs[2, 4] = 1e-9
    out = {}
    for key, (inputs, from_logits) in {
        "logits": (logits, True),
        "probabilities": (probs, False),
    }.items():
        xt = tf.constant(inputs)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = loss_fn(tf.constant(labels), xt)
        out[key] = {
            "from_logits": from_logits,
            "output": _list(inputs),
            "labels": labels.tolist(),
            "loss": float(np.float32(loss.numpy())),
            "grad": _list(tape.gradient(loss, xt)),
        }
    return out


def more_loss_cases(rng: np.random.Generator) -> dict:
    """Categorical (one-hot and soft targets) and binary (binary and multi-label)
    cross-entropy on logits and on probabilities (unnormalised, and with entries the
    clipping touches), mean squared and mean absolute error (one exact zero difference:
    MAE's gradient there is 0 on every side), each with its gradient."""
    import tensorflow as tf
    import tf_keras as keras

    logits = (rng.normal(size=(4, 5)) * 2).astype(np.float32)
    onehot = np.eye(5, dtype=np.float32)[[0, 3, 4, 1]]
    soft = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
    probs = (tf.nn.softmax(logits).numpy() * np.float32(1.3)).astype(np.float32)
    probs[2, 4] = 1e-9
    multi = (rng.uniform(size=(4, 5)) < 0.4).astype(np.float32)
    sig = tf.sigmoid(logits).numpy().astype(np.float32)
    sig[0, 0], sig[1, 1] = 1e-9, 1.0  # clipped to [eps, 1 - eps]
    binary_logits = (rng.normal(size=(6, 1)) * 2).astype(np.float32)
    binary = np.asarray([[0], [1], [1], [0], [1], [0]], np.float32)
    targets = rng.normal(size=(4, 3)).astype(np.float32)
    preds = rng.normal(size=(4, 3)).astype(np.float32)
    preds[1, 2] = targets[1, 2]
    cases = {
        "categorical_crossentropy/logits_onehot": (
            "categorical_crossentropy",
            True,
            logits,
            onehot,
        ),
        "categorical_crossentropy/logits_soft": ("categorical_crossentropy", True, logits, soft),
        "categorical_crossentropy/probabilities": ("categorical_crossentropy", False, probs, soft),
        "binary_crossentropy/logits_binary": ("binary_crossentropy", True, binary_logits, binary),
        "binary_crossentropy/logits_multilabel": ("binary_crossentropy", True, logits, multi),
        "binary_crossentropy/probabilities": ("binary_crossentropy", False, sig, multi),
        "mean_squared_error": ("mean_squared_error", False, preds, targets),
        "mean_absolute_error": ("mean_absolute_error", False, preds, targets),
    }
    classes = {
        "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
        "binary_crossentropy": keras.losses.BinaryCrossentropy,
        "mean_squared_error": keras.losses.MeanSquaredError,
        "mean_absolute_error": keras.losses.MeanAbsoluteError,
    }
    out = {}
    for key, (name, from_logits, inputs, labels) in cases.items():
        cls = classes[name]
        loss_fn = cls(from_logits=from_logits) if "crossentropy" in name else cls()
        xt = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = loss_fn(tf.constant(labels), xt)
        out[key] = {
            "name": name,
            "from_logits": from_logits,
            "output": _list(inputs),
            "labels": _list(labels),
            "loss": float(np.float32(loss.numpy())),
            "grad": _list(tape.gradient(loss, xt)),
        }
    return out


def aux_label_case(rng: np.random.Generator) -> dict:
    """c_hat = c - dL/dc travels down; the receiver's gradient of 1/2 ||c_hat - c||^2 at c
    is c - c_hat, which must give back dL/dc."""
    c = rng.normal(size=(2, 3)).astype(np.float32)
    g = (rng.normal(size=(2, 3)) * 1e-2).astype(np.float32)
    c_hat = c - g
    return {"c": _list(c), "grad": _list(g), "c_hat": _list(c_hat), "grad_back": _list(c - c_hat)}


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rng = np.random.default_rng(20261201)
    golden = {
        "$comment": "generated by tests/golden/make_math.py from tf_keras; do not edit",
        "optimizers": optimizer_cases(rng),
        "batchnorm": batchnorm_cases(rng),
        "sparse_categorical_crossentropy": loss_cases(rng),
        "aux_label": aux_label_case(rng),
        # its own generator, so adding these left every earlier case's numbers as they were
        "losses": more_loss_cases(np.random.default_rng(20261209)),
    }
    OUT.write_text(json.dumps(golden) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
