"""The server's state on disk (issue #7): checkpoints of B, its optimizer and the session
table, atomic and verified, resumed bit for bit.

In-process tests use the hand-made B of test_server_helpers behind real uvicorn; the
process tests run ``spliteasy serve`` on converted digits bundles (SGD with momentum,
double split; Adam, single split), kill it with SIGKILL or stop it with SIGTERM, and
restart it on the same state dir. The device is raw HTTP with frames: the server's
replies are compared byte for byte, which is what "continues as if it had never
stopped" means.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server_helpers import (
    A_CUT,
    B_CUT,
    LABELS,
    AdamSpec,
    Device,
    double_b,
    double_manifest,
    rand,
    single_b,
    single_manifest,
    snapshot,
)

from server_torch.app import create_app
from server_torch.checkpoint import Checkpointer, StateDirError, read_state_dir
from shared_schema import FrameKind, encode
from shared_schema.durable import CRASH_ENV, CRASH_EXIT_CODE, Series

ACT, GRAD, LAB = FrameKind.ACTIVATION, FrameKind.GRADIENT, FrameKind.LABELS
REPO = Path(__file__).resolve().parents[1]


# -- in-process: the tiny B of test_server_helpers ----------------------------------------


def _app(kind: str, state_dir: Path | None, every: int = 2):
    if kind == "double-adam":
        module, manifest = double_b(), double_manifest(optimizer=AdamSpec(learning_rate=1e-2))
    elif kind == "double-sgd":
        module, manifest = double_b(), double_manifest()
    else:  # single split, Adam
        module, manifest = single_b(), single_manifest()
    return create_app(
        None,
        module=module,
        manifest=manifest,
        device_dir=None,
        state_dir=state_dir,
        checkpoint_every=every,
    )


def _train(dev: Device, kind: str, steps: range) -> list[bytes]:
    """Steps of random but fixed data (seeded by step); returns the reply bodies."""
    replies = []
    for step in steps:
        a = rand((4, 8, 8, 4), step)
        if kind.startswith("double"):
            _, r1 = dev.ok("forward", dev.body(ACT, A_CUT, a, step))
            g = rand((4, 4, 4, 8), 1000 + step)
            _, r2 = dev.ok("backward", dev.body(GRAD, B_CUT, g, step))
            replies += [r1.content, r2.content]
        else:
            y = np.random.default_rng(step).integers(0, 10, 4).astype(np.int32)
            body = encode([dev.frame(ACT, A_CUT, a, step), dev.frame(LAB, LABELS, y, step)])
            _, r = dev.ok("step", body)
            replies.append(r.content)
    return replies


def _table(app) -> dict:
    """The session table, everything that is persisted (store bodies included)."""
    return {
        sid: (
            s.token_sha256, s.aux_label, s.codec, s.next_step, s.expect, s.stale_step,
            {op: (st.step, st.request_sha256, bytes(st.body)) for op, st in s.store.items()},
        )
        for sid, s in app.state.service.table.sessions.items()
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["double-sgd", "double-adam", "single-adam"])
def test_round_trip_is_byte_identical_and_continues_bit_for_bit(kind, tmp_path, serve_app):
    """A checkpoint restored into a fresh B gives the same bytes of B, optimizer (Adam's
    step count included) and session table, and the next steps' replies and states are
    byte-identical to those of the server that never stopped."""
    state = tmp_path / "state"
    app = _app(kind, state, every=3)
    srv = serve_app(app)
    dev = Device(srv.url)
    _train(dev, kind, range(5))
    assert app.state.checkpointer.last.step == 3  # the periodic one (every 3 steps)
    ck = app.state.checkpointer.checkpoint()  # B is quiescent: one more, at step 5
    assert ck is not None and ck.step == 5 and ck.path.name == "ckpt-0000000005"
    assert Series(state).numbers() == [5, 3]  # the newest two are kept

    copy = tmp_path / "copy"  # the original still holds (locks) its dir
    shutil.copytree(state, copy, ignore=shutil.ignore_patterns(".lock"))
    restored = _app(kind, copy)
    assert snapshot(restored) == snapshot(app)
    opt = restored.state.trainer.optimizer.state
    if "adam" in kind:
        assert {st["step"] for st in opt.values()} == {5}
    assert _table(restored) == _table(app)
    assert restored.state.checkpointer.resumed_from == 5

    srv2 = serve_app(restored)
    health = httpx.get(f"{srv2.url}/v1/health").json()
    assert health["steps"] == 5 and health["resumed_from"] == 5
    assert health["checkpoint"]["step"] == 5 and health["checkpoint"]["time"].endswith("Z")
    twin = Device.__new__(Device)  # the same device (id, token) talking to the restored server
    twin.__dict__.update(dev.__dict__, http=httpx.Client(base_url=srv2.url, timeout=60))
    assert _train(twin, kind, range(5, 8)) == _train(dev, kind, range(5, 8))
    assert snapshot(restored) == snapshot(app)
    twin.close()
    dev.close()


def test_durable_step_header_session_endpoint_and_conflict_body(tmp_path, serve_app):
    app = _app("double-sgd", tmp_path / "state", every=2)
    srv = serve_app(app)
    dev = Device(srv.url)
    created = dev.http.post(
        "/v1/sessions", json={"manifest_sha256": app.state.manifest_sha256}
    ).json()
    assert created["durable_step"] == 0 and created["expect"] == "forward"
    auth = {"Authorization": f"Bearer {dev.token}"}
    headers = []
    for step in range(3):
        a, g = rand((2, 8, 8, 4), step), rand((2, 4, 4, 8), step + 50)
        _, r = dev.ok("forward", dev.body(ACT, A_CUT, a, step))
        headers.append(r.headers["X-Spliteasy-Durable-Step"])
        _, r = dev.ok("backward", dev.body(GRAD, B_CUT, g, step))
        headers.append(r.headers["X-Spliteasy-Durable-Step"])
    # checkpoints at creation (next_step 0) and after steps 2 (next_step 2)
    assert headers == ["0", "0", "0", "2", "2", "2"]
    r = dev.post("backward", dev.body(GRAD, B_CUT, g, 2))  # a retry: from the store
    assert r.headers["X-Spliteasy-Replayed"] == "1" and r.headers["X-Spliteasy-Durable-Step"] == "2"
    r = dev.post("infer", dev.body(ACT, A_CUT, a, 0))
    assert r.status_code == 200 and r.headers["X-Spliteasy-Durable-Step"] == "2"

    got = dev.http.get(f"/v1/sessions/{dev.sid}", headers=auth)
    assert got.status_code == 200
    assert got.json() == {
        "session_id": dev.sid, "next_step": 3, "expect": "forward", "durable_step": 2,
        "split_mode": "double", "aux_label": False, "codec": "float32",
    }  # fmt: skip
    assert dev.http.get(f"/v1/sessions/{dev.sid}").status_code == 401
    bad = dev.http.get(f"/v1/sessions/{dev.sid}", headers={"Authorization": "Bearer x"})
    assert bad.status_code == 403

    before = snapshot(app), _table(app)
    r = dev.post("forward", dev.body(ACT, A_CUT, a, 9))  # a device ahead of the server
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "step_conflict" and body["detail"]
    assert (body["next_step"], body["expect"], body["durable_step"]) == (3, "forward", 2)
    assert (snapshot(app), _table(app)) == before  # the rejection changed nothing
    dev.close()


def test_tokens_are_kept_hashed_only(tmp_path, serve_app):
    app = _app("double-sgd", tmp_path / "state")
    dev = Device(serve_app(app).url)
    _train(dev, "double-sgd", range(2))
    s = app.state.service.table.sessions[dev.sid]
    assert not any(dev.token in repr(v) for v in vars(s).values())  # not even in memory
    app.state.checkpointer.checkpoint()
    for f in (tmp_path / "state").rglob("*"):
        if f.is_file():
            assert dev.token.encode() not in f.read_bytes(), f
    dev.close()


def test_a_session_created_while_b_is_held_is_saved_at_the_next_quiescent_point(
    tmp_path, serve_app
):
    state = tmp_path / "state"
    app = _app("double-sgd", state, every=0)  # no periodic checkpoints
    url = serve_app(app).url
    dev = Device(url)
    a, g = rand((2, 8, 8, 4), 0), rand((2, 4, 4, 8), 1)
    dev.ok("forward", dev.body(ACT, A_CUT, a, 0))  # dev holds B
    late = Device(url)  # B is not quiescent: no checkpoint now
    assert {s["id"] for s in read_state_dir(state).state["sessions"]} == {dev.sid}
    dev.ok("backward", dev.body(GRAD, B_CUT, g, 0))  # B free again: saved now
    saved = read_state_dir(state)
    assert {s["id"] for s in saved.state["sessions"]} == {dev.sid, late.sid}
    assert saved.step == 1
    dev.close()
    late.close()


def test_shutdown_drains_then_writes_the_final_checkpoint(tmp_path, serve_app):
    """SIGTERM's hook: new work is refused (503 shutting_down, nothing changes), the device
    holding B may still send its backward, then the last checkpoint is written."""
    import threading

    state = tmp_path / "state"
    app = _app("double-sgd", state, every=0)
    url = serve_app(app).url
    dev, other = Device(url), Device(url)
    a, g = rand((2, 8, 8, 4), 0), rand((2, 4, 4, 8), 1)
    dev.ok("forward", dev.body(ACT, A_CUT, a, 0))
    result: list = []
    drain = threading.Thread(target=lambda: result.append(app.state.on_exit(10.0)))
    drain.start()
    while not app.state.service.draining:
        time.sleep(0.01)
    before = snapshot(app), _table(app)
    r = other.post("forward", other.body(ACT, A_CUT, a, 0))
    assert (
        r.status_code == 503 and r.json()["error"] == "shutting_down" and r.headers["Retry-After"]
    )
    r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": app.state.manifest_sha256})
    assert r.status_code == 503 and r.json()["error"] == "shutting_down"
    assert (snapshot(app), _table(app)) == before
    dev.ok("backward", dev.body(GRAD, B_CUT, g, 0))
    drain.join(30)
    (ck,) = result
    assert ck.step == 1 and Series(state).numbers()[0] == 1
    saved = read_state_dir(state)
    assert {s["id"]: s["next_step"] for s in saved.state["sessions"]} == {dev.sid: 1, other.sid: 0}
    dev.close()
    other.close()


def test_a_failed_checkpoint_is_logged_and_the_step_still_answered(
    tmp_path, serve_app, caplog, monkeypatch
):
    app = _app("single-adam", tmp_path / "state", every=1)
    dev = Device(serve_app(app).url)
    ck = app.state.checkpointer

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.series, "save", disk_full)
    with caplog.at_level(logging.ERROR, logger="spliteasy"):
        (reply,) = _train(dev, "single-adam", range(1))
    assert "checkpoint at step 1 failed" in caplog.text and "No space left" in caplog.text
    assert app.state.trainer.steps == 1 and ck.last.step == 0  # applied; not durable
    got = dev.http.get(f"/v1/sessions/{dev.sid}", headers={"Authorization": f"Bearer {dev.token}"})
    assert got.json()["next_step"] == 1 and got.json()["durable_step"] == 0
    monkeypatch.undo()
    _train(dev, "single-adam", range(1, 2))
    assert ck.last.step == 2 and app.state.service.table.sessions[dev.sid].durable_step == 2
    dev.close()


# -- torn and corrupt checkpoints ------------------------------------------------------


def _two_checkpoints(tmp_path: Path, serve_app) -> tuple[Path, dict, dict]:
    """A state dir with checkpoints at steps 2 and 4; the states of B at each."""
    state = tmp_path / "state"
    app = _app("double-adam", state, every=2)
    dev = Device(serve_app(app).url)
    _train(dev, "double-adam", range(2))
    at2 = snapshot(app), _table(app)
    _train(dev, "double-adam", range(2, 4))
    at4 = snapshot(app), _table(app)
    app.state.checkpointer.close()
    dev.close()
    assert Series(state).numbers() == [4, 2]
    return state, at2, at4


def _corrupt(ckpt: Path, how: str) -> None:
    if how == "truncated b.safetensors":
        data = (ckpt / "b.safetensors").read_bytes()
        (ckpt / "b.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "one byte flipped":
        f = ckpt / "optimizer.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "wrong checksum":
        sums = json.loads((ckpt / "checksums.json").read_text())
        sums["files"]["state.json"] = "0" * 64
        (ckpt / "checksums.json").write_text(json.dumps(sums))
    elif how == "no checksums.json":
        (ckpt / "checksums.json").unlink()
    elif how == "stored reply missing":
        next(ckpt.glob("store/*")).unlink()


@pytest.mark.parametrize(
    "how",
    [
        "truncated b.safetensors",
        "one byte flipped",
        "wrong checksum",
        "no checksums.json",
        "stored reply missing",
    ],
)
def test_corrupt_checkpoint_is_skipped_with_a_warning(how, tmp_path, serve_app, caplog):
    state, at2, _ = _two_checkpoints(tmp_path, serve_app)
    _corrupt(state / "ckpt-0000000004", how)
    with caplog.at_level(logging.WARNING, logger="spliteasy"):
        app = _app("double-adam", state)
    assert (snapshot(app), _table(app)) == at2
    assert app.state.checkpointer.resumed_from == 2
    assert app.state.checkpointer.skipped == ["ckpt-0000000004"]
    assert any("skipping checkpoint ckpt-0000000004" in r.getMessage() for r in caplog.records)


_CRASHING_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_server_checkpoint import _app
app = _app("double-adam", __import__("pathlib").Path({state!r}))
# a new session: a checkpoint is written at once -- and the writer dies in the middle
app.state.service.create_session(app.state.manifest_sha256)
print("not reached")
"""


