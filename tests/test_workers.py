"""B on several workers (issue #11 item 3): ``spliteasy serve --mode parallel --workers 2``.

The real CLI as a child process: rank 0 serves HTTP on 127.0.0.1 and starts rank 1; the
two train B with torch.distributed (gloo, DDP with summed gradients, BatchNorm
statistics all-reduced). 4 Python TF devices x batch 8, SGD with momentum, digits-cnn
(BatchNorm in B), ``--sync-every 1``: after 5 rounds every variable of A, B and C -- B's
BatchNorm moving statistics included, read from the checkpoint rank 0 writes on SIGTERM
-- equals unsplit tf_keras training with batch 32 on the same concatenated batches
within 1e-4 relative. Then a dead worker: SIGKILL rank 1 and the server says so (503
``workers_failed``, health ``error``) and exits with status 1 instead of hanging.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from parallel_helpers import assert_equals_unsplit, b_weights_of_checkpoint, run_devices

from split_helpers import SGD_CFG, fixed_batches

N, B, ROUNDS, TOL = 4, 8, 5, 1e-4


def _children(pid: int) -> list[int]:
    """The worker processes rank 0 started: its direct children running ``serve``
    (Linux /proc; torch may start helpers of its own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"spliteasy_cli.main" in cmd and b"serve" in cmd:
                found.append(int(child))
    return found


def test_two_workers_train_b_exactly_as_one_large_batch(
    serve_bundle, digits_bundles, tmp_path
) -> None:
    from device_tf.reference import train_unsplit
    from shared_schema import load_manifest

    bundle, reference = digits_bundles("double", SGD_CFG)
    manifest = load_manifest(bundle)
    big = fixed_batches(ROUNDS, N * B)
    ref_losses = train_unsplit(reference, big, manifest.optimizer, manifest.loss)

    state = tmp_path / "state"
    srv = serve_bundle(
        bundle,
        "--mode", "parallel", "--workers", "2", "--devices-per-round", str(N),
        "--round-timeout", "120", "--state-dir", str(state), "--checkpoint-every", "0",
    )  # fmt: skip
    health = httpx.get(f"{srv.url}/v1/health").json()
    group = health["workers"]
    assert (group["world_size"], group["backend"], group["status"]) == (2, "gloo", "ok")
    run = run_devices(srv.url, bundle, big, N, B)
    assert run.covered == [N] * (N * ROUNDS)
    health = httpx.get(f"{srv.url}/v1/health").json()
    assert health["steps"] == health["parallel"]["rounds"] == ROUNDS
    timings = health["workers"]["timings_s"]
    assert timings["forward"]["calls"] == timings["backward"]["calls"] == ROUNDS

    workers = _children(srv.proc.pid)
    assert len(workers) == 1
    assert srv.stop() == -signal.SIGTERM  # rank 0 drains, checkpoints, stops rank 1
    deadline = time.monotonic() + 15
    while Path(f"/proc/{workers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{workers[0]}").exists(), "rank 1 outlived rank 0's stop"
    out = "".join(srv.output)
    assert "B on 2 workers" in out and "rank 1: stopped by rank 0" in out, out

    steps, b_weights = b_weights_of_checkpoint(state, bundle)
    assert steps == ROUNDS
    assert_equals_unsplit(
        f"parallel N={N} b={B} on 2 workers", run, b_weights, reference, ref_losses, TOL
    )


def test_a_dead_worker_is_reported_not_waited_for(serve_bundle, digits_bundle_dir) -> None:
    """One device with batch 1 in rounds of 2 (closed by their 4 s timeout): step 0 trains
    with an empty shard on rank 1. Step 1's forward waits for a second device; rank 1 is
    SIGKILLed: the forward is answered 503 workers_failed (not left hanging), rank 0
    exits with status 1."""
    import threading

    import numpy as np

    from shared_schema import MEDIA_TYPE, Frame, FrameKind, encode, load_manifest, manifest_digest

    srv = serve_bundle(
        digits_bundle_dir, "--mode", "parallel", "--workers", "2", "--worker-timeout", "20",
        "--devices-per-round", "2", "--round-timeout", "4",
    )  # fmt: skip
    manifest = load_manifest(digits_bundle_dir)
    created = httpx.post(
        f"{srv.url}/v1/sessions", json={"manifest_sha256": manifest_digest(digits_bundle_dir)}
    ).json()
    sid, token = created["session_id"], created["token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE}
    rng = np.random.default_rng(0)

    def frames(kind: FrameKind, spec, step: int) -> bytes:
        x = rng.normal(size=(1, *spec.sample_shape)).astype(np.float32)
        return encode([Frame(kind, spec.name, x, spec.layout, bytes.fromhex(sid), step)])

    def post(op: str, body: bytes) -> httpx.Response:
        return httpx.post(
            f"{srv.url}/v1/sessions/{sid}/{op}", content=body, headers=headers, timeout=60
        )

    # step 0: 1 row in the round, rank 1's shard is empty
    assert post("forward", frames(FrameKind.ACTIVATION, manifest.server_input, 0)).is_success
    assert post("backward", frames(FrameKind.GRADIENT, manifest.server_output, 0)).is_success
    assert httpx.get(f"{srv.url}/v1/health").json()["steps"] == 1

    body = frames(FrameKind.ACTIVATION, manifest.server_input, 1)
    replies: list[httpx.Response] = []
    forward = threading.Thread(target=lambda: replies.append(post("forward", body)))
    forward.start()
    time.sleep(0.5)  # the forward waits for a second device (up to 4 s)
    assert not replies
    (worker,) = _children(srv.proc.pid)
    t0 = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    forward.join(30)
    assert replies, "the waiting forward was never answered"
    assert replies[0].status_code == 503, replies[0].text
    assert replies[0].json()["error"] == "workers_failed"
    try:
        code = srv.proc.wait(15)
    except Exception:  # noqa: BLE001
        pytest.fail("rank 0 did not stop after its worker died:\n" + "".join(srv.output))
    out = "".join(srv.output)
    assert code == 1, out
    assert "B's worker group failed" in out and "worker rank 1" in out, out
    print(f"\nrank 0 answered 503 and stopped {time.monotonic() - t0:.1f} s after rank 1 died")
