"""Every runtime's math against tf_keras' own numbers (tests/golden/math.json).

The golden file is computed once by tf_keras (tests/golden/make_math.py, ``make golden``);
here the torch side (server_torch.keras_compat, the trainer's loss and aux-label
transform), the Python TF runtime's optimizer/loss (device_tf.keras_util) and TFLite's
update formulas (converters.export.tflite.keras_update) must reproduce it within 1e-6
relative (to the largest magnitude of each tensor). TF.js: device_tf/js/test/golden_math.test.mjs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared_schema import AdamSpec, LossSpec, SGDSpec

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden" / "math.json").read_text())
TOL = 1e-6
OPTIMIZERS = sorted(GOLDEN["optimizers"])


def assert_close(got, want, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    err = float(np.abs(got - want).max(initial=0.0)) / scale
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL:.0e}"


def spec_of(case: dict) -> SGDSpec | AdamSpec:
    spec = dict(case["spec"])
    return SGDSpec(**spec) if spec["name"] == "sgd" else AdamSpec(**spec)


# --- torch (server) -----------------------------------------------------------------


@pytest.mark.parametrize("key", OPTIMIZERS)
def test_torch_optimizer(key: str) -> None:
    torch = pytest.importorskip("torch")
    from server_torch.trainer import build_optimizer

    case = GOLDEN["optimizers"][key]
    w = torch.nn.Parameter(torch.tensor(case["w0"]))
    opt = build_optimizer(spec_of(case), [w])
    for i, g in enumerate(case["grads"]):
        w.grad = torch.tensor(g)
        opt.step()
        assert_close(w.detach().numpy(), case["after"][i], f"torch {key} step {i + 1}")


@pytest.mark.parametrize("key", sorted(GOLDEN["batchnorm"]))
def test_torch_batchnorm(key: str) -> None:
    torch = pytest.importorskip("torch")
    from server_torch.keras_compat import KerasBatchNorm

    case = GOLDEN["batchnorm"][key]
    x = np.asarray(case["x"], np.float32)
    channels = x.shape[-1]
    bn = KerasBatchNorm(
        channels,
        case["momentum"],
        case["epsilon"],
        unbiased_running_var=case["unbiased_moving_variance"],
    )
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(case["gamma"]))
        bn.bias.copy_(torch.tensor(case["beta"]))
        bn.running_mean.copy_(torch.tensor(case["moving_mean"]))
        bn.running_var.copy_(torch.tensor(case["moving_variance"]))
    bn.train()
    # torch holds channels on axis 1: NHWC -> NCHW and back, as the trainer does
    to_t = (lambda a: a.permute(0, 3, 1, 2)) if x.ndim == 4 else (lambda a: a)
    to_k = (lambda a: a.permute(0, 2, 3, 1)) if x.ndim == 4 else (lambda a: a)
    xt = to_t(torch.tensor(x)).contiguous().requires_grad_(True)
    y = bn(xt)
    y.backward(to_t(torch.tensor(case["dy"])))
    assert_close(to_k(y.detach()).numpy(), case["y"], f"torch BN {key} y")
    assert_close(to_k(xt.grad).numpy(), case["dx"], f"torch BN {key} dx")
    assert_close(bn.weight.grad.numpy(), case["dgamma"], f"torch BN {key} dgamma")
    assert_close(bn.bias.grad.numpy(), case["dbeta"], f"torch BN {key} dbeta")
    assert_close(bn.running_mean.numpy(), case["new_moving_mean"], f"torch BN {key} mean")
    assert_close(bn.running_var.numpy(), case["new_moving_variance"], f"torch BN {key} var")


@pytest.mark.parametrize("key", sorted(GOLDEN["sparse_categorical_crossentropy"]))
def test_torch_loss(key: str) -> None:
    torch = pytest.importorskip("torch")
    from server_torch.trainer import keras_sparse_ce

    case = GOLDEN["sparse_categorical_crossentropy"][key]
    out = torch.tensor(case["output"], requires_grad=True)
    loss = keras_sparse_ce(
        out, torch.tensor(case["labels"]).long(), LossSpec(from_logits=case["from_logits"])
    )
    loss.backward()
    assert_close(loss.item(), case["loss"], f"torch loss {key}")
    assert_close(out.grad.numpy(), case["grad"], f"torch loss gradient {key}")


def test_aux_label_transform() -> None:
    """Device side c_hat = c - g (device_tf.loop), server side c - c_hat (trainer)."""
    torch = pytest.importorskip("torch")
    case = GOLDEN["aux_label"]
    c, g = np.asarray(case["c"], np.float32), np.asarray(case["grad"], np.float32)
    assert_close(c - g, case["c_hat"], "device c_hat")
    c_t, c_hat_t = torch.tensor(case["c"]), torch.tensor(case["c_hat"])
    assert_close((c_t.detach() - c_hat_t).numpy(), case["grad_back"], "server c - c_hat")
    # c - (c - g) == g up to c's rounding: relative to |c|, not to the (smaller) gradient
    err = np.abs(np.subtract(case["grad_back"], case["grad"])).max() / np.abs(c).max()
    assert err <= TOL, f"round trip gives the gradient back: {err:.2e} relative to |c|"


LOSSES = sorted(GOLDEN["losses"])


def _loss_spec(case: dict) -> LossSpec:
    return LossSpec(name=case["name"], from_logits=case["from_logits"])


@pytest.mark.parametrize("key", LOSSES)
def test_torch_more_losses(key: str) -> None:
    """The single-split server's losses (server_torch/losses.py) against tf_keras."""
    torch = pytest.importorskip("torch")
    from server_torch.losses import keras_loss

    case = GOLDEN["losses"][key]
    out = torch.tensor(case["output"], requires_grad=True)
    loss = keras_loss(out, torch.tensor(case["labels"]), _loss_spec(case))
    loss.backward()
    assert_close(loss.item(), case["loss"], f"torch {key}")
    assert_close(out.grad.numpy(), case["grad"], f"torch {key} gradient")


