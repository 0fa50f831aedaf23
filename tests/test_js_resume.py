"""The TF.js device keeps what it trained: either side SIGKILLed mid-run, restarted, same weights.

Real processes on 127.0.0.1: ``node device_tf/js/train.mjs --state-dir DIR`` against B in
torch (uvicorn in a thread, or ``spliteasy serve --state-dir`` as a child when the server is
the one killed), and the device page in headless Chromium.

- Node device SIGKILLed at a random step and started again with the same state dir: it
  resumes its session at the step its ``latest/`` snapshot holds and finishes; A, C (read
  from the state dir with Python's ``safetensors``, so the JS writer is checked too), their
  optimizer state and B equal an uninterrupted run's within 1e-6 relative.
- ``spliteasy serve`` SIGKILLed mid-run and restarted on its state dir: the device waits
  (bounded backoff; a line when it loses the server, one when it is back), gets 409 step_conflict naming the server's
  checkpointed step, rolls back to its snapshot of that step, replays, and ends with the
  same A, B and C as an uninterrupted run (Adam: the step count survives).
- The page reloaded mid-step resumes from IndexedDB at the step it had reached, finishes,
  and leaves B where the uninterrupted Node run leaves it.

The model is ``digits-bn`` (BatchNormalization in A, B and C), the bundles those of the
other TF.js tests, from the on-disk cache (``digits_bundle(None, ...)``): no conversion here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import JS_DIR, chromium, node, run_node, write_batches

from split_helpers import ADAM_CFG, ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches, rel

pytestmark = pytest.mark.js

STEPS, BATCH = 30, 32
TOL = 1e-6
MODEL = "digits-bn"  # BatchNormalization in A, B and C: moving statistics must survive too


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """30 fixed batches of the digits, in order, as one JS data file. (Session-scoped:
    cheap, and not a module fixture that would tie every test of this module to one
    xdist worker -- conftest groups the tests that share ``reference_runs`` or
    ``served_reference``, the costly ones.)"""
    return write_batches(
        tmp_path_factory.mktemp("resume") / "train.frames", fixed_batches(STEPS, BATCH)
    )


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, train_data):
    """``get(split, opt)`` -> the uninterrupted run of that bundle, computed once per module:
    {"state": its state dir, "b": B's final weights, "losses": per-step losses}."""
    from server_torch.app import create_app
    from server_torch.serving import ServerThread

    done: dict[tuple, dict] = {}

    def get(split: str, opt: dict) -> dict:
        key = (split, opt["name"])
        if key not in done:
            bundle, _ = digits_bundle(None, split, opt, ALL_RUNTIMES, MODEL)
            out = tmp_path_factory.mktemp(f"ref-{split}-{opt['name']}")
            app = create_app(bundle)
            with ServerThread(app) as srv:
                log = out / "log.json"
                run_node(_args(bundle, srv.url, train_data, out / "state", "--log-json", str(log)))
                b = _server_b(app, bundle)
            losses = [r["loss"] for r in json.loads(log.read_text())["records"]]
            done[key] = {"state": out / "state", "b": b, "losses": losses}
        return done[key]

    return get


def _args(bundle: Path, url: str, data: Path, state: Path, *extra: str) -> list[str]:
    return [
        "train.mjs", "--bundle", str(bundle), "--server", url, "--data", str(data),
        "--batch-size", str(BATCH), "--steps", str(STEPS), "--state-dir", str(state),
        "--reconnect-timeout", "120", *extra,
    ]  # fmt: skip


class NodeDevice:
    """``node train.mjs`` as a child whose output goes to a file we can watch."""

    running: list[NodeDevice] = []  # killed at the end of each test (a failed one included)

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [node(), *args], cwd=JS_DIR, stdout=self._out, stderr=subprocess.STDOUT, text=True
        )
        NodeDevice.running.append(self)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                pytest.fail(f"node exited {self.proc.returncode} before {needle!r}:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {needle!r} within {timeout} s:\n{self.text()}")
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()

    def finish(self, timeout: float = 300.0) -> str:
        code = self.proc.wait(timeout)
        self._out.close()
        if code != 0:
            pytest.fail(f"node exited {code}:\n{self.text()}")
        return self.text()


@pytest.fixture(autouse=True)
def _no_stray_devices():
    yield
    while NodeDevice.running:
        dev = NodeDevice.running.pop()
        if dev.proc.poll() is None:
            dev.proc.kill()
            dev.proc.wait(30)
        dev._out.close()


