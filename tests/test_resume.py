"""Crash recovery end to end: real ``spliteasy serve`` / ``spliteasy train`` processes on
127.0.0.1 killed with SIGKILL at random steps of a 30-step run and restarted on their
state dirs. The final A, B and C (and both sides' optimizer state, Adam's step counts
included) must equal an uninterrupted run's within 1e-6 relative: the same batches in
the same order, no step lost, none applied twice.

One run per configuration (double and single split x SGD with momentum and Adam) suffers
every kind of kill in turn, each at a random step, and each restart is checked to have
resumed the way it must before the next kill:

1. the server is SIGKILLed and restarted on its state dir: it comes back from its newest
   checkpoint (every 5 steps), a few steps behind the device, which waits for it
   (bounded backoff), rolls back to its snapshot of that step and replays from there;
2. the device is SIGKILLed and restarted: it takes up its session at the step its
   ``latest/`` snapshot holds; a step the server had applied already is answered from
   the retry store (nothing applied twice);
3. (double SGD, single Adam) the device dies after the server applied a step and before
   saving it (``SPLITEASY_DEVICE_CRASH_BEFORE_SAVING``): that step is answered from the
   retry store, byte for byte;
4. both are SIGKILLed: the restarted device learns the server's checkpointed step from
   the session and rolls back to it.

One kill per run would need 12 runs to show the same (and 12 times the TF/torch process
start-ups, which are most of a run's cost). The uninterrupted reference is the same
``train``/``serve`` code in this process (``resume_helpers.uninterrupted``): the crashed
runs equal it within 1e-6, which shows in-process and child-process training agree too.
Bundles come from the shared conversion cache.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from resume_helpers import (
    STEPS_30,
    Device,
    Server,
    compare,
    final_state,
    segments,
    uninterrupted,
)

from split_helpers import ADAM_CFG, ALL_RUNTIMES, SGD_CFG

OPTIMIZERS = {"sgd": SGD_CFG, "adam": ADAM_CFG}
CONFIGS = [("double", "sgd"), ("double", "adam"), ("single", "sgd"), ("single", "adam")]
TOL = 1e-6
CHECKPOINT_EVERY = 5  # resume_helpers.Server's --checkpoint-every
# Kill steps the server's checkpoints do not hold (k % 5 in (1, 2)): a killed server comes
# back behind the device, which must roll back.
BEHIND = [k for k in range(3, 30) if k % CHECKPOINT_EVERY in (1, 2)]


def _plan(split: str, opt: str, crash: bool) -> list[tuple[str, int]]:
    """(kill, after step) in order: the server, the device, (the crash hook,) both.

    ("crash", d): the device (re)started just before dies before saving the step d after
    the one it resumed at (relative: a SIGKILL lands a step or two after its mark)."""
    rng = random.Random(f"{split}-{opt}")
    server_at = rng.choice([k for k in BEHIND if k <= 12])
    device_at = rng.randint(server_at + 3, server_at + 6)
    plan = [("server", server_at), ("device", device_at)]
    if crash:
        plan.append(("crash", rng.randint(2, 3)))
    both_after = device_at + (7 if crash else 4)
    plan.append(("both", rng.choice([k for k in BEHIND if k >= both_after])))
    return plan


def _newest_checkpoint(state_dir: Path) -> int:
    """The step of the newest checkpoint a restarted server will resume from."""
    from server_torch.checkpoint import read_state_dir

    return read_state_dir(state_dir).step


def _latest_step(device: Device) -> int:
    from resume_helpers import device_state

    return int(device_state(device.state_dir)["dev/step"])


class Run:
    """A 30-step run whose server and device are killed according to a plan; after each
    restart, the way the run resumed is checked against what the state dirs held."""

    def __init__(self, bundle: Path, work: Path, runtime: str = "tf") -> None:
        self.server = Server(bundle, work / "server-state")
        self.device = Device(bundle, work, STEPS_30, runtime)
        self.work = work
        self.starts: list[int] = [0]  # the step each restart resumed at, checked in the log
        self.crash_at = 0  # the step the crash hook ends the device before saving
        self.replays: set[int] = set()  # steps a restarted device may get from the store

    def run(self, plan: list[tuple[str, int]]) -> dict:
        try:
            self.server.start(wait=False)  # loads B while the device imports TF
            self.device.start(self.server.url, self._crash_env(plan[:1], 0))
            self.server.wait()
            for i, (kind, at) in enumerate(plan):
                getattr(self, f"_{kind}")(at, plan[i + 1 : i + 2])
                print(f"after {kind} at {at}: resumed at steps {self.starts}")
            self.device.finish()
            assert self.server.health()["steps"] == 30, self.server.health()
            state = final_state(self.server, self.device)
        finally:
            self.device.stop()
            self.server.stop()
        print(f"--- device output ---\n{self.device.output()}")
        # From the last restart the run went on in order to the end, and only a restarted
        # device's first step was ever answered from the server's store.
        records = self.device.records()
        last_run = segments(records)[-1]
        assert last_run[0] == self.starts[-1] and last_run[-1] == 29, (last_run, self.starts)
        replayed = {r["step"] for r in records if r["replayed"]}
        assert replayed <= self.replays, (replayed, self.replays)
        _no_plain_token(self.work)
        return state

    def _server(self, at: int, following: list) -> None:
        """SIGKILL the server after step ``at``; the device keeps running, waits for it."""
        self.device.wait_for_step(at)
        mark = len(self.device.output(self.device.starts))
        self.server.kill()
        resume = _newest_checkpoint(self.server.state_dir)
        seen = len(self.device.records())
        done = self.device.steps_done()
        time.sleep(0.5)  # the device (alive) meets a dead server and waits
        self.server.start()
        health = self.server.health()
        assert health["resumed_from"] == resume, (health, resume)
        assert resume < done, (resume, done)  # it came back behind the device
        back = lambda: self._went_back(seen) is not None  # noqa: E731
        self.device.wait_for(back, "a rollback in the log")
        out = self.device.output(self.device.starts)[mark:]  # printed since the kill
        assert "unreachable" in out and "is back" in out, out
        assert f"the server holds step {resume} of this session" in out, out
        assert "rolling back" in out, out
        assert self._went_back(seen) == resume  # the log goes back to the server's step
        self.starts.append(resume)

    def _crash_env(self, following: list[tuple[str, int]], resumed_at: int) -> dict | None:
        """The crash hook for a device (re)started at ``resumed_at``, if a crash is next."""
        from device_tf.state import CRASH_ENV

        if following and following[0][0] == "crash":
            self.crash_at = resumed_at + following[0][1]
            return {CRASH_ENV: str(self.crash_at)}
        return None

    def _went_back(self, seen: int) -> int | None:
        """The first step logged after record ``seen`` that is not after the one before."""
        steps = [r["step"] for r in self.device.records()[seen - 1 :]]
        return next((b for a, b in zip(steps, steps[1:], strict=False) if b <= a), None)

    def _device(self, at: int, following: list) -> None:
        """SIGKILL the device after step ``at`` and restart it; the server stays up."""
        self.device.wait_for_step(at)
        self.device.kill()
        latest, applied = _latest_step(self.device), self.server.health()["steps"]
        # the server is at most one step ahead (applied, then the device died unsaved)
        assert applied in (latest, latest + 1), (latest, applied)
        self._restart_device(latest, applied, following)

    def _crash(self, _: int, following: list) -> None:
        """The device ends itself just before saving step ``at``: the server applied step
        ``at - 1``, the device never recorded it. Restarted, it redoes that step and the
        server answers from its retry store (same request bytes: A's forward is
        deterministic), applying nothing twice."""
        from device_tf.state import CRASH_EXIT_CODE

        at = self.crash_at
        assert self.device.proc is not None
        assert self.device.proc.wait(300) == CRASH_EXIT_CODE, self.device.output()
        applied = self.server.health()["steps"]
        assert (_latest_step(self.device), applied) == (at - 1, at)
        self._restart_device(at - 1, applied, following)  # its first step: replayed

    def _restart_device(self, latest: int, applied: int, following: list) -> None:
        records_before = len(self.device.records())
        self.device.start(self.server.url, self._crash_env(following, latest))
        self.device.wait_for_records(records_before + 1)
        out = self.device.output(self.device.starts)
        assert f"at step {latest} of 30" in out, out
        assert f"the server expects step {applied}" in out, out
        assert "rolling back" not in out, out
        first = self.device.records()[records_before]
        assert first["step"] == latest, first  # it goes on from its saved step
        if applied == latest + 1:  # the server had applied it: answered from the store
            assert first["replayed"], first
        self.starts.append(latest)
        self.replays.add(latest)  # (a double split's forward may be, if B was leased to it)

    def _both(self, at: int, following: list) -> None:
        """SIGKILL the server and the device; restart both on their state dirs."""
        self.device.wait_for_step(at)
        self.server.kill()
        self.device.kill()
        resume, latest = _newest_checkpoint(self.server.state_dir), _latest_step(self.device)
        assert resume < latest, (resume, latest)
        records_before = len(self.device.records())
        self.server.start(wait=False)
        # both start at once, as after a power cut
        self.device.start(self.server.url, self._crash_env(following, resume))
        assert self.server.health()["resumed_from"] == resume
        self.device.wait_for_records(records_before + 1)
        out = self.device.output(self.device.starts)
        assert "resuming session" in out and f"at step {latest} of 30" in out, out
        assert f"the server expects step {resume}, its checkpoint holds step {resume}" in out
        assert f"the server holds step {resume} of this session" in out, out
        assert f"rolling back from step {latest}" in out, out
        assert self.device.records()[records_before]["step"] == resume
        self.starts.append(resume)


def _no_plain_token(work: Path) -> None:
    """The token is in the device's session.json (0600) and nowhere else on disk."""
    session = work / "device-state" / "session.json"
    assert session.stat().st_mode & 0o777 == 0o600
    token = json.loads(session.read_text())["token"].encode()
    for path in work.rglob("*"):
        if path.is_file() and path != session:
            assert token not in path.read_bytes(), f"the token is in {path}"


