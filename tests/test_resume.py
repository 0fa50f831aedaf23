"""Crash recovery end to end: real ``spliteasy serve`` / ``spliteasy train`` processes on
127.0.0.1 killed with SIGKILL at a random step of a 30-step run and restarted on their
state dirs. The final A, B and C (and both sides' optimizer state, Adam's step counts
included) must equal an uninterrupted run's within 1e-6 relative: the same batches in
the same order, no step lost, none applied twice.

The server checkpoints every 5 steps, so a killed server comes back a few steps behind
the device, which must roll back to its snapshot of that step and replay. Each
configuration's uninterrupted run is computed once (``reference``), bundles come from
the shared conversion cache.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from resume_helpers import STEPS_30, Device, Server, compare, final_state, uninterrupted

from split_helpers import ADAM_CFG, ALL_RUNTIMES, SGD_CFG

OPTIMIZERS = {"sgd": SGD_CFG, "adam": ADAM_CFG}
CONFIGS = [("double", "sgd"), ("double", "adam"), ("single", "sgd"), ("single", "adam")]
TOL = 1e-6


@pytest.fixture(scope="module")
def reference(digits_bundles, tmp_path_factory) -> Callable[..., tuple[Path, dict]]:
    """``get(split, opt, runtime="tf")`` -> (bundle, final state of an uninterrupted run)."""
    done: dict[tuple[str, str, str], tuple[Path, dict]] = {}

    def get(split: str, opt: str, runtime: str = "tf") -> tuple[Path, dict]:
        key = (split, opt, runtime)
        if key not in done:
            bundle, _ = digits_bundles(split, OPTIMIZERS[opt], runtimes=ALL_RUNTIMES)
            work = tmp_path_factory.mktemp(f"ref-{split}-{opt}-{runtime}")
            done[key] = (bundle, uninterrupted(bundle, work, STEPS_30, runtime))
        return done[key]

    return get


def _crash_run(bundle: Path, work: Path, kill: str, at: int, runtime: str = "tf") -> dict:
    """A 30-step run with ``kill`` ("server", "device" or "both") SIGKILLed after step ``at``."""
    server = Server(bundle, work / "server-state").start()
    device = Device(bundle, work, STEPS_30, runtime)
    try:
        device.start(server.url)
        device.wait_for_step(at)
        if kill in ("server", "both"):
            server.kill()
        if kill in ("device", "both"):
            device.kill()
        if kill != "device":
            time.sleep(0.5)  # the device (if alive) meets a dead server and waits
            server.start()
        if kill != "server":
            device.start(server.url)
        device.finish()
        assert server.health()["steps"] == 30, server.health()
        state = final_state(server, device)
    finally:
        device.stop()
        server.stop()
    out = device.output()
    print(f"--- device output ({kill} killed after step {at}) ---\n{out}")
    if kill == "server":
        assert "unreachable" in out and "is back" in out, out
    if kill != "server":
        assert "resuming session" in out, out
    if kill != "device":
        assert "rolling back" in out, out
    _no_plain_token(work)
    return state


def _no_plain_token(work: Path) -> None:
    """The token is in the device's session.json (0600) and nowhere else on disk."""
    session = work / "device-state" / "session.json"
    assert session.stat().st_mode & 0o777 == 0o600
    token = json.loads(session.read_text())["token"].encode()
    for path in work.rglob("*"):
        if path.is_file() and path != session:
            assert token not in path.read_bytes(), f"the token is in {path}"