def _device_state(state: Path) -> dict[str, dict[str, np.ndarray]]:
    """The state dir's latest/ snapshot, read (and verified) by the Python side."""
    from safetensors.numpy import load

    from shared_schema.durable import read_dir

    files = read_dir(state / "latest")
    progress = json.loads(files["progress.json"])
    return {
        "slices": load(files["slices.safetensors"]),
        "optimizer": load(files["optimizer.safetensors"]),
        "progress": progress,
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], label: str) -> None:
    assert set(got) == set(want), (label, set(got) ^ set(want))
    errors = {k: rel(np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)) for k in want}
    worst = max(errors, key=errors.get)
    print(f"  {label}: {len(errors)} tensors, largest rel err {errors[worst]:.1e} ({worst})")
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def _server_b(app, bundle: Path) -> dict[str, np.ndarray]:
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec

    return keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B"))


def _checkpointed_b(state_dir: Path) -> dict[str, np.ndarray]:
    """B (torch names) from the server's newest checkpoint."""
    from safetensors.numpy import load

    from shared_schema.durable import Series

    newest = Series(state_dir, prefix="ckpt-").newest()
    assert newest is not None, f"no checkpoint in {state_dir}"
    return load(newest.files["b.safetensors"])


@pytest.mark.parametrize(
    ("split", "opt"),
    [("double", SGD_CFG), ("single", ADAM_CFG)],
    ids=["double-sgd_momentum", "single-adam"],
)
def test_node_device_killed_and_restarted_ends_as_uninterrupted(
    tmp_path, serve_app, train_data, reference_runs, split, opt
):
    from server_torch.app import create_app

    node()
    bundle, _ = digits_bundle(None, split, opt, ALL_RUNTIMES, MODEL)
    ref = reference_runs(split, opt)  # the uninterrupted run, against its own fresh B
    ref_state, ref_b = ref["state"], ref["b"]

    app = create_app(bundle)
    srv = serve_app(app)
    state = tmp_path / "state"
    kill_at = random.Random(f"{split}-{os.getpid()}").randint(5, 20)
    dev = NodeDevice(_args(bundle, srv.url, train_data, state), tmp_path / "first.log")
    dev.wait_for(f"step {kill_at}/{STEPS} ")
    dev.kill()
    saved = _device_state(state)["progress"]["step"]
    print(f"\n{split}: device SIGKILLed after 'step {kill_at}/'; latest/ holds step {saved}")
    assert kill_at <= saved < STEPS
    session = json.loads((state / "session.json").read_text())
    assert (state / "session.json").stat().st_mode & 0o077 == 0  # the token is not world-readable

    out = NodeDevice(_args(bundle, srv.url, train_data, state), tmp_path / "second.log").finish()
    assert f"resumed at step {saved}/{STEPS} (session {session['session_id'][:8]}" in out, out
    steps_run = [line.split()[1] for line in out.splitlines() if line.startswith("step ")]
    assert steps_run == [f"{n}/{STEPS}" for n in range(saved + 1, STEPS + 1)], out
    assert json.loads((state / "session.json").read_text())["token"] == session["token"]

    got, want = _device_state(state), _device_state(ref_state)
    assert got["progress"]["step"] == want["progress"]["step"] == STEPS
    assert got["progress"]["done"] is True
    _assert_same(got["slices"], want["slices"], "A and C")
    _assert_same(got["optimizer"], want["optimizer"], "optimizer slots and iterations")
    assert int(got["optimizer"]["A/iterations"]) == STEPS
    _assert_same(_server_b(app, bundle), ref_b, "B")
    assert app.state.trainer.steps == STEPS  # nothing applied twice

    # Run again: the finished run trains nothing. Another bundle's state dir is refused.
    again = run_node(_args(bundle, srv.url, train_data, state)).stdout
    assert f"holds this run, finished at step {STEPS}: nothing to train" in again, again
    # (the Adam bundles of the other split: in the cache already)
    other, _ = digits_bundle(
        None, "single" if split == "double" else "double", ADAM_CFG, ALL_RUNTIMES, MODEL
    )
    proc = subprocess.run(
        [node(), *_args(other, srv.url, train_data, state)],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "the saved state belongs to another bundle (manifest" in proc.stderr, proc.stderr
    assert app.state.trainer.steps == STEPS


def _serve_args(state_dir: Path, port: int) -> list[str]:
    return ["--state-dir", str(state_dir), "--checkpoint-every", "5", "--port", str(port)]


@pytest.fixture(scope="module")
def served_reference(tmp_path_factory, train_data) -> dict:
    """The uninterrupted double-split Adam run against the app ``spliteasy serve
    --state-dir --checkpoint-every 5`` builds, served in this process (no torch start-up
    in a child; ``stop()`` writes the final checkpoint, as SIGTERM does):
    {"state": the device's state dir, "b": B from the server's final checkpoint}."""
    import torch

    from server_torch.app import create_app
    from server_torch.serving import ServerThread, configure_threads

    bundle, _ = digits_bundle(None, "double", ADAM_CFG, ALL_RUNTIMES, MODEL)
    tmp = tmp_path_factory.mktemp("served-ref")
    threads = torch.get_num_threads()
    configure_threads()  # serve's torch threads
    try:
        app = create_app(bundle, state_dir=tmp / "server", checkpoint_every=5)
        with ServerThread(app) as srv:
            run_node(_args(bundle, srv.url, train_data, tmp / "device"))
    finally:
        torch.set_num_threads(threads)
    return {"state": tmp / "device", "b": _checkpointed_b(tmp / "server")}


@pytest.mark.parametrize("killed", ["server", "both"])
def test_server_killed_and_restarted_device_rolls_back_and_ends_as_uninterrupted(
    tmp_path, serve_bundle, free_port, train_data, served_reference, killed
):
    """SIGKILL the server (and, with "both", the device too) after step 12; the server
    restarts from its step-10 checkpoint. The device that kept running gets 409
    step_conflict; a restarted device learns it from GET /v1/sessions/{sid}. Either way it
    rolls back to its durable/ snapshot of step 10 and replays."""
    node()
    bundle, _ = digits_bundle(None, "double", ADAM_CFG, ALL_RUNTIMES, MODEL)
    srv_dir = tmp_path / "server"
    srv = serve_bundle(bundle, *_serve_args(srv_dir, free_port))
    state = tmp_path / "device"
    dev = NodeDevice(_args(bundle, srv.url, train_data, state), tmp_path / "device.log")
    dev.wait_for(f"step 12/{STEPS} ")
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(30)
    if killed == "both":
        dev.kill()
        saved = _device_state(state)["progress"]["step"]
    else:
        dev.wait_for("unreachable")  # the device waits for the server instead of failing
    srv = serve_bundle(bundle, *_serve_args(srv_dir, free_port))  # same state dir, same port
    assert srv.url.endswith(f":{free_port}")
    if killed == "both":
        dev = NodeDevice(_args(bundle, srv.url, train_data, state), tmp_path / "device2.log")
        out = dev.finish()
        assert (
            f"server holds this session at step 10 (its checkpoint): rolled back from step {saved}"
            in out
        ), out
        assert f"resumed at step 10/{STEPS}" in out, out
    else:
        out = dev.finish()
        assert "retrying with backoff for up to 120 s" in out and "is back after" in out, out
        assert (
            "server resumed this session at step 10 (its checkpoint): rolled back from step" in out
        ), out
    print(
        f"\n{killed}: "
        + " | ".join(
            line for line in out.splitlines() if "spliteasy-js" in line or "resumed" in line
        )
    )
    srv.stop()

    got, want = _device_state(state), _device_state(served_reference["state"])
    assert got["progress"]["step"] == STEPS
    _assert_same(got["slices"], want["slices"], "A and C")
    _assert_same(got["optimizer"], want["optimizer"], "optimizer slots and Adam's step count")
    assert int(got["optimizer"]["C/iterations"]) == STEPS
    _assert_same(_checkpointed_b(srv_dir), served_reference["b"], "B")


@pytest.mark.browser
def test_browser_page_reloaded_mid_run_resumes_from_indexeddb(
    tmp_path, serve_app, train_data, reference_runs
):
    from server_torch.app import create_app

    node()
    browser = chromium()
    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    ref = reference_runs("double", SGD_CFG)  # the uninterrupted Node run
    ref_b, node_losses = ref["b"], ref["losses"]

    data_dir = JS_DIR / "data"  # what the page fetches from /device/data/ (gitignored)
    data_dir.mkdir(exist_ok=True)
    page_data = data_dir / f"test-{uuid.uuid4().hex[:12]}.frames"
    page_data.write_bytes(train_data.read_bytes())
    try:
        app = create_app(bundle)
        srv = serve_app(app)
        at = 9
        url = f"{srv.url}/device/web/?data=../data/{page_data.name}&batch={BATCH}&steps={STEPS}&auto=1"
        proc = run_node(
            ["tools/browser_run.mjs", url, "--chromium", browser, "--timeout", "240000"]
            + ["--reload-at-step", str(at)]
        )
    finally:
        page_data.unlink(missing_ok=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result, dom = out["result"], out["dom"]
    assert result is not None and result["status"] == "done", json.dumps(out, indent=1)[:4000]
    # the only failed request is the one the reload cut off
    assert all("ERR_ABORTED" in e and "/forward" in e for e in out["errors"]), out["errors"]
    print(f"\nreloaded at {out['reload']}; page: {dom['resume']!r}; {dom['status']!r}")
    assert out["reload"] == {"at": at, "stepBefore": at}
    assert result["resumedAt"] == at
    assert dom["resume"].startswith(f"resumed at step {at} of {STEPS}")
    assert dom["step"] == str(STEPS) and dom["rows"] == STEPS - at
    assert [r["step"] for r in result["records"]] == list(range(at, STEPS))
    errs = [abs(a - b) / abs(b) for a, b in zip(result["losses"], node_losses[at:], strict=True)]
    print(f"  resumed steps' losses vs node: max rel err {max(errs):.1e}")
    assert max(errs) <= TOL
    _assert_same(_server_b(app, bundle), ref_b, "B")
    assert app.state.trainer.steps == STEPS  # step 9's forward was applied once, replayed once


def test_node_device_through_a_faulty_link_ends_as_a_clean_run(
    tmp_path, serve_app, train_data, reference_runs
):
    """Connections dropped before the server, after it applied a request, and reset in the
    middle of a request or a reply (netem's proxy, 25 % of session requests): the device
    retries, the server answers repeats from its retry store, and the weights end exactly
    where the fault-free run leaves them, with B stepped once per step."""
    from netem import Fault, FaultProxy, FaultSchedule, path_matches
    from server_torch.app import create_app

    node()
    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    ref = reference_runs("double", SGD_CFG)
    app = create_app(bundle)
    srv = serve_app(app)
    host, port = srv.url.removeprefix("http://").split(":")
    schedule = FaultSchedule(
        probabilities={
            Fault.DROP_BEFORE_SERVER: 0.1,
            Fault.DROP_AFTER_APPLY: 0.1,
            Fault.RESET_REQUEST_BODY: 0.025,
            Fault.RESET_RESPONSE_BODY: 0.025,
        },
        seed=7,
        applies_to=path_matches(r"/v1/sessions/[0-9a-f]+/"),
    )
    proxy = FaultProxy((host, int(port)), schedule).start()
    try:
        state = tmp_path / "state"
        run_node(_args(bundle, proxy.url, train_data, state))
    finally:
        proxy.stop()
    faults = [e.fault for e in proxy.events if e.fault != Fault.NONE]
    print(
        f"\n{len(proxy.events)} requests through the proxy, {len(faults)} faulted: {sorted(set(faults))}"
    )
    assert len(faults) >= 5 and Fault.DROP_AFTER_APPLY in faults
    got, want = _device_state(state), _device_state(ref["state"])
    _assert_same(got["slices"], want["slices"], "A and C")
    _assert_same(got["optimizer"], want["optimizer"], "optimizer")
    _assert_same(_server_b(app, bundle), ref["b"], "B")
    assert app.state.trainer.steps == STEPS


@pytest.mark.browser
def test_browser_start_over_forgets_the_saved_run_and_ends_its_session(
    tmp_path, serve_app, train_data
):
    from server_torch.app import create_app

    node()
    browser = chromium()
    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    data_dir = JS_DIR / "data"
    data_dir.mkdir(exist_ok=True)
    page_data = data_dir / f"test-{uuid.uuid4().hex[:12]}.frames"
    page_data.write_bytes(train_data.read_bytes())
    try:
        app = create_app(bundle)
        srv = serve_app(app)
        url = f"{srv.url}/device/web/?data=../data/{page_data.name}&batch={BATCH}&steps={STEPS}"
        proc = run_node(
            ["tools/browser_run.mjs", url, "--chromium", browser, "--timeout", "240000"]
            + ["--start-over-at-step", "3"]
        )
    finally:
        page_data.unlink(missing_ok=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.get("startOver"), json.dumps(out, indent=1)[:3000]
    assert out["startOver"]["status"].startswith("the saved run is forgotten"), out["startOver"]
    # after the reload nothing resumes: the page is idle and the server holds no session
    assert out["result"]["status"] == "idle" and out["result"]["resumedAt"] is None, out["result"]
    assert out["dom"]["resume"] == ""
    import urllib.request

    with urllib.request.urlopen(f"{srv.url}/v1/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["sessions"] == 0, health
    assert 3 <= app.state.trainer.steps < STEPS
