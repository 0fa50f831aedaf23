"""The TF.js device (node) trains the real split against the real torch server like unsplit Keras.

``spliteasy convert``'s bundle writer emits A and C as TF.js layers models; ``node
device_tf/js/train.mjs`` trains them through the shared frame format and HTTP protocol
against B in torch behind real uvicorn on 127.0.0.1. From the same initial weights on
the same 5 batches, the Python TF, TFLite and TF.js devices agree with each other and
with unsplit tf_keras within 1e-4 relative, in the losses and in every variable of A, B
and C. The model is ``digits-bn``: BatchNormalization in A, B and C, so every runtime's
own BN training and moving statistics are compared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import JS_DIR, node, run_node, write_batches

from split_helpers import ADAM_CFG, ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches, rel

pytestmark = pytest.mark.js

TOL = 1e-4
STEPS, BATCH = 5, 32
MODEL = "digits-bn"  # BatchNormalization in A, B and C


def _node_train(bundle: Path | None, url: str, data: Path, out: Path, *extra: str) -> dict:
    """Run the CLI; returns {"log": --log-json document, "weights": {"layer/var": array}}."""
    args = ["train.mjs", "--server", url, "--data", str(data), "--batch-size", str(BATCH)]
    args += ["--steps", str(STEPS), "--log-json", str(out / "log.json")]
    args += ["--weights-out", str(out / "weights.json"), *extra]
    if bundle is not None:
        args += ["--bundle", str(bundle)]
    proc = run_node(args)
    assert "step 5/5" in proc.stdout and "done: 5 steps" in proc.stdout, proc.stdout
    log = json.loads((out / "log.json").read_text())
    held = json.loads((out / "weights.json").read_text())
    weights = {
        name: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in held.values()
        for name, w in part.items()
    }
    return {"log": log, "weights": weights}


def _server_weights(app, bundle: Path) -> dict[str, np.ndarray]:
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec

    return keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B"))


def _python_device(runtime, url: str, manifest, digest: str, batches, aux: bool = False):
    from device_tf.loop import SplitTrainer
    from device_tf.transport import HttpTransport

    transport = HttpTransport(url)
    with SplitTrainer(runtime, transport, manifest, digest, aux_label=aux) as trainer:
        losses = [trainer.step(x, y).loss for x, y in batches]
    transport.close()
    weights = {}
    for held in runtime.weights().values():
        weights.update(held)
    return losses, weights


def _check_weights(got: dict, expected: dict, label: str) -> None:
    assert set(got) == set(expected), set(got) ^ set(expected)
    errors = {name: rel(got[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    print(f"  {label}: largest weight rel err {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def _loss_errs(losses, ref) -> list[float]:
    return [abs(a - b) / abs(b) for a, b in zip(losses, ref, strict=True)]


def test_tf_tflite_tfjs_devices_agree_with_each_other_and_unsplit(tmp_path, serve_app):
    from device_tf.keras_util import named_variables
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from device_tf.tflite_runtime import TFLiteRuntime
    from server_torch.app import create_app
    from shared_schema import load_manifest, manifest_digest

    node()  # fail early, before the conversion, if the JS harness is not installed
    bundle, reference = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    manifest = load_manifest(bundle)  # verifies every hash, the TF.js directories included
    for name in ("A", "C"):
        art = manifest.slice(name).artifact("tfjs_layers")
        assert (art.path, art.runtime) == (f"{name}/tfjs", "tfjs")
    digest = manifest_digest(bundle)
    batches = fixed_batches(STEPS, BATCH)
    data = write_batches(tmp_path / "train.frames", batches)
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    expected = {k: v.numpy() for k, v in named_variables(reference).items()}

    runs: dict[str, list[float]] = {}
    for device in ("tf", "tflite", "tfjs"):
        app = create_app(bundle)  # a fresh B for every device
        srv = serve_app(app)
        if device == "tfjs":
            out = tmp_path / "tfjs"
            out.mkdir()
            res = _node_train(bundle, srv.url, data, out)
            losses = [r["loss"] for r in res["log"]["records"]]
            weights = res["weights"]
            assert res["log"]["manifest_sha256"] == digest
        else:
            runtime = (TFRuntime if device == "tf" else TFLiteRuntime).from_bundle(bundle)
            losses, weights = _python_device(runtime, srv.url, manifest, digest, batches)
        weights.update(_server_weights(app, bundle))
        runs[device] = losses
        print(f"\n{device}: losses {[f'{v:.6f}' for v in losses]}")
        _check_weights(weights, expected, device)
        srv.stop()

    print(f"unsplit: losses {[f'{v:.6f}' for v in ref_losses]}")
    for device, losses in runs.items():
        errs = _loss_errs(losses, ref_losses)
        print(f"  {device} vs unsplit: loss rel errs {[f'{e:.1e}' for e in errs]}")
        assert max(errs) <= TOL, (device, losses, ref_losses)
        assert losses[-1] < losses[0]
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert max(_loss_errs(runs[a], runs[b])) <= TOL, (a, b, runs[a], runs[b])


@pytest.fixture(scope="module")
def adam_bundles():
    """Double and single split digits bundles with TF.js slices (read-only, from the
    cache), and their references."""
    return {
        split: digits_bundle(None, split, ADAM_CFG, ALL_RUNTIMES, MODEL)
        for split in ("double", "single")
    }


@pytest.mark.parametrize(
    ("split", "aux", "from_server"),
    [("double", True, False), ("single", False, True)],
    ids=["double-adam-aux_label", "single-adam-slices_from_server"],
)
def test_tfjs_device_equals_unsplit(tmp_path, serve_app, adam_bundles, split, aux, from_server):
    from device_tf.keras_util import named_variables
    from device_tf.reference import clone_with_weights, train_unsplit
    from server_torch.app import create_app
    from shared_schema import load_manifest

    bundle, reference = adam_bundles[split]
    reference = clone_with_weights(reference)  # the fixture's model stays untrained
    manifest = load_manifest(bundle)
    batches = fixed_batches(STEPS, BATCH)
    data = write_batches(tmp_path / "train.frames", batches)
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)

    from js_fixtures import write_frames_dataset

    from device_tf.data import load_digits_split
    from device_tf.reference import accuracy

    _, _, x_te, y_te = load_digits_split()
    test_data = write_frames_dataset(tmp_path / "test.frames", x_te, y_te)
    app = create_app(bundle)
    srv = serve_app(app)
    extra = ["--eval-data", str(test_data)] + (["--aux-label"] if aux else [])
    res = _node_train(None if from_server else bundle, srv.url, data, tmp_path, *extra)
    losses = [r["loss"] for r in res["log"]["records"]]
    weights = {**res["weights"], **_server_weights(app, bundle)}
    errs = _loss_errs(losses, ref_losses)
    print(f"\ntfjs {split}: loss rel errs {[f'{e:.1e}' for e in errs]}")
    _check_weights(weights, {k: v.numpy() for k, v in named_variables(reference).items()}, split)
    assert max(errs) <= TOL, (losses, ref_losses)
    # Inference through the server's /infer (B in inference mode) classifies the held-out
    # digits as the unsplit model does.
    [evaluation] = res["log"]["summary"]["accuracy"]
    assert abs(evaluation["accuracy"] - accuracy(reference, x_te, y_te)) <= 1 / len(y_te)
    for r in res["log"]["records"]:
        assert set(r) >= {
            "step",
            "loss",
            "device_ms",
            "server_ms",
            "codec_ms",
            "wire_ms",
            "total_ms",
        }
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0


def test_cli_names_a_tampered_bundle_and_a_foreign_server(tmp_path, serve_app, adam_bundles):
    from server_torch.app import create_app

    bundle, _ = adam_bundles["double"]
    single, _ = adam_bundles["single"]
    data = write_batches(tmp_path / "train.frames", fixed_batches(1, BATCH))
    srv = serve_app(create_app(bundle))
    base = ["train.mjs", "--server", srv.url, "--data", str(data), "--steps", "1"]

    def fails(*args: str) -> str:
        import subprocess

        proc = subprocess.run(
            [node(), *base, *args], cwd=JS_DIR, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Error" not in proc.stderr.split(": error: ", 1)[0], proc.stderr
        return proc.stderr.strip()

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    shard = next((tampered / "C" / "tfjs").glob("*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert "C/tfjs does not match its sha256" in fails("--bundle", str(tampered))
    # The single-split bundle is not the one this server trains: the session is refused.
    assert "409" in fails("--bundle", str(single))
    assert "--batch-size must be an integer >= 1" in fails("--batch-size", "0")
    assert "cannot read data file" in fails("--bundle", str(bundle), "--data", str(tmp_path / "no"))
