"""The command line as a user meets it: real servers on 127.0.0.1.

Each command runs at least once as a real subprocess (``--help``, ``convert``,
``train``, ``demo``; ``serve`` through the ``serve_bundle`` fixture), which is what proves
the entry point, exit status and output streams. The convert refusals and
the other ``train`` runs (another runtime, a refusal) call ``spliteasy_cli.main.main``
in this process: the same parser, ``run`` and error translation, without starting
another TensorFlow for each (~9 CPU s apiece). Their output is caught with
``contextlib.redirect_*``, not ``capsys``, whenever a uvicorn thread serves the test: a
uvicorn thread started under ``capsys`` keeps capsys' stream, closed after the test, and
broke the xdist worker's capture for every later test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from split_helpers import ALL_RUNTIMES, SGD_CFG

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
SGD = SGD_CFG


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    """``spliteasy ARGS`` through ``main`` in this process: (exit status, stdout, stderr)."""
    from spliteasy_cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def in_process_redirected(*args: str) -> tuple[int, str, str]:
    """``spliteasy ARGS`` through ``main`` in this process, its output caught by
    ``contextlib.redirect_*`` (safe beside a uvicorn thread, unlike ``capsys``)."""
    from spliteasy_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def spliteasy(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spliteasy_cli.main", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV,
    )  # fmt: skip


def test_help_is_instant_and_lists_every_command():
    out = spliteasy("--help", timeout=30)
    assert out.returncode == 0
    for command in ("demo", "convert", "serve", "train"):
        assert command in out.stdout
    # --help imports no framework (heavy imports live inside run())
    probe = "import sys, spliteasy_cli.main as m; m.build_parser(); print(sorted(k for k in ('tensorflow', 'torch', 'onnx') if k in sys.modules))"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "[]"
    )


def test_convert_writes_a_verified_single_split_bundle(tmp_path, capsys):
    out = tmp_path / "single"
    result = spliteasy(
        "convert",
        "--model",
        "digits-cnn",
        "--cuts",
        "a_out",
        "--out",
        str(out),
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
    )
    assert result.returncode == 0, result.stderr
    assert "single split" in result.stdout and "B verified" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_mode"] == "single" and manifest["label_holder"] == "server"
    assert [s["name"] for s in manifest["slices"]] == ["A", "B"]
    assert manifest["optimizer"] == {
        "name": "sgd",
        "learning_rate": 0.05,
        "momentum": 0.9,
        "nesterov": False,
    }
    report = json.loads((out / "report.json").read_text())["verification"]
    assert report["forward_train_rel_err"] < 1e-4 and report["max_param_grad_rel_err"] < 1e-4
    # refuses to overwrite without --force, and leaves the bundle intact
    code, _, err = in_process(capsys, "convert", "--cuts", "a_out", "--out", str(out))
    assert code == 2 and "exists" in err and "--force" in err
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cuts", "nope", "b_out"], "no layer named"),
        (["--cuts", "b_out", "a_out"], "out of order"),
        (["--cuts", "image", "b_out"], "empty"),
        (["--cuts", "a_out", "b_out", "c_logits"], "one cut"),
        (["--cuts", "b_relu1", "b_pool"], "no trainable parameters"),
        (["--model", "/no/such/model.keras", "--cuts", "x"], "unknown model"),
        (["--cuts", "a_out", "--runtimes", "tf,coreml"], "unknown runtime"),
    ],
)
def test_convert_errors_are_one_line_messages(tmp_path, capsys, args, message):
    code, _, err = in_process(capsys, "convert", "--out", str(tmp_path / "b"), *args)
    assert code == 2, err
    assert message in err.lower() and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_train_against_a_served_bundle(digits_bundle_dir, digits_bundles, serve_app, tmp_path):
    """``train`` as a real subprocess (entry point, exit status, streams) against the app
    ``serve`` builds, in a thread (``spliteasy serve`` as a child: test_server_cli)."""
    from device_tf.data import batches, load_digits_split
    from device_tf.reference import accuracy, train_unsplit
    from server_torch.app import create_app
    from shared_schema import load_manifest

    srv = serve_app(create_app(digits_bundle_dir))
    log = tmp_path / "steps.jsonl"
    result = spliteasy(
        "train",
        str(digits_bundle_dir),
        "--server",
        srv.url,
        "--epochs",
        "1",
        "--log",
        str(log),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 45  # ceil(1437 / 32)
    for key in ("device_ms", "server_ms", "codec_ms", "wire_ms", "total_ms", "loss"):
        assert all(key in r for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    split_accuracy = float(result.stdout.split("test accuracy")[1].split()[0])
    assert split_accuracy > 0.5
    # The same model trained unsplit on the same batches (train's defaults: batch 32,
    # seed 0, one epoch) classifies the held-out digits the same, to one digit.
    _, reference = digits_bundles("double", {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9})
    manifest = load_manifest(digits_bundle_dir)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    train_unsplit(reference, list(batches(x_tr, y_tr, 32, 0, 0)), manifest.optimizer, manifest.loss)
    unsplit_accuracy = accuracy(reference, x_te, y_te)
    print(f"\ntrain CLI: split {split_accuracy:.4f}, unsplit {unsplit_accuracy:.4f}")
    assert abs(split_accuracy - unsplit_accuracy) <= 1 / len(y_te) + 1e-9


def test_train_refuses_a_server_with_another_bundle(digits_bundle_dir, serve_app, tmp_path):
    import shutil

    from server_torch.app import create_app

    other = tmp_path / "other"
    shutil.copytree(digits_bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"] = "something-else"
    (other / "manifest.json").write_text(json.dumps(manifest))
    srv = serve_app(create_app(digits_bundle_dir))
    code, _, err = in_process_redirected(
        "train", str(other), "--server", srv.url, "--epochs", "1", "--no-progress"
    )
    assert code == 2, err
    assert "409" in err and "Traceback" not in err


def test_demo_learns_and_matches_unsplit(tmp_path):
    result = spliteasy(
        "demo",
        "--epochs",
        "5",
        "--out",
        str(tmp_path / "demo"),
        "--json",
        "--no-progress",
        "--compare",
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "WARNING" not in result.stderr, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # --compare: the per-epoch curves (the paper's Figure 3) as JSON and PNG in the run folder
    curves = json.loads(Path(summary["compare"]["json"]).read_text())
    assert curves["epochs"] == [1, 2, 3, 4, 5]
    assert curves["split_accuracy"][-1] == summary["split_accuracy"]
    assert curves["unsplit_accuracy"][-1] == summary["unsplit_accuracy"]
    assert curves["max_abs_difference"] <= 2 / 360 + 1e-9
    assert Path(summary["compare"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(
        f"\ndemo: split {summary['split_accuracy']:.4f}, unsplit {summary['unsplit_accuracy']:.4f}, "
        f"{summary['steps']} steps, mean step {summary['mean_step_ms']}"
    )
    assert summary["split_accuracy"] >= 0.90
    # README: split and unsplit accuracies are the same; allow one held-out digit (of 360)
    # for a prediction tied at float32 rounding after 225 steps.
    assert abs(summary["split_accuracy"] - summary["unsplit_accuracy"]) <= 1 / 360 + 1e-9
    assert Path(tmp_path / "demo" / "steps.jsonl").exists()


def test_train_with_the_tflite_runtime(tmp_path, serve_app, digits_bundles):
    from server_torch.app import create_app

    bundle, _ = digits_bundles("double", SGD, ALL_RUNTIMES)
    manifest = json.loads((bundle / "manifest.json").read_text())
    formats = {
        a["format"] for s in manifest["slices"] if s["side"] == "device" for a in s["artifacts"]
    }
    assert {"savedmodel", "keras_weights", "tflite"} <= formats
    srv = serve_app(create_app(bundle))
    log = tmp_path / "steps.jsonl"
    code, out, err = in_process_redirected(
        "train", str(bundle), "--server", srv.url, "--runtime", "tflite",
        "--epochs", "1", "--log", str(log), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "runtime tflite" in out
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 45 and rows[-1]["loss"] < rows[0]["loss"]


def test_train_tflite_on_a_bundle_without_tflite_is_a_clear_error(digits_bundle_dir, serve_app):
    from server_torch.app import create_app

    srv = serve_app(create_app(digits_bundle_dir))
    code, _, err = in_process_redirected(
        "train", str(digits_bundle_dir), "--server", srv.url, "--runtime", "tflite",
        "--epochs", "1", "--no-progress",
    )  # fmt: skip
    assert code == 2 and "tflite" in err.lower(), err
    assert "Traceback" not in err


@pytest.mark.js
def test_train_with_the_tfjs_runtime_in_node(tmp_path, serve_app, digits_bundles):
    from server_torch.app import create_app

    bundle, _ = digits_bundles("double", SGD, ALL_RUNTIMES)
    srv = serve_app(create_app(bundle))
    log = tmp_path / "steps.jsonl"
    code, out, err = in_process_redirected(
        "train", str(bundle), "--server", srv.url, "--runtime", "tfjs",
        "--epochs", "1", "--log", str(log), "--no-progress",
    )  # fmt: skip
    assert code == 0, out + err
    rows = [json.loads(line) for line in log.read_text().splitlines() if '"loss"' in line]
    assert len(rows) >= 45 and rows[-1]["loss"] < rows[0]["loss"]
    for key in ("device_ms", "server_ms", "codec_ms", "wire_ms"):
        assert key in rows[0]
