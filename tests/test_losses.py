"""The losses beyond the sparse cross-entropy train split exactly as unsplit (issue #9, item 3).

For categorical cross-entropy (one-hot), binary cross-entropy (multi-label: 10 sigmoid
units on logits), mean squared and mean absolute error (regression onto one-hot targets),
in double split (the loss on the device, Python TF) and single split (the loss on the
torch server), 5 SGD-momentum steps on digits: every variable of A, B and C within 1e-4
relative of unsplit tf_keras compiled with the same loss (``assert_matches_unsplit``).

Which loss a bundle trains with only shows in its manifest (``loss`` and ``labels``) and,
with ``--runtimes tflite``, in C's TFLite train signature: A, B and C's SavedModels, B's
ONNX/torch files and every hash are those of the sparse bundle. So the Python TF cases
take the cached sparse digits bundle and write the manifest a conversion with that loss
writes (one conversion per split instead of one per loss and split); the binary
cross-entropy bundle with every runtime is converted for real (through the bundle cache)
and shown to carry exactly that manifest, then trained from TFLite and TF.js in Node.
"""

from __future__ import annotations

import json
from pathlib import Path

import bundle_cache
import numpy as np
import pytest

from split_helpers import ALL_RUNTIMES, SGD_CFG, assert_matches_unsplit, fixed_batches, split_run

NEW_LOSSES = (
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
)
STEPS, BATCH = 5, 32


def loss_spec(name: str):
    from shared_schema import LossSpec

    return LossSpec(name=name, from_logits=name.endswith("crossentropy"))


def with_loss(cached: Path, out: Path, loss) -> Path:
    """A copy of a cached bundle whose manifest names ``loss`` (and its labels)."""
    from shared_schema import MANIFEST_FILE, Manifest, load_manifest

    bundle = bundle_cache.copy_bundle(cached, out)
    m = load_manifest(bundle)
    doc = m.model_dump(mode="json")
    doc["loss"] = loss.model_dump(mode="json")
    doc["labels"] = loss.labels_spec(m.output, m.labels.name).model_dump(mode="json")
    (bundle / MANIFEST_FILE).write_text(Manifest.model_validate(doc).to_json())
    return bundle


def one_hot_batches(n: int = STEPS, batch: int = BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x, np.eye(10, dtype=np.float32)[y]) for x, y in fixed_batches(n, batch)]


@pytest.mark.parametrize("split", ["double", "single"])
@pytest.mark.parametrize("name", NEW_LOSSES)
def test_loss_split_equals_unsplit(tmp_path, serve_app, digits_bundles, name, split):
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    cached, reference = digits_bundles(split, SGD_CFG)
    bundle = with_loss(cached, tmp_path / "bundle", loss_spec(name))
    manifest = load_manifest(bundle)
    batches = one_hot_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit(f"{name} {split}", losses, weights, reference, ref_losses)


def test_server_refuses_labels_that_do_not_fit_the_loss(tmp_path, digits_bundles):
    """Single split: float rows of the wrong width, and integer labels for a float loss,
    are 422 frame_spec_mismatch before B runs."""
    from fastapi.testclient import TestClient

    from server_torch.app import create_app
    from shared_schema import Frame, FrameKind, encode, load_manifest, manifest_digest

    cached, _ = digits_bundles("single", SGD_CFG)
    bundle = with_loss(cached, tmp_path / "bundle", loss_spec("mean_squared_error"))
    manifest = load_manifest(bundle)
    with TestClient(create_app(bundle)) as client:
        r = client.post("/v1/sessions", json={"manifest_sha256": manifest_digest(bundle)})
        sid, token = r.json()["session_id"], r.json()["token"]
        a = np.zeros((4, *manifest.cuts[0].sample_shape), np.float32)
        for labels, layout in ((np.zeros((4, 3), np.float32), "NC"), (np.zeros(4, np.int32), "N")):
            body = encode(
                [
                    Frame(
                        FrameKind.ACTIVATION,
                        manifest.cuts[0].name,
                        a,
                        "NHWC",
                        bytes.fromhex(sid),
                        0,
                    ),
                    Frame(FrameKind.LABELS, "labels", labels, layout, bytes.fromhex(sid), 0),
                ]
            )
            r = client.post(
                f"/v1/sessions/{sid}/step",
                content=body,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/x-spliteasy-frames",
                },
            )
            assert r.status_code == 422 and r.json()["error"] == "frame_spec_mismatch", r.text


