"""The device page's backends and its training worker (issue #12), in headless Chromium.

- webgl: headless Debian Chromium has WebGL 2 with float32 render targets (ANGLE on
  SwiftShader's Vulkan). The page trains the digits-bn bundle (BatchNormalization in A, B
  and C) on webgl, and its losses and final A/C variables match the cpu backend's within
  1e-4 relative over 5 steps.
- float16: with ``simulate=float16`` TF.js is told the GPU cannot render float32 textures
  (so webgl would really compute in float16). The page refuses webgl, says why (naming the
  measured drift) and trains on cpu -- exactly the cpu numbers; with ``f16=1`` (the user
  accepts the drift) it trains on webgl in float16, and the drift shows.
- A webgl run reloaded mid-run resumes from IndexedDB at its step, on webgl again.
- backend=webgpu: not offered yet (TF.js 4.22's webgpu backend reads back asynchronously
  only); the page trains on cpu and says why.
- The worker: with batches big enough that a step takes a few hundred ms, the page's own
  10 ms timer keeps ticking through every step (training does not block the page).

The bundle is the cached one the other TF.js tests use (never converted per test).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import chromium, node, run_node, write_batches

from split_helpers import ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches, rel

pytestmark = [pytest.mark.js, pytest.mark.browser]

TOL = 1e-4
STEPS, BATCH = 5, 32
SCHEMA = Path(__file__).resolve().parents[1] / "shared_schema" / "manifest.schema.json"


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The cached double-split digits-bn bundle with TF.js slices (read-only)."""
    return digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, "digits-bn")[0]


def run_page(serve_app, bundle: Path, page_files, data: Path, query: str, *extra: str) -> dict:
    """Train in the page against a fresh server; returns browser_run's report (``extra``:
    more browser_run.mjs options)."""
    from server_torch.app import create_app

    node()
    srv = serve_app(create_app(bundle))
    schema = page_files(".schema.json")
    shutil.copyfile(SCHEMA, schema)
    url = f"{srv.url}/device/web/?data=../data/{data.name}&schema=../data/{schema.name}&auto=1&{query}"
    proc = run_node(
        ["tools/browser_run.mjs", url, "--chromium", chromium(), "--timeout", "240000", *extra],
        timeout=300,
    )
    srv.stop()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["result"] is not None, json.dumps(out, indent=1)[:4000]
    return out


def weights_of(result: dict) -> dict[str, np.ndarray]:
    return {
        f"{part}/{name}": np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part, held in result["weights"].items()
        for name, w in held.items()
    }


def mean_device_ms(result: dict) -> float:
    # the first step pays shader compilation / warm-up: report the steady state
    recs = result["records"][1:] or result["records"]
    return float(np.mean([r["device_ms"] for r in recs]))


def test_webgl_trains_digits_like_cpu(serve_app, page_files, bundle):
    data = write_batches(page_files(".frames"), fixed_batches(STEPS, BATCH))
    q = f"batch={BATCH}&steps={STEPS}"
    cpu = run_page(serve_app, bundle, page_files, data, q + "&backend=cpu")
    gl = run_page(serve_app, bundle, page_files, data, q + "&backend=webgl")
    for out in (cpu, gl):
        assert out["result"]["status"] == "done", json.dumps(out, indent=1)[:4000]
        assert not out["errors"], out["errors"]
    c, g = cpu["result"], gl["result"]
    assert c["backend"]["name"] == "cpu"
    assert g["backend"]["name"] == "webgl" and g["backend"]["float32"] is True
    assert g["backend"]["refused"] is None
    assert g["backend"]["drift"] <= 1e-5, g["backend"]  # float32 arithmetic, not float16
    assert all(r["backend"] == "webgl" for r in g["records"])
    assert gl["dom"]["backendUsed"] == "webgl" and "float32" in gl["dom"]["backendNote"]
    assert (
        gl["dom"]["status"].startswith(f"done: {STEPS} steps") and "on webgl" in gl["dom"]["status"]
    )

    errs = [abs(a - b) / abs(b) for a, b in zip(g["losses"], c["losses"], strict=True)]
    wc, wg = weights_of(c), weights_of(g)
    assert set(wc) == set(wg)
    werr = {k: rel(wg[k], wc[k]) for k in wc}
    worst = max(werr, key=werr.get)
    print(f"\nwebgl: {g['backend']['note']}")
    print(f"  losses cpu {[f'{v:.6f}' for v in c['losses']]}")
    print(
        f"  webgl vs cpu: losses max rel err {max(errs):.1e}; weights {werr[worst]:.1e} ({worst})"
    )
    print(
        f"  mean device ms per step (steps 2-{STEPS}): cpu {mean_device_ms(c):.1f}, "
        f"webgl {mean_device_ms(g):.1f}"
    )
    assert len(g["losses"]) == STEPS
    assert max(errs) <= TOL, (g["losses"], c["losses"])
    assert werr[worst] <= TOL, sorted(werr.items(), key=lambda kv: -kv[1])[:5]


