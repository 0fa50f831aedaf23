"""The device state on its own (no server): snapshots, the durable step, refusals, and
the runtimes' ``state()``/``load_state()``."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from device_tf._exceptions import ServerUnreachable, StateError
from device_tf.runtime import DeviceRuntime, RuntimeState
from device_tf.state import DeviceState, RunSpec
from device_tf.transport import HttpTransport, SessionInfo
from split_helpers import ALL_RUNTIMES, SGD_CFG, fixed_batches


class _CounterRuntime(DeviceRuntime):
    """A runtime whose whole state is one number: the steps it has trained."""

    name = "fake"

    def __init__(self) -> None:
        self.steps = 0

    def a_forward(self, x):
        return x

    def a_backward(self, g) -> None:
        self.steps += 1

    def c_train(self, b, y):
        return 0.0, b

    def a_infer(self, x):
        return x

    def c_infer(self, b):
        return b

    def weights(self):
        return {"A": {"l/w": np.full(3, self.steps, np.float32)}}

    def state(self) -> RuntimeState:
        return RuntimeState(
            {"A/l/w": np.full(3, self.steps, np.float32)},
            {"A/iterations": np.array(self.steps, np.int64)},
        )

    def load_state(self, state: RuntimeState) -> None:
        self.steps = int(state.optimizer["A/iterations"])


class _Trainer:
    """What ``DeviceState`` needs of a ``SplitTrainer``."""

    def __init__(self, server_next: int = 0, durable: int = 0, known: bool = True) -> None:
        self.next_step = 0
        self.server_next, self.durable, self.known = server_next, durable, known
        self.opened = 0

    def open(self) -> SessionInfo:
        self.opened += 1
        return SessionInfo("ab" * 16, "tok-secret")

    def resume(self, session_id: str, token: str) -> SessionInfo:
        from device_tf._exceptions import ServerRejected

        if not self.known:
            raise ServerRejected(404, "unknown_session", "no such session")
        return SessionInfo(session_id, token, self.server_next, "forward", self.durable)


SPEC = RunSpec("f" * 64, "fake", False, "d" * 64, 100, 2, 10, 0)  # 10 steps per epoch


_open: list[DeviceState] = []


def _state(tmp_path: Path, rt: DeviceRuntime | None = None, spec: RunSpec = SPEC) -> DeviceState:
    """A state on ``tmp_path/s``, as a restarted device would make it (the previous
    "process" lets go of the dir's lock)."""
    while _open:
        _open.pop().unlock()
    st = DeviceState(tmp_path / "s", spec, rt or _CounterRuntime(), notify=lambda m: None)
    _open.append(st)
    return st


def _train(st: DeviceState, upto: int, durable_at: dict[int, int] | None = None) -> None:
    """Steps until ``upto``; ``durable_at[step]`` = durable step announced in that reply."""
    while st.latest.step < upto:
        st.runtime.a_backward(None)
        step = st.latest.step + 1
        st.announce((durable_at or {}).get(step))
        st.commit(step)


def test_fresh_run_writes_step_zero_as_latest_and_durable(tmp_path) -> None:
    st = _state(tmp_path)
    tr = _Trainer()
    assert st.begin(tr) == 0 and tr.opened == 1
    assert st.latest.step == st.durable.step == 0
    session = st.dir / "session.json"
    assert session.stat().st_mode & 0o777 == 0o600
    assert b"tok-secret" in session.read_bytes()
    files = [p for p in st.dir.rglob("*") if p.is_file() and p != session]
    assert files and not any(b"tok-secret" in p.read_bytes() for p in files)


def test_durable_follows_the_announced_step(tmp_path) -> None:
    st = _state(tmp_path)
    st.begin(_Trainer())
    _train(st, 7, {5: 5})  # announced with the reply of step 5 while latest was 4 -> 5 saved
    assert (st.latest.step, st.durable.step) == (7, 5)
    st.announce(7)  # latest is 7: copied to durable/
    assert st.durable.step == 7
    reread = _state(tmp_path)
    assert reread._read("durable").step == 7 and reread._read("latest").step == 7


def test_restarted_device_resumes_latest_and_rolls_back_to_the_server(tmp_path) -> None:
    st = _state(tmp_path)
    st.begin(_Trainer())
    _train(st, 8, {4: 4})
    # the device restarts; the server is where the device left it
    again = _state(tmp_path)
    tr = _Trainer(server_next=8, durable=4)
    assert again.begin(tr) == 8 and tr.next_step == 8 and again.runtime.steps == 8
    # ... or it applied step 8 before the device could save it: its store answers step 8
    tr = _Trainer(server_next=9, durable=4)
    assert _state(tmp_path).begin(tr) == 8
    # ... or the server restarted too, from its checkpoint at step 4
    both = _state(tmp_path)
    tr = _Trainer(server_next=4, durable=4)
    assert both.begin(tr) == 4 and both.runtime.steps == 4 and tr.next_step == 4
    assert _state(tmp_path)._read("latest").step == 4
    # a step the device has no snapshot of cannot be resumed exactly
    with pytest.raises(StateError, match="snapshots of steps"):
        both.rollback(tr, 2)
    with pytest.raises(StateError, match="cannot have been trained"):
        _state(tmp_path).begin(_Trainer(server_next=7, durable=4))


def test_a_lost_session_starts_over_only_from_step_zero(tmp_path) -> None:
    st = _state(tmp_path)
    st.begin(_Trainer())
    _train(st, 3)  # nothing announced: durable/ is still step 0
    again = _state(tmp_path)
    tr = _Trainer(known=False)
    assert again.begin(tr) == 0 and tr.opened == 1 and again.runtime.steps == 0
    _train(again, 6, {6: 6})
    with pytest.raises(StateError, match="no snapshot of step 0"):
        _state(tmp_path).begin(_Trainer(known=False))


def test_one_device_per_state_dir(tmp_path) -> None:
    first = _state(tmp_path)
    first.begin(_Trainer())
    (first.dir / ".tmp-latest-dead").mkdir()  # a writer killed mid-write left this
    second = DeviceState(first.dir.parent / "s", SPEC, _CounterRuntime())
    with pytest.raises(StateError, match="in use by another running device"):
        second.begin(_Trainer())
    first.unlock()
    second.begin(_Trainer(server_next=0))
    assert not (first.dir / ".tmp-latest-dead").exists()
    second.unlock()


def test_finished_run_sends_nothing(tmp_path) -> None:
    st = _state(tmp_path)
    st.begin(_Trainer())
    _train(st, SPEC.total_steps)
    tr = _Trainer(known=False)  # would start over if it asked the server
    assert _state(tmp_path).begin(tr) == SPEC.total_steps and tr.opened == 0


def test_corrupt_latest_falls_back_to_durable(tmp_path) -> None:
    st = _state(tmp_path)
    st.begin(_Trainer())
    _train(st, 5, {3: 3})
    (st.dir / "latest" / "progress.json").write_text('{"step": 99}')
    again = _state(tmp_path)
    assert again.begin(_Trainer(server_next=3, durable=3)) == 3


def test_other_bundle_or_settings_refused(tmp_path) -> None:
    _state(tmp_path).begin(_Trainer())
    other = replace(SPEC, manifest_sha256="e" * 64)
    with pytest.raises(StateError, match="another bundle"):
        _state(tmp_path, spec=other).read_session()
    bigger = replace(SPEC, batch_size=20)
    with pytest.raises(StateError, match="batch_size 10 -> 20"):
        _state(tmp_path, spec=bigger).read_session()


def test_unreachable_server_backs_off_then_gives_up() -> None:
    lines: list[str] = []
    t = HttpTransport(
        "http://127.0.0.1:9", reconnect_timeout=1.0, backoff=(0.05, 0.2), notify=lines.append
    )
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match="Restart the same command"):
        t.health()
    took = time.monotonic() - start
    t.close()
    assert 0.9 <= took < 5, took
    assert len(lines) == 1 and "unreachable" in lines[0] and "up to 1 s" in lines[0]