@pytest.mark.parametrize("crash_after", [0, 1, 3])
def test_crash_while_writing_leaves_the_previous_checkpoint(
    crash_after, tmp_path, serve_app, caplog
):
    """A real child process dies (os._exit, as SIGKILL would) after ``crash_after`` files
    of a checkpoint: the half-written folder is never loaded, the previous one is."""
    state, _, at4 = _two_checkpoints(tmp_path, serve_app)
    code = _CRASHING_WRITER.format(tests=str(REPO / "tests"), state=str(state))
    env = {**os.environ, CRASH_ENV: str(crash_after), "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == CRASH_EXIT_CODE, res.stderr
    assert "not reached" not in res.stdout
    assert len(list(state.glob(".tmp-*"))) == 1  # the torn one, under its temporary name
    with caplog.at_level(logging.WARNING, logger="spliteasy"):
        app = _app("double-adam", state, every=2)
    assert (snapshot(app), _table(app)) == at4  # the new session is not there: never loaded
    assert any("half-written" in r.getMessage() for r in caplog.records)
    app.state.checkpointer.checkpoint()  # nothing changed since step 4: nothing written
    dev = Device(serve_app(app).url)  # a new session: a checkpoint; the torn folder is pruned
    assert not list(state.glob(".tmp-*")) and Series(state).numbers() == [4, 2]
    dev.close()


def test_another_bundles_state_dir_is_refused(tmp_path, serve_app):
    state = tmp_path / "state"
    first = _app("double-sgd", state)
    with pytest.raises(StateDirError, match="in use by another spliteasy serve"):
        _app("double-sgd", state)
    first.state.checkpointer.close()
    with pytest.raises(StateDirError, match="belongs to another bundle"):
        _app("single-adam", state)  # another manifest
    with pytest.raises(StateDirError, match="another bundle"):
        read_state_dir(state, "0" * 64)
    # and the lock is free again after a refusal
    Checkpointer(first.state.service, state).open()
    # a directory that is something else (a bundle, a device's state) is not taken over
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "session.json").write_text("{}")
    with pytest.raises(StateDirError, match="not a server state dir .*session.json"):
        _app("double-sgd", other)
    assert sorted(p.name for p in other.iterdir()) == [".lock", "session.json"]