def test_binary_crossentropy_bundle_on_tflite_and_tfjs(tmp_path, serve_app, digits_bundles):
    """A real conversion with the binary cross-entropy (all runtimes, bundle cache): its
    manifest is the one ``with_loss`` writes, and the TFLite and TF.js (Node) devices
    train it split exactly as unsplit tf_keras."""
    from js_fixtures import node, run_node, write_batches

    from device_tf.reference import clone_with_weights, train_unsplit
    from device_tf.tflite_runtime import TFLiteRuntime
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest
    from split_helpers import digits_cuts, digits_model, optimizer_spec

    node()
    loss = loss_spec("binary_crossentropy")
    model = digits_model()
    initial = clone_with_weights(model)
    bundle = bundle_cache.converted(
        model,
        digits_cuts("double"),
        model_name="digits-cnn",
        optimizer=optimizer_spec(SGD_CFG),
        runtimes=ALL_RUNTIMES,
        loss=loss,
    )
    manifest = load_manifest(bundle)
    sparse, _ = digits_bundles("double", SGD_CFG)
    rewritten = load_manifest(with_loss(sparse, tmp_path / "rewritten", loss))
    assert (manifest.loss, manifest.labels) == (rewritten.loss, rewritten.labels)
    assert manifest.labels.dtype == "float32" and manifest.labels.shape == [None, 10]

    batches = one_hot_batches()
    reference = clone_with_weights(initial)
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFLiteRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit("binary_crossentropy tflite", losses, weights, reference, ref_losses)

    data = write_batches(tmp_path / "train.frames", batches)
    app = create_app(bundle)
    srv = serve_app(app)
    out = tmp_path / "tfjs"
    out.mkdir()
    args = ["train.mjs", "--bundle", str(bundle), "--server", srv.url, "--data", str(data)]
    args += ["--batch-size", str(BATCH), "--steps", str(STEPS), "--log-json", str(out / "log.json")]
    args += ["--weights-out", str(out / "weights.json")]
    proc = run_node(args)
    assert "done: 5 steps" in proc.stdout, proc.stdout + proc.stderr
    js_losses = [r["loss"] for r in json.loads((out / "log.json").read_text())["records"]]
    held = json.loads((out / "weights.json").read_text())
    js_weights = {
        k: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in held.values()
        for k, w in part.items()
    }
    js_weights.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    assert_matches_unsplit("binary_crossentropy tfjs", js_losses, js_weights, reference, ref_losses)


def test_loss_from_the_compiled_model_else_from_the_flag(tmp_path):
    """``spliteasy convert --model saved.h5`` takes the loss the model was compiled with
    (``_loss_from_args``, convert's choice);
    ``--loss`` names one (aliases, from_logits from the output activation); a compiled loss
    spliteasy cannot train on every side is refused naming it."""
    import argparse

    import tf_keras as keras

    from converters._exceptions import ConverterError
    from converters.losses import compiled_loss, loss_spec, spec_of_keras_loss
    from shared_schema import LossSpec
    from split_helpers import digits_model
    from spliteasy_cli.convert import _loss_from_args

    model = digits_model()
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    saved = tmp_path / "compiled.h5"
    model.save(saved)
    assert compiled_loss(saved) == LossSpec(name="categorical_crossentropy", from_logits=True)
    # convert's choice, without a conversion (write_bundle's use of a loss is shown above):
    # the compiled loss, unless --loss / --from-logits say otherwise
    args = argparse.Namespace(model=str(saved), loss=None, from_logits=None)
    assert _loss_from_args(args, model, True) == compiled_loss(saved)
    args = argparse.Namespace(model=str(saved), loss="mse", from_logits=None)
    assert _loss_from_args(args, model, True) == LossSpec(name="mean_squared_error")
    args = argparse.Namespace(model="digits-cnn", loss=None, from_logits="false")
    assert _loss_from_args(args, model, True) == LossSpec(from_logits=False)

    assert spec_of_keras_loss("mse") == LossSpec(name="mean_squared_error")
    assert spec_of_keras_loss("binary_crossentropy") == LossSpec(
        name="binary_crossentropy", from_logits=False
    )
    assert spec_of_keras_loss(keras.losses.mean_absolute_error) == LossSpec(
        name="mean_absolute_error"
    )
    assert loss_spec("mae", model) == LossSpec(name="mean_absolute_error")
    assert loss_spec("binary_crossentropy", model).from_logits  # digits-cnn outputs logits
    for bad, message in (
        (keras.losses.Huber(), "does not train"),
        (keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "label_smoothing=0.1"),
    ):
        with pytest.raises(ConverterError, match=message):
            spec_of_keras_loss(bad)
    with pytest.raises(ConverterError, match="unknown loss 'hinge'"):
        loss_spec("hinge", model)