@pytest.mark.parametrize(("split", "opt"), CONFIGS, ids=[f"{s}-{o}" for s, o in CONFIGS])
def test_killed_run_equals_uninterrupted(split, opt, digits_bundles, tmp_path) -> None:
    bundle, _ = digits_bundles(split, OPTIMIZERS[opt], runtimes=ALL_RUNTIMES)
    want = uninterrupted(bundle, tmp_path / "reference")
    plan = _plan(split, opt, crash=(split, opt) in (("double", "sgd"), ("single", "adam")))
    print(f"\n{split} {opt}: kills {plan}")
    got = Run(bundle, tmp_path / "crashed").run(plan)
    assert got["dev/step"] == 30
    if opt == "adam":  # Adam's step count survived on both sides
        assert got["dev-opt/A/iterations"] == 30
        assert any(k.startswith("B-opt/") and k.endswith("/step") for k in got), sorted(got)
    assert compare(got, want) <= TOL


def test_tflite_device_resumes(digits_bundles, tmp_path) -> None:
    """The TFLite runtime's state (save/restore signatures) survives both sides dying."""
    bundle, _ = digits_bundles("double", ADAM_CFG, runtimes=ALL_RUNTIMES)
    want = uninterrupted(bundle, tmp_path / "reference", runtime="tflite")
    got = Run(bundle, tmp_path / "crashed", runtime="tflite").run([("both", 17)])
    assert got["dev-opt/A/iterations"] == got["dev-opt/C/iterations"] == 30
    assert compare(got, want) <= TOL


def _train_cli(bundle: Path, state_dir: Path, capsys, *extra: str) -> tuple[int, str]:
    """``spliteasy train``'s own entry point in this process (a child would prove nothing
    more: the refusal comes before anything is loaded): (exit status, stderr)."""
    from spliteasy_cli.main import main

    capsys.readouterr()
    code = main(
        ["train", str(bundle), "--server", "http://127.0.0.1:9", *STEPS_30,
         "--state-dir", str(state_dir), "--no-progress", "--reconnect-timeout", "0", *extra]
    )  # fmt: skip
    return code, capsys.readouterr().err


def test_state_dir_of_another_bundle_or_run_is_refused(digits_bundles, tmp_path, capsys) -> None:
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

    code, err = _train_cli(single, state_dir, capsys)
    assert code == 2, err
    assert "belongs to another bundle" in err, err
    assert "Traceback" not in err

    code, err = _train_cli(double, state_dir, capsys, "--seed", "1")
    assert code == 2, err
    assert "other settings" in err and "seed 0 -> 1" in err, err
