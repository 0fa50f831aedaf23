"""TFLite device slices train exactly like the same slices in unsplit tf_keras.

The split chain is A (TFLite) -> B (a fixed Keras function standing in for the server)
-> C (TFLite), driven through ``TFLiteRuntime`` the way the step loop drives it. The
reference trains the unsplit composition A -> B -> C in tf_keras with Keras' own
optimizer inside a ``tf.function`` (as ``fit`` does), from the same initial weights on
the same batches. Losses, final weights, BN moving statistics and inference outputs
must agree within 1e-4 relative.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Plain imports: a broken TensorFlow install must fail these tests, not skip them.
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from converters._exceptions import ConverterError, UnsupportedLayer  # noqa: E402
from converters.export.tflite import export_tflite  # noqa: E402
from device_tf.keras_util import named_variables  # noqa: E402
from device_tf.tflite_runtime import (  # noqa: E402
    TFLiteInputError,
    TFLiteRuntime,
    TFLiteRuntimeError,
)
from shared_schema import AdamSpec, LossSpec, SGDSpec, SpliteasyError  # noqa: E402

BATCHES = [16, 16, 16, 16, 7]  # the last one partial, as the last batch of an epoch is
RTOL = 1e-4


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    return x, d.target.astype(np.int32)


def _models(softmax: bool, l2: bool, seed: int = 7) -> tuple:
    """A: Conv+BN+ReLU (NHWC cut); B: fixed 1x1 conv + tanh; C: Conv+BN+ReLU+GAP+Dense."""
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(1e-3) if l2 else None
    inp = keras.Input((8, 8, 1), name="image")
    # No conv bias in front of BN: its true gradient is zero, so what it gets is rounding
    # noise, which Adam scales up to full-size steps that no two runtimes share.
    h = keras.layers.Conv2D(
        4, 3, padding="same", use_bias=False, kernel_regularizer=reg, name="a_conv"
    )(inp)
    h = keras.layers.BatchNormalization(name="a_bn")(h)
    a_model = keras.Model(inp, keras.layers.ReLU(name="a_relu")(h), name="A")

    inp = keras.Input((8, 8, 4), name="a")
    b_model = keras.Model(
        inp, keras.layers.Conv2D(6, 1, activation="tanh", name="b_conv")(inp), name="B"
    )
    b_model.trainable = False

    inp = keras.Input((8, 8, 6), name="b")
    h = keras.layers.Conv2D(5, 3, use_bias=False, name="c_conv")(inp)
    h = keras.layers.BatchNormalization(momentum=0.9, name="c_bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(
        10, activation="softmax" if softmax else None, kernel_regularizer=reg, name="c_dense"
    )(h)
    c_model = keras.Model(inp, out, name="C")
    return a_model, b_model, c_model


def _keras_optimizer(spec: SGDSpec | AdamSpec):
    if spec.name == "sgd":
        return keras.optimizers.SGD(
            spec.learning_rate, momentum=spec.momentum, nesterov=spec.nesterov
        )
    return keras.optimizers.Adam(spec.learning_rate, spec.beta_1, spec.beta_2, epsilon=spec.epsilon)


def _reference(a_model, b_model, c_model, loss: LossSpec, spec, batches):
    """Unsplit tf_keras training of A -> B -> C, the way ``fit`` steps."""
    opt = _keras_optimizer(spec)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=loss.from_logits)
    variables = a_model.trainable_weights + c_model.trainable_weights

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 8, 8, 1], tf.float32),
            tf.TensorSpec([None], tf.int32),
        ]
    )
    def step(x, y):
        with tf.GradientTape() as tape:
            out = c_model(b_model(a_model(x, training=True), training=False), training=True)
            # What the device reports: C's loss incl. C's regularisation. A's penalty
            # reaches A's gradients on the device but is in no reported number.
            reported = loss_fn(y, out) + tf.add_n([tf.zeros([]), *c_model.losses])
            total = reported + tf.add_n([tf.zeros([]), *a_model.losses])
        opt.apply_gradients(zip(tape.gradient(total, variables), variables, strict=True))
        return reported

    return [float(step(x, y)) for x, y in batches]


def _b_forward_backward(b_model):
    """The server stand-in: b = B(a) and, later, g_a from g_b."""

    def forward(a):
        a_t = tf.constant(a)
        with tf.GradientTape() as tape:
            tape.watch(a_t)
            b = b_model(a_t, training=False)

        def backward(g_b):
            return tape.gradient(b, a_t, output_gradients=tf.constant(g_b)).numpy()

        return b.numpy(), backward

    return forward


def _split_step(rt: TFLiteRuntime, b_fwd, x, y) -> float:
    a = rt.a_forward(x)
    b, b_bwd = b_fwd(a)
    loss, g_b = rt.c_train(b, y)
    rt.a_backward(b_bwd(g_b))
    return loss


def _batches(sizes=BATCHES, offset=0):
    x, y = _digits()
    out, i = [], offset
    for n in sizes:
        out.append((x[i : i + n], y[i : i + n]))
        i += n
    return out


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest error relative to the array's scale (floored so near-zero arrays are
    judged on an absolute 1e-6)."""
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-2))


