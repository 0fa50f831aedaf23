"""The TF.js device in Node over the WebSocket binding (issue #11): the same run as over
HTTP gives bit-identical weights of A, B and C, and a socket the server drops mid-step
(after B applied the message, before its reply) reconnects without applying it twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import chromium, node, run_node, write_batches

from split_helpers import ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches

pytestmark = pytest.mark.js

STEPS, BATCH = 5, 32
MODEL = "digits-bn"


def _run(bundle: Path, serve_app, data: Path, out: Path, transport: str, fault=None):
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec

    app = create_app(bundle)
    app.state.ws_fault = fault
    srv = serve_app(app)
    out.mkdir()
    args = ["train.mjs", "--server", srv.url, "--data", str(data), "--bundle", str(bundle)]
    args += ["--batch-size", str(BATCH), "--steps", str(STEPS), "--transport", transport]
    args += ["--log-json", str(out / "log.json"), "--weights-out", str(out / "weights.json")]
    proc = run_node(args)
    assert "done: 5 steps" in proc.stdout, proc.stdout + proc.stderr
    losses = [r["loss"] for r in json.loads((out / "log.json").read_text())["records"]]
    held = json.loads((out / "weights.json").read_text())
    weights = {
        name: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in held.values()
        for name, w in part.items()
    }
    weights.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    steps = app.state.trainer.steps
    srv.stop()
    return losses, weights, steps


def test_node_ws_equals_http_and_survives_a_dropped_socket(tmp_path, serve_app):
    node()
    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    data = write_batches(tmp_path / "train.frames", fixed_batches(STEPS, BATCH))
    http = _run(bundle, serve_app, data, tmp_path / "http", "http")
    ws = _run(bundle, serve_app, data, tmp_path / "ws", "ws")
    seen = {"forward": 0, "backward": 0}
    dropped = []

    def fault(op: str, rid: int) -> bool:
        seen[op] += 1
        if (op, seen[op]) in {("backward", 2), ("forward", 4)}:
            dropped.append(op)
            return True
        return False

    faulty = _run(bundle, serve_app, data, tmp_path / "faulty", "ws", fault)
    assert len(dropped) == 2
    for label, (losses, weights, steps) in (("ws", ws), ("ws+drops", faulty)):
        assert steps == STEPS, label  # nothing applied twice
        assert losses == http[0], label
        differ = [k for k in http[1] if not np.array_equal(weights[k], http[1][k])]
        assert not differ, (label, differ)
    print(f"\nnode: {len(http[1])} variables bit-identical over http, ws and ws with 2 drops")


def test_node_devices_in_parallel_mode_equal_unsplit_large_batch(tmp_path, serve_app):
    """Two Node devices (one over HTTP, one over WebSocket), batch 16 each, against
    ``--mode parallel`` rounds of 2 that average A and C every round: after 5 rounds every
    variable of A, B and C equals unsplit tf_keras with batch 32 within 1e-4 (digits-cnn:
    BatchNorm only in B; SGD with momentum)."""
    import subprocess

    from js_fixtures import JS_DIR

    from device_tf.keras_util import named_variables
    from device_tf.reference import train_unsplit
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest
    from split_helpers import rel

    node()
    bundle, reference = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES)
    manifest = load_manifest(bundle)
    half = 16
    big = fixed_batches(STEPS, 2 * half)
    ref_losses = train_unsplit(reference, big, manifest.optimizer, manifest.loss)
    app = create_app(bundle, mode="parallel", devices_per_round=2, round_timeout=120)
    srv = serve_app(app)
    procs = []
    for i, kind in enumerate(["http", "ws"]):
        part = slice(i * half, (i + 1) * half)
        data = write_batches(tmp_path / f"d{i}.frames", [(x[part], y[part]) for x, y in big])
        out = tmp_path / f"d{i}"
        out.mkdir()
        args = [node(), "train.mjs", "--server", srv.url, "--data", str(data)]
        args += ["--bundle", str(bundle), "--batch-size", str(half), "--steps", str(STEPS)]
        args += ["--transport", kind, "--log-json", str(out / "log.json")]
        args += ["--weights-out", str(out / "weights.json"), "--quiet"]
        procs.append(
            subprocess.Popen(args, cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert app.state.rounds.round_sizes == [2] * STEPS
    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    b_w = keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B"))
    losses = []
    for i in range(2):
        held = json.loads((tmp_path / f"d{i}" / "weights.json").read_text())
        got = dict(b_w)
        got.update(
            {
                name: np.asarray(w["data"], np.float32).reshape(w["shape"])
                for part in held.values()
                for name, w in part.items()
            }
        )
        errs = {k: rel(got[k], expected[k]) for k in expected}
        worst = max(errs, key=errs.get)
        print(f"\nnode device {i}: worst variable rel err {errs[worst]:.2e} ({worst})")
        assert errs[worst] <= 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:5]
        log = json.loads((tmp_path / f"d{i}" / "log.json").read_text())
        losses.append([r["loss"] for r in log["records"]])
    mean = np.mean(losses, axis=0)
    assert max(abs(a - b) / abs(b) for a, b in zip(mean, ref_losses, strict=True)) <= 1e-4


@pytest.mark.browser
def test_browser_page_over_websocket_in_parallel_mode(tmp_path, serve_app, page_files):
    """The page (native WebSocket, ``?transport=ws``) and a Node device (HTTP), batch 16
    each, in ``--mode parallel`` rounds of 2 that average A and C every round: the page
    syncs as the Node device does, so after 3 rounds both hold the same A and C bytes, and
    A, B and C equal unsplit tf_keras with batch 32 within 1e-4 (digits-cnn, SGD with
    momentum). The page's frames came over one socket."""
    import subprocess
    import urllib.request

    import httpx
    from js_fixtures import JS_DIR
    from test_js_browser import SCHEMA

    from device_tf.keras_util import named_variables
    from device_tf.reference import train_unsplit
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest
    from split_helpers import rel

    node()
    browser = chromium()
    steps, half = 3, 16
    bundle, reference = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES)
    manifest = load_manifest(bundle)
    big = fixed_batches(steps, 2 * half)
    train_unsplit(reference, big, manifest.optimizer, manifest.loss)
    app = create_app(bundle, mode="parallel", devices_per_round=2, round_timeout=120)
    srv = serve_app(app)
    node_data = write_batches(tmp_path / "node.frames", [(x[:half], y[:half]) for x, y in big])
    page_data = write_batches(page_files(".frames"), [(x[half:], y[half:]) for x, y in big])
    args = [node(), "train.mjs", "--server", srv.url, "--data", str(node_data), "--quiet"]
    args += ["--bundle", str(bundle), "--batch-size", str(half), "--steps", str(steps)]
    args += ["--weights-out", str(tmp_path / "node.json")]
    dev = subprocess.Popen(args, cwd=JS_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        query = f"data=../data/{page_data.name}&batch={half}&steps={steps}&auto=1&transport=ws"
        try:
            urllib.request.urlopen(f"{srv.url}/v1/schema", timeout=10).close()
        except OSError:
            schema = page_files(".schema.json")
            schema.write_bytes(SCHEMA.read_bytes())
            query += f"&schema=../data/{schema.name}"
        proc = run_node(
            ["tools/browser_run.mjs", f"{srv.url}/device/web/?{query}", "--chromium", browser]
            + ["--timeout", "240000"]
        )
        _, err = dev.communicate(timeout=240)
    finally:
        if dev.poll() is None:
            dev.kill()
    assert dev.returncode == 0, err.decode()[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result = out["result"]
    assert result is not None and result["status"] == "done", json.dumps(out, indent=1)[:4000]
    assert result["transport"] == {"kind": "ws", "connections": 1}, result["transport"]
    assert result["parallel"]["devices_per_round"] == 2 and result["syncs"] == steps
    assert app.state.rounds.round_sizes == [2] * steps
    assert 'method="WS"' in httpx.get(f"{srv.url}/metrics", timeout=60).text

    page = {
        name: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in result["weights"].values()
        for name, w in part.items()
    }
    held = json.loads((tmp_path / "node.json").read_text())
    node_w = {
        name: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in held.values()
        for name, w in part.items()
    }
    assert set(page) == set(node_w)
    assert all(np.array_equal(page[k], node_w[k]) for k in page)  # the same average
    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    got = {**keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")), **page}
    errs = {k: rel(got[k], expected[k]) for k in expected}
    worst = max(errs, key=errs.get)
    print(f"\npage (ws) + node (http), parallel: worst rel err {errs[worst]:.2e} ({worst})")
    assert errs[worst] <= 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:5]