@pytest.mark.parametrize("key", LOSSES)
def test_tf_and_tflite_more_losses(key: str) -> None:
    """The Python TF runtime's loss (device_tf.losses) and the loss object TFLite traces
    into C's train signature (converters.export.tflite), eagerly and inside a tf.function."""
    tf = pytest.importorskip("tensorflow")
    import tf_keras

    from converters.export.tflite import keras_loss_object
    from device_tf.losses import keras_loss

    case = GOLDEN["losses"][key]
    out = tf.constant(case["output"], tf.float32)
    labels = tf.constant(case["labels"], tf.float32)
    for what, fn in (
        ("TF runtime", keras_loss(_loss_spec(case))),
        ("TFLite", tf.function(keras_loss_object(tf_keras, _loss_spec(case)))),
    ):
        with tf.GradientTape() as tape:
            tape.watch(out)
            loss = fn(labels, out)
        assert_close(loss.numpy(), case["loss"], f"{what} {key}")
        assert_close(tape.gradient(loss, out).numpy(), case["grad"], f"{what} {key} gradient")


# --- Python TF runtime and TFLite's formulas -----------------------------------------


@pytest.mark.parametrize("key", OPTIMIZERS)
def test_tf_runtime_optimizer(key: str) -> None:
    tf = pytest.importorskip("tensorflow")
    from device_tf.keras_util import keras_optimizer

    case = GOLDEN["optimizers"][key]
    var = tf.Variable(np.asarray(case["w0"], np.float32))
    opt = keras_optimizer(spec_of(case))
    for i, g in enumerate(case["grads"]):
        opt.apply_gradients([(tf.constant(g, tf.float32), var)])
        assert_close(var.numpy(), case["after"][i], f"TF {key} step {i + 1}")


@pytest.mark.parametrize("key", sorted(GOLDEN["sparse_categorical_crossentropy"]))
def test_tf_runtime_loss(key: str) -> None:
    tf = pytest.importorskip("tensorflow")
    from device_tf.keras_util import keras_loss

    case = GOLDEN["sparse_categorical_crossentropy"][key]
    out = tf.constant(case["output"], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(out)
        loss = keras_loss(LossSpec(from_logits=case["from_logits"]))(
            tf.constant(case["labels"]), out
        )
    assert_close(loss.numpy(), case["loss"], f"TF loss {key}")
    assert_close(tape.gradient(loss, out).numpy(), case["grad"], f"TF loss gradient {key}")


@pytest.mark.parametrize("key", OPTIMIZERS)
def test_tflite_update_formulas(key: str) -> None:
    tf = pytest.importorskip("tensorflow")
    from converters.export.tflite import keras_update

    case = GOLDEN["optimizers"][key]
    spec = spec_of(case)
    var = tf.Variable(np.asarray(case["w0"], np.float32))
    zeros = np.zeros_like(case["w0"], np.float32)
    slots = [tf.Variable(zeros) for _ in range(1 if spec.name == "sgd" else 2)]
    lr = tf.constant(spec.learning_rate, tf.float32)
    for i, g in enumerate(case["grads"]):
        t = tf.constant(float(i + 1), tf.float32)
        keras_update(tf, spec, var, tf.constant(g, tf.float32), slots, t, lr)
        assert_close(var.numpy(), case["after"][i], f"TFLite {key} step {i + 1}")