@pytest.fixture(scope="module")
def tflite_bundle(digits_bundles) -> Path:
    bundle, _ = digits_bundles("double", SGD_CFG, runtimes=ALL_RUNTIMES)
    return bundle


def _steps(rt: DeviceRuntime, bundle: Path, batches) -> None:
    """Steps without a server: C trains on a seeded stand-in for B's output, A on a
    gradient made from its own activation; both optimizers step."""
    from shared_schema import load_manifest

    b_shape = load_manifest(bundle).cuts[1].shape[1:]
    for i, (x, y) in enumerate(batches):
        a = rt.a_forward(x)
        b = np.random.default_rng(i).standard_normal((len(x), *b_shape)).astype(np.float32)
        rt.c_train(b, y)
        rt.a_backward((0.01 * a).astype(np.float32))


def test_tf_and_tflite_states_are_exact_and_interchangeable(tflite_bundle) -> None:
    from device_tf.tf_runtime import TFRuntime
    from device_tf.tflite_runtime import TFLiteRuntime

    batches = fixed_batches(6)
    for cls in (TFRuntime, TFLiteRuntime):
        rt = cls.from_bundle(tflite_bundle)
        _steps(rt, tflite_bundle, batches[:3])
        mid = rt.state()
        assert int(mid.optimizer["A/iterations"]) == int(mid.optimizer["C/iterations"]) == 3
        _steps(rt, tflite_bundle, batches[3:])
        again = cls.from_bundle(tflite_bundle)
        again.load_state(mid)
        _steps(again, tflite_bundle, batches[3:])
        want, got = rt.state(), again.state()
        for part in ("slices", "optimizer"):
            w, g = getattr(want, part), getattr(got, part)
            assert set(w) == set(g)
            assert all(np.array_equal(w[k], g[k]) for k in w), cls.__name__
    tf_state = TFRuntime.from_bundle(tflite_bundle).state()
    lite = TFLiteRuntime.from_bundle(tflite_bundle)
    lite_state = lite.state()
    assert set(tf_state.slices) == set(lite_state.slices)
    assert set(tf_state.optimizer) == set(lite_state.optimizer)
    lite.load_state(tf_state)  # the same names: one runtime's state loads in the other
    bad = RuntimeState(dict(tf_state.slices), {})
    with pytest.raises(Exception, match="missing"):
        lite.load_state(bad)
    with pytest.raises(StateError, match="missing"):
        TFRuntime.from_bundle(tflite_bundle).load_state(bad)