# -- real `spliteasy serve` processes: SIGKILL, restart, SIGTERM ------------------------


class _RawDevice:
    """One session on a digits bundle, speaking frames with arrays of the manifest's shapes."""

    def __init__(self, url: str, manifest, sha: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120)
        self.m = manifest
        r = self.http.post("/v1/sessions", json={"manifest_sha256": sha})
        assert r.status_code == 201, r.text
        info = r.json()
        self.sid, self.token = info["session_id"], info["token"]
        self.created = info

    def reconnect(self, url: str) -> None:
        self.http.close()
        self.http = httpx.Client(base_url=url, timeout=120)

    def _frame(self, kind, spec, arr, step):
        from shared_schema import Frame

        return Frame(kind, spec.name, arr, spec.layout, bytes.fromhex(self.sid), step)

    def bodies(self, step: int) -> list[tuple[str, bytes]]:
        rng = np.random.default_rng(step)
        n = 8
        a_spec = self.m.server_input
        a = rng.standard_normal((n, *a_spec.sample_shape)).astype(np.float32)
        if self.m.split_mode == "single":
            y = rng.integers(0, self.m.num_classes, n).astype(np.int32)
            return [
                (
                    "step",
                    encode(
                        [
                            self._frame(ACT, a_spec, a, step),
                            self._frame(LAB, self.m.labels, y, step),
                        ]
                    ),
                )
            ]
        b_spec = self.m.server_output
        g = (rng.standard_normal((n, *b_spec.sample_shape)) * 0.1).astype(np.float32)
        return [
            ("forward", encode([self._frame(ACT, a_spec, a, step)])),
            ("backward", encode([self._frame(GRAD, b_spec, g, step)])),
        ]

    def post(self, op: str, body: bytes) -> httpx.Response:
        return self.http.post(
            f"/v1/sessions/{self.sid}/{op}",
            content=body,
            headers={
                "Content-Type": "application/x-spliteasy-frames",
                "Authorization": f"Bearer {self.token}",
            },
        )

    def run(self, steps: range) -> list[httpx.Response]:
        out = []
        for step in steps:
            for op, body in self.bodies(step):
                r = self.post(op, body)
                assert r.status_code == 200, (step, op, r.text)
                out.append(r)
        return out


