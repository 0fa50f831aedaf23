"""A real network's device slices train at usable speed in the TF.js device (issue #12).

ResNet50 at 96 px, batch 16, A = the stem (``pool1_pool``: 7x7/2 convolution, BN, ReLU, max
pooling), C = the head (``conv5_block3_out`` onward), B = everything between, in torch
behind the real server. With the cpu backend's own kernels one step of A took minutes (the
stem's filter gradient alone ~150 s); with ``src/kernels.mjs`` the Node device trains 3
steps in seconds, and its first loss is the Python TF device's on the same bundle and batch.

Later steps are not compared: A's first update here is dominated by rounding noise. B opens
with convolutions into training-mode BatchNormalization, whose backward output has zero mean
per channel, so dL/da sums to ~0 over positions and conv1_bn's beta (and, through conv1_bn,
conv1's kernel and bias) get gradients that are cancellation residue -- TF and TF.js (with
the backend's own kernels or these) differ there by ~2% after one step, as two float32
summation orders do. The kernels themselves are held to 1e-4 by test_js_kernels.py.
The bundle comes from the cache (``zoo_helpers.device_bundle``), shared with the benchmark.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import node, run_node, write_batches
from zoo_helpers import DEVICE_SIZE, device_bundle, on

from split_helpers import split_run

pytestmark = [pytest.mark.js, pytest.mark.slow, on("resnet50")]

BATCH, STEPS = 16, 3


def _batches(seed: int = 12) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.random((BATCH, DEVICE_SIZE, DEVICE_SIZE, 3), dtype=np.float32),
            rng.integers(0, 10, BATCH).astype(np.int32),
        )
        for _ in range(STEPS)
    ]


@pytest.mark.timeout(900)  # the first run converts the bundle (~1-2 min); cached after
def test_resnet50_stem_and_head_train_in_node_like_the_tf_device(tmp_path: Path, serve_app) -> None:
    from device_tf.tf_runtime import TFRuntime
    from server_torch.app import create_app

    node()
    bundle = device_bundle("resnet50")
    batches = _batches()
    data = write_batches(tmp_path / "train.frames", batches)

    srv = serve_app(create_app(bundle))
    args = ["train.mjs", "--server", srv.url, "--bundle", str(bundle), "--data", str(data)]
    args += [
        "--batch-size",
        str(BATCH),
        "--steps",
        str(STEPS),
        "--log-json",
        str(tmp_path / "log.json"),
    ]
    proc = run_node(args, timeout=300)
    assert f"done: {STEPS} steps" in proc.stdout, proc.stdout
    records = json.loads((tmp_path / "log.json").read_text())["records"]
    js_losses = [r["loss"] for r in records]
    device_s = [r["device_ms"] / 1000 for r in records]
    srv.stop()

    (tf_loss,), _ = split_run(bundle, TFRuntime.from_bundle(bundle), batches[:1], serve_app)
    err = abs(js_losses[0] - tf_loss) / abs(tf_loss)
    print(
        f"\nresnet50 stem/head {DEVICE_SIZE} px batch {BATCH}: TF.js device compute per step "
        f"{[f'{s:.2f}' for s in device_s]} s; losses {[f'{v:.5f}' for v in js_losses]}; "
        f"step 1 vs the TF device {tf_loss:.5f} (rel {err:.1e})"
    )
    assert len(records) == STEPS and all(math.isfinite(v) for v in js_losses)
    assert err <= 1e-4, (js_losses, tf_loss)
    # Was minutes per step with the cpu backend's own kernels (issue #12).
    assert max(device_s) < 30, device_s