def test_float16_only_gpu_is_refused_unless_accepted(serve_app, page_files, bundle):
    data = write_batches(page_files(".frames"), fixed_batches(STEPS, BATCH))
    q = f"batch={BATCH}&steps={STEPS}&backend=webgl&simulate=float16"
    refused = run_page(serve_app, bundle, page_files, data, q)
    r = refused["result"]
    assert r["status"] == "done", json.dumps(refused, indent=1)[:4000]
    b = r["backend"]
    print(f"\nrefused: {b['note']}")
    assert (b["name"], b["requested"], b["refused"]) == ("cpu", "webgl", "webgl")
    assert b["drift"] > 1e-5  # the probe saw float16 arithmetic
    assert "float16" in b["note"] and "training on cpu" in b["note"].lower()
    assert "refused" in refused["dom"]["backendNote"] and refused["dom"]["backendUsed"] == "cpu"
    assert all(rec["backend"] == "cpu" for rec in r["records"])

    accepted = run_page(serve_app, bundle, page_files, data, q + "&f16=1")
    a = accepted["result"]
    assert a["status"] == "done", json.dumps(accepted, indent=1)[:4000]
    assert a["backend"]["name"] == "webgl" and a["backend"]["float32"] is False
    assert "float16" in a["backend"]["note"]
    errs = [abs(x - y) / abs(y) for x, y in zip(a["losses"], r["losses"], strict=True)]
    print(f"  accepted: {a['backend']['note']}")
    print(f"  float16 webgl vs cpu: losses max rel err {max(errs):.1e}")
    assert a["losses"][-1] < a["losses"][0]  # it does train


def test_worker_keeps_the_page_responsive(serve_app, page_files, bundle):
    steps, batch = 3, 400
    data = write_batches(page_files(".frames"), fixed_batches(steps, batch))
    out = run_page(serve_app, bundle, page_files, data, f"batch={batch}&steps={steps}")
    r = out["result"]
    assert r["status"] == "done", json.dumps(out, indent=1)[:4000]
    recs = r["records"]
    longest = max(recs, key=lambda q: q["device_ms"])
    print(
        f"\nsteps' device ms {[round(q['device_ms']) for q in recs]}, page timer ticks during "
        f"each {[q['ui_ticks'] for q in recs]}, longest gap between ticks {r['ui']['maxGapMs']:.0f} ms"
    )
    # the steps are long enough to matter: a page that computed them itself would freeze
    assert longest["device_ms"] >= 100, longest
    # ...but the page's 10 ms timer kept running through each of them
    for q in recs:
        assert q["ui_ticks"] >= q["total_ms"] / 10 / 4, q
    assert r["ui"]["maxGapMs"] < max(longest["device_ms"] / 2, 50), r["ui"]


def test_webgpu_request_trains_on_cpu_and_says_why(serve_app, page_files, bundle):
    data = write_batches(page_files(".frames"), fixed_batches(2, BATCH))
    out = run_page(serve_app, bundle, page_files, data, f"batch={BATCH}&steps=2&backend=webgpu")
    r = out["result"]
    assert r["status"] == "done", json.dumps(out, indent=1)[:4000]
    b = r["backend"]
    print(f"\nwebgpu requested: {b['note']}")
    assert (b["name"], b["requested"]) == ("cpu", "webgpu")
    assert "training on cpu" in b["note"] and "WebGPU" in b["note"]
    assert out["dom"]["backendUsed"] == "cpu"


def test_webgl_run_reloaded_mid_run_resumes_on_webgl(serve_app, page_files, bundle):
    """The worker keeps the run in IndexedDB: a reload in the middle of a webgl run resumes
    at the step it had reached, on webgl again (the backend is one of the run's settings)."""
    steps, at = 6, 3
    data = write_batches(page_files(".frames"), fixed_batches(steps, BATCH))
    q = f"batch={BATCH}&steps={steps}"
    cpu = run_page(serve_app, bundle, page_files, data, q)
    out = run_page(
        serve_app, bundle, page_files, data, q + "&backend=webgl", "--reload-at-step", str(at)
    )
    r = out["result"]
    assert r["status"] == "done", json.dumps(out, indent=1)[:4000]
    assert out["reload"] == {"at": at, "stepBefore": at}
    assert r["resumedAt"] == at and out["dom"]["resume"].startswith(f"resumed at step {at}")
    assert r["backend"]["name"] == "webgl"
    assert [q["step"] for q in r["records"]] == list(range(at, steps))
    assert all(q["backend"] == "webgl" for q in r["records"])
    want = cpu["result"]["losses"][at:]
    errs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], want, strict=True)]
    print(
        f"\nwebgl resumed at {at}: losses vs an uninterrupted cpu run, max rel err {max(errs):.1e}"
    )
    assert max(errs) <= TOL
