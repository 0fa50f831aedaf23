"""The browser page trains the real split against the real server, like the Node device.

``spliteasy serve`` mounts ``device_tf/js`` at ``/device``; the page at ``/device/web/``
loads TF.js from the npm packages there, fetches the manifest and the TF.js slices from
the server (``/v1/manifest``, ``/v1/bundle/...``), checks their hashes and trains A and C
in the page against B in torch, over loopback. Headless Debian Chromium drives it
(playwright-core, ``device_tf/js/tools/browser_run.mjs``). From the same initial weights
on the same 5 batches of ``digits-bn`` (BatchNormalization in A, B and C) its losses
match the Node device and unsplit tf_keras within 1e-4, and every variable -- A and C as
the page leaves them, B on the server, BN moving statistics included -- ends where
unsplit training leaves it, within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import chromium, has_route, node, run_node, write_batches

from split_helpers import ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches, rel

pytestmark = [pytest.mark.js, pytest.mark.browser]

TOL = 1e-4
STEPS, BATCH = 5, 32
SCHEMA = Path(__file__).resolve().parents[1] / "shared_schema" / "manifest.schema.json"


@pytest.fixture(scope="module")
def sgd_bundle():
    """A double-split digits-bn bundle (BN in A, B and C) with TF.js slices (read-only,
    from the cache), and its untrained unsplit model."""
    return digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, "digits-bn")


def test_browser_page_trains_like_node_and_unsplit(tmp_path, serve_app, page_files, sgd_bundle):
    from device_tf.keras_util import named_variables
    from device_tf.reference import clone_with_weights, train_unsplit
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest

    node()
    browser = chromium()
    bundle, reference = sgd_bundle
    reference = clone_with_weights(reference)
    manifest = load_manifest(bundle)
    batches = fixed_batches(STEPS, BATCH)
    data = write_batches(page_files(".frames"), batches)
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)

    # The Node device first, against its own fresh server.
    srv = serve_app(create_app(bundle))
    run_node(
        ["train.mjs", "--bundle", str(bundle), "--server", srv.url, "--data", str(data)]
        + [
            "--batch-size",
            str(BATCH),
            "--steps",
            str(STEPS),
            "--log-json",
            str(tmp_path / "node.json"),
        ]
    )
    node_losses = [r["loss"] for r in json.loads((tmp_path / "node.json").read_text())["records"]]
    srv.stop()

    app = create_app(bundle)
    srv = serve_app(app)
    query = f"data=../data/{data.name}&batch={BATCH}&steps={STEPS}&auto=1"
    if not has_route(f"{srv.url}/v1/schema"):
        # The server does not publish the schema: hand the page the repository's file.
        schema = page_files(".schema.json")
        shutil.copyfile(SCHEMA, schema)
        query += f"&schema=../data/{schema.name}"
    url = f"{srv.url}/device/web/?{query}"
    proc = run_node(["tools/browser_run.mjs", url, "--chromium", browser, "--timeout", "240000"])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result = out["result"]
    assert result is not None and result["status"] == "done", json.dumps(out, indent=1)[:4000]
    assert not out["errors"], out["errors"]

    losses = result["losses"]
    node_errs = [abs(a - b) / abs(b) for a, b in zip(losses, node_losses, strict=True)]
    ref_errs = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
    print(f"\nbrowser losses {[f'{v:.6f}' for v in losses]}")
    print(
        f"  vs node: {[f'{e:.1e}' for e in node_errs]}; vs unsplit: {[f'{e:.1e}' for e in ref_errs]}"
    )
    assert len(losses) == STEPS
    assert losses[-1] < losses[0]
    assert max(node_errs) <= TOL, (losses, node_losses)
    assert max(ref_errs) <= TOL, (losses, ref_losses)

    # The page shows what it did.
    dom = out["dom"]
    assert (dom["step"], dom["total"], dom["rows"]) == (str(STEPS), str(STEPS), STEPS)
    assert dom["loss"] == f"{losses[-1]:.4f}"
    assert dom["status"].startswith(f"done: {STEPS} steps")
    for r in result["records"]:
        assert r["server_ms"] > 0 and r["bytes_up"] > 0 and r["total_ms"] >= r["device_ms"]

    # A and C as the page left them, and B trained by the page's messages, are where
    # unsplit training leaves them: every variable, BN moving statistics included.
    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    got = keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B"))
    assert set(result["weights"]) == {"A", "C"}
    for held in result["weights"].values():
        for name, w in held.items():
            assert name not in got, name
            got[name] = np.asarray(w["data"], np.float32).reshape(w["shape"])
    assert set(got) == set(expected), set(got) ^ set(expected)
    errors = {name: rel(got[name], expected[name]) for name in got}
    worst = max(errors, key=errors.get)
    print(f"  page + server vs unsplit: largest weight rel err {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert all(np.isfinite(v).all() for v in got.values())
    assert any(k.startswith("a_bn/moving") for k in got) and any(
        k.startswith("c_bn/moving") for k in got
    )


def test_browser_page_reports_missing_data(serve_app, page_files, sgd_bundle):
    from server_torch.app import create_app

    node()
    browser = chromium()
    srv = serve_app(create_app(sgd_bundle[0]))
    schema = page_files(".schema.json")
    shutil.copyfile(SCHEMA, schema)
    url = f"{srv.url}/device/web/?data=../data/nothing-here.frames&schema=../data/{schema.name}&auto=1"
    proc = run_node(["tools/browser_run.mjs", url, "--chromium", browser, "--timeout", "120000"])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["result"]["status"] == "error"
    assert "cannot fetch the training data" in out["result"]["error"]
    assert "HTTP 404" in out["dom"]["status"]
