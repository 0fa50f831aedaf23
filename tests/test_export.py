"""``spliteasy export``: the trained, unsplit model out of a split run (issue #7 item 4).

The digits run is real end to end: ``spliteasy serve --state-dir`` in a child process,
``spliteasy train --state-dir`` in another, the server stopped with SIGTERM (its final
checkpoint), then ``spliteasy export`` in a third. The reference is split inference
over HTTP against the live server (A and C in TF, B in torch in inference mode), taken
before the server stopped. ResNet50 runs in process on the cached zoo bundle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from split_helpers import ADAM_CFG, ALL_RUNTIMES, SGD_CFG, digits_bundle, rel

REPO = Path(__file__).resolve().parents[1]
SPLITEASY = [sys.executable, "-m", "spliteasy_cli.main"]
TOL = 1e-5

# What the CLI must never print (TensorFlow's/absl's start-up pages, library warnings).
NOISE = re.compile(
    r"cuda|cuInit|cuDNN|cuBLAS|cuFFT|absl|computation placer|oneDNN|TF-TRT|XNNPACK|"
    r"This TensorFlow binary|WARNING:tensorflow|WARNING:absl|^[IWE]\d{4} |UserWarning|"
    r"DeprecationWarning|FutureWarning|Hi, looks like you are running TensorFlow\.js",
    re.IGNORECASE | re.MULTILINE,
)


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A real ``spliteasy`` command line in a child process (argv from the command line)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    return subprocess.run(
        [*SPLITEASY, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """The same command through ``spliteasy``'s entry point in this process."""
    import contextlib
    import io

    from spliteasy_cli.main import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, stdout.getvalue(), stderr.getvalue())


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    found = NOISE.findall(proc.stderr)
    assert not found, f"library noise on stderr ({found[:3]}):\n{proc.stderr[:3000]}"


def device_weights(state_dir: Path, name: str = "latest") -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    from shared_schema.durable import read_dir

    return dict(load(read_dir(state_dir / name)["slices.safetensors"]))


def split_runtime(bundle: Path, weights: dict[str, np.ndarray]):
    """The TF device runtime with A and C set to a device snapshot's variables."""
    from device_tf.keras_util import named_variables
    from device_tf.tf_runtime import TFRuntime

    rt = TFRuntime.from_bundle(bundle)
    for part, model in (("A", rt.a), ("C", rt.c)):
        if model is None:
            continue
        for key, var in named_variables(model).items():
            var.assign(weights[f"{part}/{key}"])
    return rt


def run_and_export(
    bundle: Path, tmp: Path, runtime: str = "tf", epochs: int = 2, children: bool = True
) -> dict:
    """serve and train (``runtime``) with state dirs, split predictions over HTTP against
    the live server, SIGTERM (the final checkpoint), then ``spliteasy export``.

    ``children=False``: serve and export in this process (the app ``serve`` builds in a
    thread, whose ``stop()`` writes the final checkpoint as SIGTERM does; ``export``'s
    entry point), train still a child: for a run whose serve and export output is not
    checked, two TF/torch start-ups fewer."""
    from device_tf.data import load_digits_split
    from device_tf.loop import SplitTrainer
    from device_tf.transport import HttpTransport
    from server_torch.serving import ServerProcess, ServerThread
    from shared_schema import load_manifest, manifest_digest

    srv_dir, dev_dir, out = tmp / "server-state", tmp / "device-state", tmp / "trained"
    if children:
        server = ServerProcess(bundle, ["--state-dir", str(srv_dir), "--checkpoint-every", "20"])
        server.start(120)
    else:
        import torch

        from server_torch.app import create_app
        from server_torch.serving import configure_threads

        threads = torch.get_num_threads()
        configure_threads()  # serve's torch threads (2 threads on 2 busy cores stall)
        server = ServerThread(create_app(bundle, state_dir=srv_dir, checkpoint_every=20))
        server.start()
    try:
        train = cli(
            "train", str(bundle), "--server", server.url, "--epochs", str(epochs),
            "--runtime", runtime, "--no-progress", "--state-dir", str(dev_dir),
            "--log", str(tmp / "steps.jsonl"),
        )  # fmt: skip
        assert train.returncode == 0, train.stderr
        # Split inference against the live server: A, C here in TF; B in torch, eval mode.
        _, _, x_te, y_te = load_digits_split(seed=0)
        rt = split_runtime(bundle, device_weights(dev_dir))
        transport = HttpTransport(server.url)
        try:
            with SplitTrainer(rt, transport, load_manifest(bundle), manifest_digest(bundle)) as t:
                split_out = t.predict(x_te)
        finally:
            transport.close()
    finally:
        server.stop()  # SIGTERM: the server writes its final checkpoint
        if not children:
            torch.set_num_threads(threads)
    export_args = (
        "export", str(bundle), "--server-state", str(srv_dir), "--device-state", str(dev_dir),
        "--out", str(out), "--formats", "savedmodel,tflite,tfjs",
    )  # fmt: skip
    export = cli(*export_args) if children else cli_in_process(*export_args)
    return {
        "bundle": bundle,
        "server_state": srv_dir,
        "device_state": dev_dir,
        "out": out,
        "train": train,
        "export": export,
        "server_output": "".join(server.output) if children else "",
        "x": x_te,
        "y": y_te,
        "split": split_out,
    }


