"""Real ``spliteasy serve`` and ``spliteasy train`` processes for the crash-recovery tests.

A run is one device and one server on 127.0.0.1, both with a state dir. The tests kill
either or both with SIGKILL at a chosen step, restart them on the same state dirs (the
server on the same port), let the device finish, and compare the final A, B and C with
an uninterrupted run of the same configuration:

- A and C (and their optimizer state): the device's ``latest/`` snapshot;
- B (and its optimizer state): the server's newest checkpoint, written on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from server_torch.serving import ServerProcess

REPO = Path(__file__).resolve().parents[1]
# digits' 1437 training images: batch 48 -> 30 steps per epoch; batch 29 -> 50 per epoch
STEPS_30 = ("--epochs", "1", "--batch-size", "48")
STEPS_100 = ("--epochs", "2", "--batch-size", "29")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """``spliteasy serve`` on a state dir, restartable on the same port after a kill."""

    bundle: Path
    state_dir: Path
    extra: tuple[str, ...] = ("--checkpoint-every", "5")
    port: int = 0
    proc: ServerProcess | None = None
    starts: int = 0
    _starting: threading.Thread | None = None
    _error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Server:
        """Start (on the port of the last start, else a free one: its URL is known at
        once). ``wait=False`` returns while it loads, so a device can start (import TF)
        at the same time; it waits for an unreachable server anyway. ``wait()`` joins."""
        self.port = self.port or _free_port()
        args = ["--state-dir", str(self.state_dir), *self.extra, "--port", str(self.port)]
        self.proc = ServerProcess(self.bundle, args)  # the last --port wins over its 0
        self.starts += 1
        self._error = None
        self._starting = threading.Thread(target=self._start, daemon=True)
        self._starting.start()
        return self.wait() if wait else self

    def _start(self) -> None:
        try:
            assert self.proc is not None
            self.proc.start(timeout=180)
        except BaseException as exc:  # raised by wait()
            self._error = exc

    def wait(self) -> Server:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._error is not None:
            raise self._error
        return self

    def kill(self) -> None:
        self.wait()
        assert self.proc is not None and self.proc.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(30)

    def health(self) -> dict:
        import httpx

        self.wait()
        return httpx.get(f"{self.url}/v1/health", timeout=10).json()

    def stop(self) -> None:
        """SIGTERM: the server writes its final checkpoint and exits."""
        if self._starting is not None:
            self._starting.join()
        if self.proc is not None:
            self.proc.stop(timeout=60)

    def output(self) -> str:
        return "".join(self.proc.output) if self.proc else ""


@dataclass
class Device:
    """``spliteasy train`` as a child process with a state dir and a JSONL step log."""

    bundle: Path
    work: Path
    steps: tuple[str, ...] = STEPS_30
    runtime: str = "tf"
    proc: subprocess.Popen | None = None
    starts: int = 0
    outputs: list[Path] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.work / "device-state"

    @property
    def log(self) -> Path:
        return self.work / "steps.jsonl"

    def start(self, url: str, env: dict[str, str] | None = None) -> Device:
        self.starts += 1
        self.work.mkdir(parents=True, exist_ok=True)
        out = self.work / f"device-{self.starts}.out"
        self.outputs.append(out)
        cmd = [
            sys.executable, "-m", "spliteasy_cli.main", "train", str(self.bundle),
            "--server", url, "--runtime", self.runtime, *self.steps,
            "--state-dir", str(self.state_dir), "--log", str(self.log), "--no-progress",
            "--reconnect-timeout", "240",
        ]  # fmt: skip
        with open(out, "wb") as fh:
            self.proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                env={**os.environ, **(env or {})},
            )
        return self

    def records(self) -> list[dict]:
        """The step log's complete lines, every start of this device in order."""
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def steps_done(self) -> int:
        """Steps completed on the device's current timeline: the last logged step + 1
        (a rollback and replay goes back, then forward again)."""
        records = self.records()
        return records[-1]["step"] + 1 if records else 0

    def wait_for_step(self, n: int, timeout: float = 300.0) -> None:
        """Until the device's current timeline has completed step ``n - 1`` (``n`` steps)."""
        self.wait_for(lambda: self.steps_done() >= n, f"step {n}", timeout)

    def wait_for_records(self, n: int, timeout: float = 300.0) -> None:
        """Until the log holds ``n`` records (replays and every start counted)."""
        self.wait_for(lambda: len(self.records()) >= n, f"{n} log records", timeout)

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"device exited ({self.proc.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"device did not reach {what}:\n{self.output()}")
            time.sleep(0.01)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self, timeout: float = 600.0) -> None:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"device did not finish:\n{self.output()}") from None
        assert code == 0, f"device exited with {code}:\n{self.output()}"

    def output(self, start: int | None = None) -> str:
        """What every start printed, or only start number ``start`` (1-based)."""
        outs = self.outputs if start is None else self.outputs[start - 1 : start]
        return "\n".join(p.read_text(errors="replace") for p in outs if p.exists())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