def _export_pair(tmp: Path, a_model, c_model, loss, spec) -> tuple[Path, Path]:
    a_path, c_path = tmp / "A" / "model.tflite", tmp / "C" / "model.tflite"
    export_tflite(a_model, a_path, "A", loss, spec)
    export_tflite(c_model, c_path, "C", loss, spec)
    return a_path, c_path


CASES = {
    "sgd-momentum-logits": (
        SGDSpec(learning_rate=0.1, momentum=0.9),
        LossSpec(from_logits=True),
        False,
    ),
    "sgd-nesterov-softmax-l2": (
        SGDSpec(learning_rate=0.1, momentum=0.9, nesterov=True),
        LossSpec(from_logits=False),
        True,
    ),
    "adam-logits": (AdamSpec(learning_rate=0.01, epsilon=1e-7), LossSpec(from_logits=True), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tflite_split_training_matches_unsplit_keras(case: str, tmp_path: Path) -> None:
    spec, loss, l2 = CASES[case]
    softmax = not loss.from_logits
    a_model, b_model, c_model = _models(softmax, l2)
    initial = {
        part: {k: v.numpy() for k, v in named_variables(m).items()}
        for part, m in (("A", a_model), ("C", c_model))
    }
    a_path, c_path = _export_pair(tmp_path, a_model, c_model, loss, spec)
    rt = TFLiteRuntime(a_path, c_path)

    # The file carries the Keras model's weights as its initial state.
    w0 = rt.weights()
    for part in ("A", "C"):
        assert list(w0[part]) == list(initial[part])
        for name, ref in initial[part].items():
            np.testing.assert_array_equal(w0[part][name], ref)

    batches = _batches()
    b_fwd = _b_forward_backward(b_model)
    split_losses = [_split_step(rt, b_fwd, x, y) for x, y in batches]
    ref_losses = _reference(a_model, b_model, c_model, loss, spec, batches)

    for step, (got, ref) in enumerate(zip(split_losses, ref_losses, strict=True)):
        assert abs(got - ref) <= RTOL * abs(ref), f"step {step}: tflite {got} vs keras {ref}"
    assert split_losses[-1] != split_losses[0]  # it did train

    final = rt.weights()
    for part, model in (("A", a_model), ("C", c_model)):
        named = named_variables(model)
        assert list(final[part]) == list(named)
        for name, var in named.items():
            got, ref = final[part][name], var.numpy()
            assert got.shape == ref.shape, name
            assert _rel(got, ref) <= RTOL, f"{part} {name}: rel error {_rel(got, ref):.2e}"
        # Moving statistics moved (and, by the comparison above, exactly once per step).
        bn = [v for n, v in named.items() if n.endswith("/moving_mean")][0]
        assert np.abs(bn.numpy()).max() > 0

    x_test, _ = _batches([32], offset=1000)[0]
    a_inf = rt.a_infer(x_test)
    a_ref = a_model(x_test, training=False).numpy()
    assert _rel(a_inf, a_ref) <= RTOL
    b_test = b_model(a_ref, training=False).numpy()
    assert _rel(rt.c_infer(b_test), c_model(b_test, training=False).numpy()) <= RTOL


@pytest.fixture(scope="module")
def adam_bundle(tmp_path_factory) -> tuple[Path, Path, object]:
    a_model, b_model, c_model = _models(softmax=False, l2=False, seed=11)
    tmp = tmp_path_factory.mktemp("tflite-adam")
    spec = AdamSpec(learning_rate=0.01)
    a_path, c_path = _export_pair(tmp, a_model, c_model, LossSpec(from_logits=True), spec)
    return a_path, c_path, b_model


def _same_weights(w1: dict, w2: dict) -> bool:
    return w1.keys() == w2.keys() and all(
        w1[p].keys() == w2[p].keys() and all(np.array_equal(w1[p][k], w2[p][k]) for k in w1[p])
        for p in w1
    )


def test_save_restore_round_trip_restores_every_variable(adam_bundle, tmp_path: Path) -> None:
    a_path, c_path, b_model = adam_bundle
    rt = TFLiteRuntime(a_path, c_path)
    b_fwd = _b_forward_backward(b_model)
    batches = _batches([16] * 5)
    for x, y in batches[:2]:
        _split_step(rt, b_fwd, x, y)
    rt.save(tmp_path / "ckpt")
    saved = rt.weights()

    first = [_split_step(rt, b_fwd, x, y) for x, y in batches[2:]]
    after_first = rt.weights()
    assert not _same_weights(saved, after_first)

    rt.restore(tmp_path / "ckpt")
    assert _same_weights(rt.weights(), saved)
    # Identical continuation proves the Adam moments and step count came back too.
    again = [_split_step(rt, b_fwd, x, y) for x, y in batches[2:]]
    assert again == first
    assert _same_weights(rt.weights(), after_first)

    # A fresh interpreter restored from the checkpoint continues the same way.
    rt2 = TFLiteRuntime(a_path, c_path)
    rt2.restore(tmp_path / "ckpt")
    assert [_split_step(rt2, b_fwd, x, y) for x, y in batches[2:]] == first


def test_forward_alone_changes_no_state(adam_bundle) -> None:
    a_path, c_path, _ = adam_bundle
    rt = TFLiteRuntime(a_path, c_path)
    before = rt.weights()
    x, _ = _batches([16])[0]
    a1 = rt.a_forward(x)
    a2 = rt.a_forward(x)  # an abandoned step, then a new one
    np.testing.assert_array_equal(a1, a2)
    assert _same_weights(rt.weights(), before)


def test_bad_inputs_are_refused_and_leave_state_intact(adam_bundle, tmp_path: Path) -> None:
    a_path, c_path, b_model = adam_bundle
    rt = TFLiteRuntime(a_path, c_path)
    b_fwd = _b_forward_backward(b_model)
    before = rt.weights()
    (x, y), (x2, y2) = _batches([16, 16])

    with pytest.raises(TFLiteRuntimeError, match="without a preceding a_forward"):
        rt.a_backward(np.zeros((16, 8, 8, 4), np.float32))
    with pytest.raises(TFLiteInputError, match=r"shape \(16, 8, 8\), expected \(None, 8, 8, 1\)"):
        rt.a_forward(x[..., 0])
    with pytest.raises(TFLiteInputError, match=r"expected \(None, 8, 8, 1\)"):
        rt.a_forward(np.zeros((16, 9, 8, 1), np.float32))
    with pytest.raises(TFLiteInputError, match="must be float32"):
        rt.a_forward(np.zeros((16, 8, 8, 1), np.int32))
    with pytest.raises(TFLiteInputError, match="NaN"):
        rt.a_forward(np.full((16, 8, 8, 1), np.nan, np.float32))
    with pytest.raises(TFLiteInputError, match="empty batch"):
        rt.a_forward(np.zeros((0, 8, 8, 1), np.float32))

    a = rt.a_forward(x)
    b, b_bwd = b_fwd(a)
    with pytest.raises(TFLiteInputError, match=r"labels must lie in \[0, 10\)"):
        rt.c_train(b, np.full(16, 10, np.int32))
    with pytest.raises(TFLiteInputError, match="labels must be int32"):
        rt.c_train(b, y.astype(np.float32))
    with pytest.raises(TFLiteInputError, match="batch 8, the other inputs have 16"):
        rt.c_train(b, y[:8])
    with pytest.raises(TFLiteInputError, match=r"b has shape \(16, 8, 8, 4\)"):
        rt.c_train(a, y)
    with pytest.raises(TFLiteInputError, match="upstream_grad has shape"):
        rt.a_backward(np.zeros((8, 8, 8, 4), np.float32))
    with pytest.raises(TFLiteInputError, match="NaN"):
        rt.a_backward(np.full(a.shape, np.inf, np.float32))
    with pytest.raises(TFLiteRuntimeError, match="no checkpoint"):
        rt.restore(tmp_path / "nowhere")
    assert _same_weights(rt.weights(), before)

    # All of these are SpliteasyErrors, so the CLI prints one line instead of a trace.
    assert issubclass(TFLiteInputError, SpliteasyError)

    # The runtime still trains after refusing all that: the pending forward survived.
    loss, g_b = rt.c_train(b, y)
    rt.a_backward(b_bwd(g_b))
    assert np.isfinite(loss)
    assert not _same_weights(rt.weights(), before)


def test_bad_model_files_and_single_split(adam_bundle, tmp_path: Path) -> None:
    a_path, c_path, _ = adam_bundle
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer at all" * 10)
    with pytest.raises(TFLiteRuntimeError, match="is not a TFLite model"):
        TFLiteRuntime(junk)
    with pytest.raises(TFLiteRuntimeError, match="no TFLite model"):
        TFLiteRuntime(tmp_path / "missing.tflite")
    with pytest.raises(TFLiteRuntimeError, match="not a spliteasy TFLite slice A"):
        TFLiteRuntime(c_path)  # C's file where A's is expected

    single = TFLiteRuntime(a_path)  # single split: A only
    x, _ = _batches([4])[0]
    assert single.a_forward(x).shape == (4, 8, 8, 4)
    assert list(single.weights()) == ["A"]
    with pytest.raises(TFLiteRuntimeError, match="single split"):
        single.c_infer(np.zeros((4, 8, 8, 6), np.float32))


def test_exporter_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Dropout(0.5)(keras.layers.Conv2D(2, 3)(inp))
    spec, loss = SGDSpec(learning_rate=0.1), LossSpec()
    with pytest.raises(UnsupportedLayer, match="Dropout"):
        export_tflite(keras.Model(inp, h), tmp_path / "a.tflite", "A", loss, spec)

    inp = keras.Input((None, None, 1))
    free = keras.Model(inp, keras.layers.Conv2D(2, 3)(inp))
    with pytest.raises(ConverterError, match="fix the spatial size"):
        export_tflite(free, tmp_path / "a.tflite", "A", loss, spec)
    with pytest.raises(ConverterError, match="device slices A and C"):
        export_tflite(free, tmp_path / "b.tflite", "B", loss, spec)  # type: ignore[arg-type]
    assert not (tmp_path / "a.tflite").exists()