@pytest.mark.parametrize(("split", "opt"), CONFIGS, ids=[f"{s}-{o}" for s, o in CONFIGS])
@pytest.mark.parametrize("kill", ["server", "device", "both"])
def test_killed_run_equals_uninterrupted(split, opt, kill, reference, tmp_path) -> None:
    bundle, want = reference(split, opt)
    # a step the server's checkpoints (every 5) do not hold: a killed server comes back behind
    at = random.Random(f"{split}-{opt}-{kill}").choice([k for k in range(3, 26) if k % 5 in (1, 2)])
    got = _crash_run(bundle, tmp_path, kill, at)
    assert got["dev/step"] == 30
    if opt == "adam":  # Adam's step count survived on both sides
        assert got["dev-opt/A/iterations"] == 30
        assert any(k.startswith("B-opt/") and k.endswith("/step") for k in got), sorted(got)
    assert compare(got, want) <= TOL


@pytest.mark.parametrize(("split", "opt"), [("double", "sgd"), ("single", "adam")])
def test_device_dies_after_the_server_applied_a_step(split, opt, reference, tmp_path) -> None:
    """The device dies after step 12's reply and before saving it: the restarted device
    redoes step 12 from its snapshot, and the server answers it from its retry store
    (the same request bytes: A's forward is deterministic), applying nothing twice."""
    from device_tf.state import CRASH_ENV, CRASH_EXIT_CODE

    bundle, want = reference(split, opt)
    server = Server(bundle, tmp_path / "server-state").start()
    device = Device(bundle, tmp_path, STEPS_30)
    try:
        device.start(server.url, env={CRASH_ENV: "13"})
        assert device.proc.wait(300) == CRASH_EXIT_CODE, device.output()
        assert server.health()["steps"] == 13  # steps 0..12 applied, 12 unknown to the device
        device.start(server.url)
        device.finish()
        assert server.health()["steps"] == 30
        got = final_state(server, device)
    finally:
        device.stop()
        server.stop()
    out = device.output()
    print(out)
    assert "resuming session" in out and "at step 12 of 30" in out and "expects step 13" in out
    records = [json.loads(line) for line in device.log.read_text().splitlines()]
    assert [r["step"] for r in records] == [*range(12), *range(12, 30)]
    assert [r["step"] for r in records if r["replayed"]] == [12]
    assert compare(got, want) <= TOL


def test_tflite_device_resumes(reference, tmp_path) -> None:
    """The TFLite runtime's state (save/restore signatures) survives both sides dying."""
    bundle, want = reference("double", "adam", runtime="tflite")
    got = _crash_run(bundle, tmp_path, "both", 17, runtime="tflite")
    assert got["dev-opt/A/iterations"] == got["dev-opt/C/iterations"] == 30
    assert compare(got, want) <= TOL


def _train_cli(bundle: Path, state_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "spliteasy_cli.main", "train", str(bundle),
        "--server", "http://127.0.0.1:9", *STEPS_30, "--state-dir", str(state_dir),
        "--no-progress", "--reconnect-timeout", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_state_dir_of_another_bundle_or_run_is_refused(digits_bundles, tmp_path) -> None:
    from device_tf.data import load_digits_split
    from device_tf.state import DeviceState, RunSpec, data_digest
    from shared_schema import manifest_digest

    double, _ = digits_bundles("double", SGD_CFG, runtimes=ALL_RUNTIMES)
    single, _ = digits_bundles("single", SGD_CFG, runtimes=ALL_RUNTIMES)
    state_dir = tmp_path / "state"
    x, y, _, _ = load_digits_split()
    spec = RunSpec(manifest_digest(double), "tf", False, data_digest(x, y), len(x), 1, 48, 0)
    DeviceState(state_dir, spec).write_session("0" * 32, "secret-token")  # a double-split run
    assert (state_dir / "session.json").stat().st_mode & 0o777 == 0o600

    other = _train_cli(single, state_dir)
    assert other.returncode == 2, other.stderr
    assert "belongs to another bundle" in other.stderr, other.stderr
    assert "Traceback" not in other.stderr

    settings = _train_cli(double, state_dir, "--seed", "1")
    assert settings.returncode == 2, settings.stderr
    assert "other settings" in settings.stderr and "seed 0 -> 1" in settings.stderr