def device_state(state_dir: Path) -> dict[str, np.ndarray]:
    """A's and C's variables and optimizer state from ``latest/`` (keys ``dev/...``)."""
    from safetensors.numpy import load

    from shared_schema.durable import read_dir

    files = read_dir(state_dir / "latest")
    progress = json.loads(files["progress.json"])
    out = {f"dev/{k}": v for k, v in load(files["slices.safetensors"]).items()}
    out.update({f"dev-opt/{k}": v for k, v in load(files["optimizer.safetensors"]).items()})
    out["dev/step"] = np.array(progress["step"])
    return out


def server_state(state_dir: Path) -> dict[str, np.ndarray]:
    """B's parameters and buffers, its optimizer slots and scalars from the newest checkpoint."""
    from server_torch.checkpoint import read_state_dir

    saved = read_state_dir(state_dir)
    out = {f"B/{k}": v.detach().cpu().numpy() for k, v in saved.module_state.items()}
    out.update({f"B-opt/{k}": v.detach().cpu().numpy() for k, v in saved.optimizer_state.items()})
    out["B/steps"] = np.array(saved.step)
    scalars = (saved.state.get("optimizer") or {}).get("scalars") or {}
    for k, v in scalars.items():  # Adam's step count
        if isinstance(v, int | float):
            out[f"B-opt/{k}"] = np.array(v)
    return out


def final_state(server: Server, device: Device) -> dict[str, np.ndarray]:
    server.stop()
    return {**device_state(device.state_dir), **server_state(server.state_dir)}


def compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Largest relative difference over every tensor; the names must be the same."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    worst, where = 0.0, ""
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, (k, g.shape, w.shape)
        if w.dtype.kind in "iub":
            assert np.array_equal(g, w), (k, g, w)
            continue
        err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12))
        if err > worst:
            worst, where = err, k
    print(f"largest relative difference {worst:.2e} ({where or 'all equal'})")
    return worst


def segments(records: list[dict]) -> list[list[int]]:
    """The logged steps cut into runs of consecutive steps: every rollback (a restarted
    server) or resume (a restarted device) that goes back starts a new run."""
    runs: list[list[int]] = []
    for r in records:
        if runs and r["step"] == runs[-1][-1] + 1:
            runs[-1].append(r["step"])
        else:
            runs.append([r["step"]])
    return runs


def uninterrupted(bundle: Path, work: Path, steps=STEPS_30, runtime: str = "tf") -> dict:
    """The reference: the same configuration run without any fault, in this process.

    The same code as the processes of a crashed run (``spliteasy train``'s ``main`` with
    the same arguments; the app ``spliteasy serve`` builds, served by uvicorn in a thread,
    with as many torch threads as ``serve`` takes), without two process start-ups (TF and
    torch imports, ~10 s). Final state read back the same way: the device's ``latest/``
    and the server's final checkpoint (``ServerThread.stop`` writes it, as SIGTERM does).
    The crashed runs compare with it at 1e-6 (the 100-step fault run: exactly), which also
    shows that in-process and child-process training agree.
    """
    import torch

    from server_torch.app import create_app
    from server_torch.serving import ServerThread, configure_threads
    from spliteasy_cli.main import main

    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    configure_threads()  # what `spliteasy serve` does: the same intra-op threads
    try:
        app = create_app(bundle, state_dir=work / "server-state", checkpoint_every=5)
        with ServerThread(app) as srv:
            code = main(
                ["train", str(bundle), "--server", srv.url, "--runtime", runtime, *steps,
                 "--state-dir", str(work / "device-state"), "--log", str(work / "steps.jsonl"),
                 "--no-progress"]
            )  # fmt: skip
            assert code == 0
            assert app.state.trainer.steps == expected_steps(steps)
    finally:
        torch.set_num_threads(threads)
    return {**device_state(work / "device-state"), **server_state(work / "server-state")}


def expected_steps(steps: tuple[str, ...]) -> int:
    epochs, batch = int(steps[1]), int(steps[3])
    return epochs * -(-1437 // batch)