def check_export(run: dict, steps: int) -> tuple[float, float]:
    """The exported SavedModel equals the split predictions and scores the same."""
    import tf_keras as keras

    from shared_schema import manifest_digest

    assert run["export"].returncode == 0, run["export"].stderr
    assert "wrote the trained digits-cnn model to" in run["export"].stdout
    model = keras.models.load_model(run["out"], compile=False)
    got = model.predict(run["x"], verbose=0)
    err = rel(got, run["split"])
    split_acc = float((run["split"].argmax(-1) == run["y"]).mean())
    exported_acc = float((got.argmax(-1) == run["y"]).mean())
    assert err <= TOL
    assert exported_acc == split_acc
    assert split_acc > 0.8, "the run trained (the comparison is not vacuous)"
    record = json.loads((run["out"] / "export.json").read_text())
    assert record["server_checkpoint"]["steps"] == record["device_snapshot"]["step"] == steps
    assert record["verification"]["split_vs_unsplit_rel_err"] <= TOL
    assert record["manifest_sha256"] == manifest_digest(run["bundle"])
    return err, split_acc


# The tests of one finished digits run share an xdist worker (``--dist loadgroup``): a
# module fixture is computed once per worker, and this one is a 2-epoch run and an export.
DIGITS_RUN = pytest.mark.xdist_group("export-digits-run")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished 2-epoch digits run (Python TF device), its split predictions, its export."""
    bundle, _ = digits_bundle(None, "double", SGD_CFG)
    return run_and_export(bundle, tmp_path_factory.mktemp("export"))


@DIGITS_RUN
def test_export_equals_split_inference_digits(digits_run):
    run = digits_run
    print("\n" + run["export"].stdout)
    err, acc = check_export(run, steps=90)
    print(f"digits: exported vs split inference over HTTP {err:.1e} relative, accuracy {acc:.4f}")
    assert f"test accuracy {acc:.4f}" in run["train"].stdout  # what train reported


@pytest.mark.js
def test_export_from_a_tfjs_device(tmp_path):
    """The Node TF.js device writes the same state files: its run exports the same way."""
    from js_fixtures import node

    node()
    bundle, _ = digits_bundle(None, "double", SGD_CFG, runtimes=ALL_RUNTIMES)
    run = run_and_export(bundle, tmp_path, runtime="tfjs", epochs=1, children=False)
    err, acc = check_export(run, steps=45)
    print(f"\ndigits, TF.js device: exported vs split inference {err:.1e}, accuracy {acc:.4f}")
    assert_quiet(run["train"])


@DIGITS_RUN
def test_exported_tflite_and_tfjs(digits_run):
    import tensorflow as tf

    out = digits_run["out"]
    interp = tf.lite.Interpreter(model_path=str(out / "model.tflite"))
    x = digits_run["x"][:64]
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    got = interp.get_tensor(interp.get_output_details()[0]["index"])
    err = rel(got, digits_run["split"][:64])
    print(f"\ndigits TFLite export vs split inference: {err:.1e}")
    assert err <= TOL
    topology = json.loads((out / "tfjs" / "model.json").read_text())
    names = {w["name"] for group in topology["weightsManifest"] for w in group["weights"]}
    assert {"a_conv/kernel", "b_conv1/kernel", "c_logits/kernel"} <= names


TFJS_PREDICT = """
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { initBackend } from './src/backend.mjs';
import { loadLayersModel } from './src/slices.mjs';
const [dir, xfile, outfile, ...shape] = process.argv.slice(1);
const tf = await initBackend();
const modelJson = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
const model = await loadLayersModel(modelJson, async (p) => new Uint8Array(await readFile(join(dir, p))));
const buf = await readFile(xfile);
const x = tf.tensor(new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4), shape.map(Number));
await writeFile(outfile, Buffer.from((await model.predict(x).data()).buffer));
"""


@DIGITS_RUN
@pytest.mark.js
def test_exported_tfjs_runs_in_tfjs(digits_run, tmp_path):
    """The tfjs/ form, loaded by TF.js itself (the harness' loader, cpu backend)."""
    from js_fixtures import JS_DIR, node

    x = np.ascontiguousarray(digits_run["x"][:64])
    x.tofile(tmp_path / "x.f32")
    proc = subprocess.run(
        [node(), "--input-type=module", "-e", TFJS_PREDICT, str(digits_run["out"] / "tfjs"),
         str(tmp_path / "x.f32"), str(tmp_path / "y.f32"), *map(str, x.shape)],
        cwd=JS_DIR, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = np.fromfile(tmp_path / "y.f32", np.float32).reshape(len(x), -1)
    err = rel(got, digits_run["split"][:64])
    print(f"\ndigits TF.js export (TF.js cpu backend) vs split inference: {err:.1e}")
    assert err <= TOL


@DIGITS_RUN
def test_cli_is_quiet(digits_run):
    """serve, train and export print their own lines only."""
    for what in ("train", "export"):
        assert_quiet(digits_run[what])
    assert not NOISE.findall(digits_run["server_output"]), digits_run["server_output"][:3000]


def test_cuts_subcommand_is_quiet():
    proc = cli("cuts", "digits-cnn")
    assert proc.returncode == 0, proc.stderr
    assert "valid cuts" in proc.stdout
    assert_quiet(proc)
    assert proc.stderr.strip() == "", proc.stderr


@DIGITS_RUN
def test_refuses_state_of_another_bundle(digits_run, tmp_path):
    from converters.export.trained import ExportError, export_trained

    run = digits_run
    for which in ("server_state", "device_state"):
        srv = shutil.copytree(run["server_state"], tmp_path / which / "srv")
        dev = shutil.copytree(run["device_state"], tmp_path / which / "dev")
        if which == "server_state":
            (srv / "bundle.json").write_text(json.dumps({"manifest_sha256": "ab" * 32}))
        else:
            doc = json.loads((dev / "session.json").read_text())
            doc["run"]["manifest_sha256"] = "ab" * 32
            (dev / "session.json").write_text(json.dumps(doc))
        with pytest.raises(ExportError, match="another bundle"):
            export_trained(run["bundle"], srv, dev, tmp_path / which / "out")
        assert not (tmp_path / which / "out").exists()


@DIGITS_RUN
def test_cli_error_is_one_line(digits_run, tmp_path):
    from spliteasy_cli.main import main

    code = main(
        ["export", str(digits_run["bundle"]), "--server-state", str(tmp_path / "none"),
         "--device-state", str(digits_run["device_state"]), "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 2
    code = main(
        ["export", str(digits_run["bundle"]), "--server-state", str(digits_run["server_state"]),
         "--device-state", str(digits_run["device_state"]), "--out", str(tmp_path / "o"),
         "--formats", "savedmodel,onnx"]
    )  # fmt: skip
    assert code == 2
    assert not (tmp_path / "o").exists()
    for precious in ("bundle", "server_state", "device_state"):  # --force never eats them
        args = ["export", str(digits_run["bundle"]), "--server-state",
                str(digits_run["server_state"]), "--device-state",
                str(digits_run["device_state"]), "--out", str(digits_run[precious]), "--force"]  # fmt: skip
        assert main(args) == 2
        assert digits_run[precious].is_dir() and any(digits_run[precious].iterdir())


@DIGITS_RUN
def test_old_bundle_without_the_unsplit_model(digits_run, tmp_path):
    from converters.export.trained import ExportError, export_trained

    old = shutil.copytree(digits_run["bundle"], tmp_path / "old")
    doc = json.loads((old / "manifest.json").read_text())
    doc["artifacts"] = [a for a in doc["artifacts"] if a["format"] != "keras_config"]
    (old / "manifest.json").write_text(json.dumps(doc))
    shutil.rmtree(old / "unsplit")
    with pytest.raises(ExportError, match="does not hold the unsplit model"):
        export_trained(
            old, digits_run["server_state"], digits_run["device_state"], tmp_path / "out"
        )


@DIGITS_RUN
@pytest.mark.parametrize("damage", ["removed", "corrupt"])
def test_pairs_server_checkpoint_with_the_matching_device_snapshot(digits_run, tmp_path, damage):
    """Without the newest checkpoint (gone, or corrupt: skipped, never loaded), the older
    one is paired with the device's durable/ snapshot of its step; a checkpoint no device
    snapshot matches is refused (or exported on request, with a warning)."""
    from converters.export.trained import (
        ExportError,
        export_trained,
        load_device_state,
        load_server_state,
    )
    from shared_schema import manifest_digest

    run = digits_run
    digest = manifest_digest(run["bundle"])
    srv = shutil.copytree(run["server_state"], tmp_path / "srv")
    ckpts = sorted(srv.glob("ckpt-*"))
    assert len(ckpts) == 2
    if damage == "removed":
        shutil.rmtree(ckpts[-1])
    else:
        blob = ckpts[-1] / "b.safetensors"
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF
        blob.write_bytes(bytes(data))
    older = load_server_state(srv, digest)
    assert older.path == ckpts[0]
    device = load_device_state(run["device_state"], digest)
    steps = {c.path.name: c.step for c in device.candidates}
    if steps.get("durable") == older.sessions.get(device.session_id, older.steps):
        result = export_trained(run["bundle"], srv, run["device_state"], tmp_path / "out")
        assert result.record["device_snapshot"]["path"].endswith("durable")
    else:
        with pytest.raises(ExportError, match="not one trained model"):
            export_trained(run["bundle"], srv, run["device_state"], tmp_path / "out")
        result = export_trained(
            run["bundle"], srv, run["device_state"], tmp_path / "out", allow_step_mismatch=True
        )
        assert "warning" in result.record


# -- in process: BatchNorm in every slice, single split ---------------------------------------


def train_in_process(path: Path, steps: int = 4, batch: int = 16, seed: int = 0):
    """A few real split steps without HTTP: TF device runtime and the server's Trainer."""
    from device_tf.tf_runtime import TFRuntime
    from server_torch.rebuild import load_server_slice
    from server_torch.trainer import Trainer
    from shared_schema import load_manifest

    manifest = load_manifest(path)
    rt = TFRuntime.from_bundle(path, manifest)
    trainer = Trainer(load_server_slice(path, manifest), manifest)
    rng = np.random.default_rng(seed)
    shape = manifest.input.sample_shape
    for _ in range(steps):
        x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
        y = rng.integers(0, manifest.num_classes, batch).astype(np.int32)
        a = rt.a_forward(x)
        if manifest.split_mode == "double":
            b = trainer.forward(a)
            _, g_b = rt.c_train(b, y)
            g_a = trainer.backward(g_b)
        else:
            g_a, _ = trainer.step_single(a, y)
        rt.a_backward(g_a)
    return manifest, rt, trainer


def live_split(manifest, rt, trainer, x: np.ndarray) -> np.ndarray:
    out = trainer.infer(rt.a_infer(x))
    return rt.c_infer(out) if manifest.split_mode == "double" else out


@pytest.mark.parametrize(
    "model,split,opt",
    [("digits-bn", "double", ADAM_CFG), ("digits-cnn", "single", SGD_CFG)],
    ids=["digits-bn-double-adam", "digits-cnn-single-sgd"],
)
def test_export_in_process(tmp_path, model, split, opt):
    """BN moving statistics of A, B and C (Keras' variance rule in torch B) and a single
    split (B ends at the logits, no C) come out equal to split inference."""
    import tf_keras as keras

    from converters.export.trained import keras_variables_of_b, write_trained
    from device_tf.keras_util import named_variables

    path, _ = digits_bundle(None, split, opt, model=model)
    manifest, rt, trainer = train_in_process(path)
    result = write_trained(path, trainer.module.state_dict(), rt.weights(), tmp_path / "m")
    exported = keras.models.load_model(tmp_path / "m", compile=False)
    x = np.random.default_rng(1).uniform(0, 1, (64, *manifest.input.sample_shape))
    x = x.astype(np.float32)
    err = rel(exported(x, training=False).numpy(), live_split(manifest, rt, trainer, x))
    # Every variable, BN moving statistics included, is the trained one.
    values = {k: v.numpy() for k, v in named_variables(exported).items()}
    held = {**rt.weights()["A"], **rt.weights().get("C", {})}
    held.update(keras_variables_of_b(path, trainer.module.state_dict()))
    assert set(values) == set(held)
    assert all(np.array_equal(values[k], held[k]) for k in values)
    moving = [k for k in values if k.endswith("moving_variance")]
    print(
        f"\n{model} {split}: exported vs split inference {err:.1e} "
        f"(self-check {result.verification['split_vs_unsplit_rel_err']:.1e}); "
        f"{len(moving)} BN moving variances"
    )
    assert err <= TOL
    if model == "digits-bn":
        assert {k.split("/")[0][:2] for k in moving} >= {"a_", "b_", "c_"}
        assert all(not np.allclose(values[k], 1.0) for k in moving)  # they moved


# -- ResNet50 at 32 px (the cached zoo bundle; converted once in the suite) -----------------


@pytest.mark.slow
@pytest.mark.xdist_group("resnet50")  # zoo_helpers.on: the worker that holds ResNet50's build
def test_export_equals_split_inference_resnet50(tmp_path):
    import tf_keras as keras
    from zoo_helpers import bundle as zoo_bundle

    from converters.export.trained import write_trained

    path = zoo_bundle("resnet50", ("conv2_block3_out", "conv4_block6_out"))
    manifest, rt, trainer = train_in_process(path, steps=3, batch=8)
    result = write_trained(path, trainer.module.state_dict(), rt.weights(), tmp_path / "trained")
    shape = manifest.input.sample_shape
    x = np.random.default_rng(1).uniform(0, 1, (16, *shape)).astype(np.float32)
    split = live_split(manifest, rt, trainer, x)
    got = keras.models.load_model(tmp_path / "trained", compile=False)(x, training=False).numpy()
    err = rel(got, split)
    print(
        f"\nresnet50 32px conv2_block3_out|conv4_block6_out after 3 steps: exported vs split "
        f"inference {err:.1e} (export self-check {result.verification['split_vs_unsplit_rel_err']:.1e})"
    )
    assert err <= TOL
    assert (got.argmax(-1) == split.argmax(-1)).all()


@pytest.mark.slow
def test_demo_ends_with_the_trained_model(tmp_path):
    """``spliteasy demo`` writes the trained model, says where, and prints nothing else
    than its own lines; the exported model scores what the split model scored."""
    proc = cli("demo", "--epochs", "1", "--out", str(tmp_path / "demo"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert_quiet(proc)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    trained = Path(summary["trained_model"])
    print(f"\ndemo (1 epoch): {proc.stdout}")
    assert trained == tmp_path / "demo" / "trained"
    assert (trained / "saved_model.pb").is_file() and (trained / "export.json").is_file()
    assert f"trained model: {trained}" in proc.stdout
    assert summary["exported_accuracy"] == summary["split_accuracy"]
