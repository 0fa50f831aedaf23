"""Models that are not image classifiers train split exactly as unsplit (issue 9, item 4).

Each built-in model here converts through the bundle cache (one conversion per
configuration) and trains 5 steps split -- A and C in TF on the Python device, B in
torch behind the real uvicorn on 127.0.0.1 -- and unsplit in tf_keras from the same
initial weights on the same batches; losses and every variable must agree within 1e-4.

- ``tabular-mlp``: 2-D (NC) cut tensors, Dense layers on every side.
"""

from __future__ import annotations

import numpy as np
import pytest

from split_helpers import (
    ALL_RUNTIMES,
    SGD_CFG,
    assert_matches_unsplit,
    digits_bundle,
    fixed_batches,
    split_run,
)

TOL = 1e-4


def tabular_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """The digits batches, each image flattened to 64 features (a table of numbers)."""
    return [(x.reshape(len(x), -1), y) for x, y in fixed_batches()]


@pytest.mark.parametrize("split", ["double", "single"])
def test_tabular_mlp_split_equals_unsplit(serve_app, split):
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, split, SGD_CFG, ("tf",), "tabular-mlp")
    manifest = load_manifest(bundle)
    assert [c.layout for c in manifest.cuts] == ["NC"] * len(manifest.cuts)
    batches = tabular_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit(f"tabular-mlp/{split}", losses, weights, reference, ref_losses, TOL)


def token_batches(n: int = 5, batch_size: int = 32, seed: int = 0):
    """Learnable token sequences: class k's sequences are sprinkled with ids from its own
    band of the vocabulary among uniform noise ids (int32, shape (batch, 16))."""
    from converters.models import TEXT_LENGTH, TEXT_VOCAB

    rng = np.random.default_rng(seed)
    classes, band = 10, 4
    out = []
    for _ in range(n):
        y = rng.integers(0, classes, batch_size).astype(np.int32)
        x = rng.integers(classes * band, TEXT_VOCAB, (batch_size, TEXT_LENGTH))
        marks = rng.random((batch_size, TEXT_LENGTH)) < 0.4
        ids = y[:, None] * band + rng.integers(0, band, (batch_size, TEXT_LENGTH))
        out.append((np.where(marks, ids, x).astype(np.int32), y))
    return out


@pytest.mark.parametrize("split", ["double", "single"])
def test_text_cnn_split_equals_unsplit(serve_app, split):
    """Embedding on int32 ids in A; Conv1D, Max/AveragePooling1D and global pooling in B
    (the cut a_out is NWC on the wire); Dense in C."""
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, split, SGD_CFG, ("tf",), "text-cnn")
    manifest = load_manifest(bundle)
    assert manifest.input.dtype == "int32"
    assert manifest.cuts[0].layout == "NWC" and manifest.cuts[0].shape == [None, 16, 8]
    batches = token_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit(f"text-cnn/{split}", losses, weights, reference, ref_losses, TOL)


def test_text_cnn_on_tflite_equals_unsplit(serve_app):
    """The TFLite device feeds int32 token ids to A's Embedding (its train signature takes
    the model's dtype; the Embedding's sparse gradient is applied as Keras' dense-equal
    update)."""
    from device_tf.reference import train_unsplit
    from device_tf.tflite_runtime import TFLiteRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, "text-cnn")
    manifest = load_manifest(bundle)
    batches = token_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFLiteRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit("text-cnn/double/tflite", losses, weights, reference, ref_losses, TOL)


@pytest.mark.js
def test_text_cnn_on_tfjs_equals_unsplit(tmp_path, serve_app):
    """The TF.js device (Node) reads int32 token ids from its data file and feeds them to
    A's Embedding; 5 steps equal unsplit tf_keras (losses and every variable)."""
    import json

    from js_fixtures import run_node, write_batches

    from device_tf.keras_util import named_variables
    from device_tf.reference import train_unsplit
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, "text-cnn")
    manifest = load_manifest(bundle)
    batches = token_batches()
    data = write_batches(tmp_path / "tokens.frames", batches)
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    app = create_app(bundle)
    srv = serve_app(app)
    args = ["train.mjs", "--server", srv.url, "--data", str(data), "--batch-size", "32"]
    args += ["--steps", "5", "--bundle", str(bundle), "--log-json", str(tmp_path / "log.json")]
    args += ["--weights-out", str(tmp_path / "weights.json")]
    proc = run_node(args)
    assert "done: 5 steps" in proc.stdout, proc.stdout
    losses = [r["loss"] for r in json.loads((tmp_path / "log.json").read_text())["records"]]
    held = json.loads((tmp_path / "weights.json").read_text())
    weights = {
        name: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in held.values()
        for name, w in part.items()
    }
    weights.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    assert set(weights) == set(named_variables(reference))
    assert_matches_unsplit("text-cnn/double/tfjs", losses, weights, reference, ref_losses, TOL)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_recurrent_layer_is_refused_naming_it(cls):
    """tf2onnx fuses a recurrent layer into one ONNX op that onnx2torch cannot rebuild, so
    torch B could not be verified against Keras: convert refuses it, naming the layer."""
    import tf_keras as keras

    from converters._exceptions import UnsupportedLayer
    from converters.slicing import slice_model

    L = keras.layers
    tokens = L.Input((16,), dtype="int32", name="tokens")
    h = L.Embedding(50, 8, name="a_out")(tokens)
    h = getattr(L, cls)(8, name="b_rnn")(h)
    h = L.Dense(8, name="b_out")(h)
    model = keras.Model(tokens, L.Dense(4, name="c_logits")(h))
    with pytest.raises(UnsupportedLayer, match=rf"layer 'b_rnn' \({cls}\).*recurrent"):
        slice_model(model, ["a_out", "b_out"])


def test_scalar_tf_ops_become_rescaling_with_the_same_arithmetic():
    """MobileNetV3's hard-sigmoid, ReLU6(x + 3) * (1/6), is recorded as Python-only
    TFOpLambda layers; the zoo rewrites each as a Rescaling, computing the same values."""
    import tf_keras as keras

    from converters.cuts import check_supported
    from converters.zoo import replace_scalar_layers

    L = keras.layers
    x = L.Input((4, 4, 3), name="x")
    h = L.Conv2D(3, 1, name="conv")(x)
    gate = L.ReLU(6.0, name="relu6")(h + 3.0) * (1.0 / 6.0)
    out = L.Flatten(name="flat")(L.Multiply(name="hswish")([h, gate]))
    model = keras.Model(x, L.Dense(2, name="head")(out))
    assert "TFOpLambda" in {type(layer).__name__ for layer in model.layers}
    rewritten = replace_scalar_layers(model)
    kinds = [type(layer).__name__ for layer in rewritten.layers]
    assert "TFOpLambda" not in kinds and kinds.count("Rescaling") == 2
    check_supported(rewritten)  # every layer now trains in B (and on every device)
    sample = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)
    assert np.array_equal(model(sample).numpy(), rewritten(sample).numpy())