def _bundle(split: str, opt: str) -> Path:
    from split_helpers import ADAM_CFG, SGD_CFG, digits_bundle

    bundle, _ = digits_bundle(None, split, SGD_CFG if opt == "sgd" else ADAM_CFG)
    return bundle


@pytest.mark.slow
@pytest.mark.parametrize(("split", "opt"), [("double", "sgd"), ("single", "adam")])
def test_sigkill_restart_resumes_and_sigterm_writes_a_final_checkpoint(
    split, opt, tmp_path, serve_bundle
):
    from shared_schema import load_manifest, manifest_digest

    bundle = _bundle(split, opt)
    manifest, sha = load_manifest(bundle), manifest_digest(bundle)
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--checkpoint-every", "5")

    srv = serve_bundle(bundle, *args)
    assert f"state dir {state}" in "".join(srv.output)
    dev = _RawDevice(srv.url, manifest, sha)
    assert dev.created["durable_step"] == 0
    first = dev.run(range(7))
    per_step = len(first) // 7
    durable = [int(r.headers["X-Spliteasy-Durable-Step"]) for r in first]
    assert durable[: 5 * per_step - 1] == [0] * (5 * per_step - 1)  # until step 4 completes
    assert durable[5 * per_step - 1 :] == [5] * (2 * per_step + 1)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(30)

    srv2 = serve_bundle(bundle, *args)
    out = "".join(srv2.output)
    health = httpx.get(f"{srv2.url}/v1/health").json()
    assert "resumed from checkpoint step 5 written at" in out, out
    assert health["resumed_from"] == 5 and health["steps"] == 5
    assert health["checkpoint"]["step"] == 5 and health["sessions"] == 1
    dev.reconnect(srv2.url)
    status = dev.http.get(
        f"/v1/sessions/{dev.sid}", headers={"Authorization": f"Bearer {dev.token}"}
    ).json()
    assert (status["next_step"], status["durable_step"]) == (5, 5)
    assert status["expect"] == ("forward" if split == "double" else "step")

    # the device is ahead (it did steps 5 and 6): told where to resume, nothing changes
    op, body = dev.bodies(7)[0]
    r = dev.post(op, body)
    assert r.status_code == 409 and r.json()["error"] == "step_conflict"
    assert (r.json()["next_step"], r.json()["durable_step"]) == (5, 5)
    # a retry of the last step the checkpoint holds: answered from the persisted store
    op, body = dev.bodies(4)[-1]
    r = dev.post(op, body)
    assert r.status_code == 200 and r.headers["X-Spliteasy-Replayed"] == "1"
    assert r.content == first[5 * per_step - 1].content
    # replaying steps 5 and 6: byte-identical replies (B, optimizer, BN all as before)
    again = dev.run(range(5, 7))
    assert [r.content for r in again] == [r.content for r in first[5 * per_step :]]
    assert httpx.get(f"{srv2.url}/v1/health").json()["steps"] == 7

    srv2.proc.send_signal(signal.SIGTERM)
    srv2.proc.wait(60)
    saved = read_state_dir(state, sha)
    assert saved.step == 7 and saved.path.name == "ckpt-0000000007"
    (session,) = saved.state["sessions"]
    assert session["next_step"] == 7 and session["id"] == dev.sid
    if opt == "adam":
        assert set(saved.state["optimizer"]["scalars"].values()) == {7}
    for f in state.rglob("*"):
        if f.is_file():
            assert dev.token.encode() not in f.read_bytes(), f
    dev.http.close()


