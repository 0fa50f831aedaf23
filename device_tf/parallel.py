"""The device's part of ``--mode parallel`` (issue #11): averaging A and C with the round's
other devices through the server (``POST /v1/sessions/{sid}/sync``).

Every ``sync_every`` rounds each device uploads its slices' variables (not its data, not
its optimizer state) as safetensors with metadata ``sync`` (this device's sync count)
and ``batch`` (its samples per step, the averaging weight), and takes back the
batch-weighted average of every device of that sync. Its optimizer slots stay its own:
SGD's update is linear, so averaging the weights each round is averaging the updates.
A resent upload (a dropped connection) is answered from the server's store.
"""

from __future__ import annotations

import numpy as np

from .runtime import DeviceRuntime, RuntimeState
from .transport import HttpTransport


def sync_slices(transport: HttpTransport, runtime: DeviceRuntime, sync: int, batch: int) -> int:
    """Average this device's A and C with its peers' (sync number ``sync``); returns how
    many devices the average covered."""
    import json
    import struct

    from safetensors.numpy import load, save

    state = runtime.state()
    body = save(
        {k: np.ascontiguousarray(v) for k, v in state.slices.items()},
        metadata={"sync": str(sync), "batch": str(batch)},
    )
    session = transport.session
    if session is None:
        raise RuntimeError("open a session first")
    reply = transport._send(
        "POST",
        f"/v1/sessions/{session.session_id}/sync",
        content=body,
        headers={"Content-Type": "application/octet-stream", **transport._auth()},
    ).content
    averaged = load(reply)
    (n,) = struct.unpack_from("<Q", reply)
    meta = json.loads(reply[8 : 8 + n]).get("__metadata__") or {}
    runtime.load_state(RuntimeState(averaged, state.optimizer))
    return int(meta.get("devices", 0))


def with_sync(
    trainer: object, transport: HttpTransport, runtime: DeviceRuntime, every: int
) -> None:
    """Make ``trainer.step`` average A and C after every ``every``-th step (``spliteasy
    train`` against ``serve --mode parallel``; 0: never)."""
    if every <= 0:
        return
    step = trainer.step  # type: ignore[attr-defined]
    done = {"steps": 0, "syncs": 0}

    def step_and_sync(x: np.ndarray, y: np.ndarray):  # noqa: ANN202 - StepResult
        result = step(x, y)
        done["steps"] += 1
        if done["steps"] % every == 0:
            sync_slices(transport, runtime, done["syncs"], len(x))
            done["syncs"] += 1
        return result

    trainer.step = step_and_sync  # type: ignore[attr-defined]
