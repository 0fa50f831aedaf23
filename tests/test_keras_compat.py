"""The torch side follows Keras' formulas: optimizers and BatchNorm, against tf_keras itself."""

from __future__ import annotations

import numpy as np
import pytest

import split_helpers  # noqa: F401  (quiet TF logs)


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0},
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9},
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
        {"name": "adam", "learning_rate": 0.01},
        {"name": "adam", "learning_rate": 0.01, "beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3},
    ],
)
def test_optimizers_match_tf_keras_step_for_step(cfg):
    import tensorflow as tf
    import torch

    from device_tf.keras_util import keras_optimizer
    from server_torch.trainer import build_optimizer
    from split_helpers import optimizer_spec

    spec = optimizer_spec(cfg)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) * 10.0 ** -(i % 4) for i in range(10)]
    tf_var = tf.Variable(w0)
    tf_opt = keras_optimizer(spec)
    torch_param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    torch_opt = build_optimizer(spec, [torch_param])
    for g in grads:
        tf_opt.apply_gradients([(tf.constant(g), tf_var)])
        torch_param.grad = torch.from_numpy(g)
        torch_opt.step()
    expected = tf_var.numpy()
    got = torch_param.detach().numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-6


@pytest.mark.parametrize("shape", [(16, 4, 4, 6), (16, 6)], ids=["fused-4d", "dense-2d"])
def test_keras_batchnorm_matches_tf_keras_training_and_inference(shape):
    import tf_keras as keras
    import torch

    from server_torch.keras_compat import KerasBatchNorm

    rng = np.random.default_rng(1)
    layer = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-3)
    layer.build(shape)
    gamma, beta = rng.uniform(0.5, 1.5, shape[-1]), rng.normal(size=shape[-1])
    layer.set_weights([gamma, beta, np.zeros(shape[-1]), np.ones(shape[-1])])
    bn = KerasBatchNorm(shape[-1], momentum=0.8, epsilon=1e-3, unbiased_running_var=len(shape) == 4)
    bn.weight.data = torch.tensor(gamma, dtype=torch.float32)
    bn.bias.data = torch.tensor(beta, dtype=torch.float32)
    to_t = (
        (lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()))
        if len(shape) == 4
        else torch.from_numpy
    )
    from_t = (
        (lambda t: t.detach().numpy().transpose(0, 2, 3, 1))
        if len(shape) == 4
        else (lambda t: t.detach().numpy())
    )
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
        out_k = layer(x, training=True).numpy()
        out_t = from_t(bn.train()(to_t(x)))
        assert np.abs(out_k - out_t).max() < 1e-4
    assert np.allclose(bn.running_mean.numpy(), layer.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(bn.running_var.numpy(), layer.moving_variance.numpy(), rtol=1e-5, atol=1e-6)
    x = rng.normal(size=shape).astype(np.float32)
    assert np.abs(layer(x, training=False).numpy() - from_t(bn.eval()(to_t(x)))).max() < 1e-4