@pytest.mark.slow
def test_serve_refuses_another_bundles_state_dir(tmp_path, capsys):
    from spliteasy_cli.main import main

    state = tmp_path / "state"
    state.mkdir()
    (state / "bundle.json").write_text(json.dumps({"manifest_sha256": "ab" * 32}))
    code = main(["serve", str(_bundle("double", "sgd")), "--state-dir", str(state), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (
        err.startswith("spliteasy serve: error: state dir") and "belongs to another bundle" in err
    )


@pytest.mark.slow
def test_the_same_command_again_resumes_from_the_default_state_dir(tmp_path):
    """``spliteasy serve BUNDLE`` twice in the same directory: the second run resumes
    from ``runs/serve-<12 hex of the manifest sha256>/`` that the first left."""
    from server_torch.serving import wait_for_health
    from shared_schema import manifest_digest

    bundle = _bundle("double", "sgd")
    sha = manifest_digest(bundle)
    cmd = [sys.executable, "-m", "spliteasy_cli.main", "serve", str(bundle), "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outputs = []
    for run in range(2):
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        url = lines[-1].split("listening on ")[-1].strip()
        health = wait_for_health(url, 60, proc)
        if run == 0:
            assert health["resumed_from"] is None
            r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha})
            assert r.status_code == 201
        else:
            assert health["resumed_from"] == 0 and health["sessions"] == 1
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        outputs.append("".join(lines) + rest)
    state = tmp_path / "runs" / f"serve-{sha[:12]}"
    assert f"state dir runs/serve-{sha[:12]}" in outputs[0], outputs[0]
    assert "no checkpoint yet" in outputs[0]
    assert "resumed from checkpoint step 0 written at" in outputs[1], outputs[1]
    assert json.loads((state / "bundle.json").read_text())["manifest_sha256"] == sha
    assert Series(state).numbers() == [0]


def test_serve_help_lists_the_state_options(capsys):
    from spliteasy_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--state-dir", "--no-state", "--checkpoint-every", "runs/serve-"):
        assert opt in out
    with pytest.raises(SystemExit):  # one or the other
        main(["serve", "x", "--state-dir", "d", "--no-state"])
    assert "not allowed with argument" in capsys.readouterr().err
