"""The device's training state on disk: a run survives the device and the server dying.

``spliteasy train ... --state-dir DIR`` keeps (DESIGN of issue #7)::

    DIR/session.json      the run: server, session id and token (mode 0600), the bundle's
                          manifest hash, the data's hash, runtime, epochs, batch size, seed
    DIR/latest/           snapshot after the last completed step
    DIR/durable/          snapshot at the server's durable step (kept until the next one)
      slices.safetensors     A's and C's variables, "A/<layer>/<var>", "C/<layer>/<var>"
      optimizer.safetensors  slots "<slice>/<layer>/<var>/<slot>" and "<slice>/iterations"
      progress.json          {"step", "epoch", "position", "steps_per_epoch", "shuffle", ...}
      checksums.json         (``shared_schema.durable``: written atomically, verified on read)

Batches are a pure function of (seed, epoch, position) (``data.batches``), so the step
number alone says which batch comes next; a snapshot of step n resumes at exactly the
batch that follows.

Agreeing with the server on where to resume. Every session reply carries the step the
server's newest durable checkpoint holds for the session (``X-Spliteasy-Durable-Step``).
The device keeps its own snapshot of that step in ``durable/``:

- after saving the snapshot of step s, if s is the announced durable step, that
  snapshot becomes ``durable/`` too; when a step D is announced and ``latest/`` is at D,
  ``latest/`` is copied to ``durable/``;
- the server restarted from its checkpoint and answers 409 step_conflict with
  ``next_step`` S: the device restores its snapshot of S (``latest/`` or ``durable/``)
  and replays the batches from S, in the same order;
- the device restarted: it restores ``latest/``, takes up its session with the saved
  token, and a step the server had already applied is answered from the server's
  persisted retry store (the same bytes, so nothing is applied twice).

Nothing is pickled; the token is stored only in ``session.json``, mode 0600.

Test hook: with ``SPLITEASY_DEVICE_CRASH_BEFORE_SAVING=N`` the process ends
(``os._exit(86)``) just before saving the snapshot of step N, i.e. after the server
applied step N - 1 and before the device recorded it: the restarted device must get
that step answered from the server's retry store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared_schema.durable import CorruptState, fsync_dir, read_dir, write_dir

from ._exceptions import ServerRejected, StateError
from .runtime import DeviceRuntime, RuntimeState

if TYPE_CHECKING:
    from .loop import SplitTrainer

FORMAT_VERSION = 1
LOCK_FILE = ".lock"
SESSION_FILE = "session.json"
SLICES_FILE = "slices.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"
CRASH_ENV = "SPLITEASY_DEVICE_CRASH_BEFORE_SAVING"
CRASH_EXIT_CODE = 86
SHUFFLE = "numpy.random.default_rng([seed, epoch]).permutation(n_samples), batches in order"


def data_digest(*arrays: np.ndarray) -> str:
    """sha256 over the training data (dtype, shape and bytes): the same batches need the
    same data, so a state dir is only resumed with the data it was trained on."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """What must be equal for a state dir to be resumed: the same steps on the same batches."""

    manifest_sha256: str
    runtime: str
    aux_label: bool
    data_sha256: str
    n_samples: int
    epochs: int
    batch_size: int
    seed: int
    codec: str = "float32"  # the session's wire codec: a resumed run keeps its session's

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def progress(self, step: int) -> dict:
        epoch, position = divmod(step, self.steps_per_epoch)
        return {
            "format_version": FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "position": position,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "shuffle": {"seed": self.seed, "n_samples": self.n_samples, "rule": SHUFFLE},
            "manifest_sha256": self.manifest_sha256,
            "runtime": self.runtime,
        }


@dataclass
class Snapshot:
    """One saved state: its step and the bytes of its files (without checksums.json)."""

    step: int
    files: dict[str, bytes]

    @classmethod
    def capture(cls, runtime: DeviceRuntime, spec: RunSpec, step: int) -> Snapshot:
        from safetensors.numpy import save

        st = runtime.state()
        meta = {"format_version": str(FORMAT_VERSION), "manifest_sha256": spec.manifest_sha256}
        return cls(
            step,
            {
                SLICES_FILE: save(_contiguous(st.slices), metadata=meta),
                OPTIMIZER_FILE: save(_contiguous(st.optimizer), metadata=meta),
                PROGRESS_FILE: json.dumps(spec.progress(step), indent=1).encode(),
            },
        )

    @classmethod
    def from_files(cls, files: dict[str, bytes], where: Path) -> Snapshot:
        files = {k: v for k, v in files.items() if k != "checksums.json"}
        missing = {SLICES_FILE, OPTIMIZER_FILE, PROGRESS_FILE} - set(files)
        if missing:
            raise CorruptState(f"{where}: lacks {sorted(missing)}")
        try:
            step = int(json.loads(files[PROGRESS_FILE])["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptState(f"{where}: unreadable {PROGRESS_FILE} ({exc})") from None
        return cls(step, files)

    @property
    def progress(self) -> dict:
        return json.loads(self.files[PROGRESS_FILE])

    def runtime_state(self) -> RuntimeState:
        from safetensors.numpy import load

        return RuntimeState(load(self.files[SLICES_FILE]), load(self.files[OPTIMIZER_FILE]))


def _contiguous(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, order="C") for k, v in arrays.items()}  # keeps 0-d arrays 0-d


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class DeviceState:
    """A state directory for one run (``RunSpec``) of one runtime.

    ``begin(trainer)`` opens or takes up the session and returns the step to run next;
    after each step the loop calls ``announce(durable_step)`` then ``commit(step)``; on
    a 409 from a restarted server it calls ``rollback(next_step)``.
    """

    def __init__(
        self,
        directory: Path | str,
        spec: RunSpec,
        runtime: DeviceRuntime | None = None,
        *,
        server: str = "",
        notify: Callable[[str], None] = _stderr_line,
    ) -> None:
        self.dir = Path(directory)
        self.spec = spec
        self.runtime = runtime  # may be set later, before ``begin``
        self.server = server
        self.notify = notify
        self.latest: Snapshot | None = None
        self.durable: Snapshot | None = None
        self.announced = 0  # the last durable step the server told us about
        self._lock_fd: int | None = None
        # What the run trains on (``datasets.Dataset.record``: source, class names): kept
        # in session.json beside "run", not part of the resume check (the data's sha256 is).
        self.data: dict | None = None

    def lock(self) -> None:
        """Hold the state dir for this process (two devices on one dir would interleave
        their snapshots); the lock goes with the process, however it ends. Removes what
        writers killed mid-write left behind."""
        import fcntl
        import shutil

        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"the state dir {self.dir} is in use by another running device"
            ) from None
        self._lock_fd = fd
        for tmp in self.dir.glob(".tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- session.json ------------------------------------------------------------------

    @property
    def session_path(self) -> Path:
        return self.dir / SESSION_FILE

    def read_session(self) -> dict | None:
        """The saved run, checked against this run's spec; None if there is none yet."""
        try:
            raw = self.session_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            saved = json.loads(raw)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise StateError(f"{self.session_path} is unreadable ({exc})") from None
        self._check_spec(saved)
        return saved

    def _check_spec(self, saved: dict) -> None:
        mine = asdict(self.spec)
        theirs = {"codec": "float32", **saved.get("run", {})}  # state dirs before codecs
        if theirs.get("manifest_sha256") != mine["manifest_sha256"]:
            raise StateError(
                f"the state dir {self.dir} belongs to another bundle (manifest "
                f"{str(theirs.get('manifest_sha256'))[:12]}, this bundle's is "
                f"{mine['manifest_sha256'][:12]}); use another --state-dir"
            )
        differ = [
            f"{k} {theirs.get(k)!r} -> {v!r}"
            for k, v in mine.items()
            if k != "manifest_sha256" and theirs.get(k) != v
        ]
        if differ:
            raise StateError(
                f"the state dir {self.dir} holds a run with other settings "
                f"({'; '.join(differ)}): resuming would train on other batches; "
                "use the same settings or another --state-dir"
            )

    def write_session(self, session_id: str, token: str) -> None:
        """session.json, atomically (temp file, fsync, rename, fsync of the folder), 0600."""
        doc = {
            "format_version": FORMAT_VERSION,
            "server": self.server,
            "session_id": session_id,
            "token": token,
            "run": asdict(self.spec),
        }
        if self.data is not None:
            doc["data"] = self.data
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.dir / f".tmp-{SESSION_FILE}-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(doc, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.session_path)
        fsync_dir(self.dir)

    # -- snapshots ---------------------------------------------------------------------

    def _read(self, name: str) -> Snapshot | None:
        path = self.dir / name
        if not path.exists() and not any(self.dir.glob(f".old-{name}-*")):
            return None
        try:
            snap = Snapshot.from_files(read_dir(path), path)
        except CorruptState as exc:
            self.notify(f"spliteasy: ignoring the device snapshot {name}/: {exc}")
            return None
        progress = snap.progress
        if progress.get("manifest_sha256") != self.spec.manifest_sha256:
            raise StateError(f"{path} belongs to another bundle; use another --state-dir")
        if progress.get("runtime") != self.spec.runtime:
            raise StateError(
                f"{path} was written by the {progress.get('runtime')} runtime, not "
                f"{self.spec.runtime}; resume with --runtime {progress.get('runtime')}"
            )
        return snap

    def _write(self, name: str, snap: Snapshot) -> None:
        write_dir(self.dir / name, snap.files)

    def commit(self, step: int) -> Snapshot:
        """Save the runtime's state after ``step`` completed steps as ``latest/`` (and as
        ``durable/`` when the server has announced exactly that step)."""
        at = os.environ.get(CRASH_ENV, "").strip()
        if at.isdigit() and int(at) == step:
            os._exit(CRASH_EXIT_CODE)
        snap = Snapshot.capture(self.runtime, self.spec, step)
        self._write("latest", snap)
        self.latest = snap
        if step == self.announced and (self.durable is None or self.durable.step != step):
            self._write("durable", snap)
            self.durable = snap
        return snap

    def announce(self, durable_step: int | None) -> None:
        """The server's newest checkpoint holds this session's ``durable_step``."""
        if durable_step is None:
            return
        self.announced = durable_step
        latest, durable = self.latest, self.durable
        have = durable is not None and durable.step == durable_step
        if latest is not None and latest.step == durable_step and not have:
            self._write("durable", latest)
            self.durable = latest

    def snapshot_at(self, step: int) -> Snapshot | None:
        for snap in (self.latest, self.durable):
            if snap is not None and snap.step == step:
                return snap
        return None

    def restore(self, snap: Snapshot) -> int:
        self.runtime.load_state(snap.runtime_state())
        return snap.step

    # -- the run -----------------------------------------------------------------------

    def begin(self, trainer: SplitTrainer) -> int:
        """Open a new session or take up the saved one; returns the step to run next."""
        if self.runtime is None:
            raise StateError("DeviceState.begin needs the runtime whose state it keeps")
        self.lock()
        saved = self.read_session()
        self.latest = self._read("latest") if saved else None
        self.durable = self._read("durable") if saved else None
        if saved and self.latest is None and self.durable is not None:
            self.latest = self.durable  # latest/ lost: the durable step is the next best
        if saved is None or self.latest is None:
            return self._fresh(trainer)
        if self.latest.step > self.spec.total_steps:
            raise StateError(f"{self.dir} is at step {self.latest.step} of a shorter run")
        step = self.restore(self.latest)
        if step == self.spec.total_steps:  # finished (its session may be gone): no traffic
            self.notify(f"spliteasy: the run in {self.dir} finished all {step} steps already")
            return step
        self.announced = self.durable.step if self.durable else -1
        try:
            info = trainer.resume(saved["session_id"], saved["token"])
        except ServerRejected as exc:
            if exc.code != "unknown_session":
                raise
            return self.session_lost(trainer)
        if saved.get("server") != self.server:
            self.write_session(info.session_id, info.token)  # remember where it is now
        self.notify(
            f"spliteasy: resuming session {info.session_id[:8]} at step {step} of "
            f"{self.spec.total_steps} (epoch {step // self.spec.steps_per_epoch + 1}, "
            f"batch {step % self.spec.steps_per_epoch + 1}); the server expects step "
            f"{info.next_step}, its checkpoint holds step {info.durable_step}"
        )
        self.announce(info.durable_step)
        if info.next_step < step:
            return self.rollback(trainer, info.next_step)
        if info.next_step > step + 1:
            raise StateError(
                f"the server is at step {info.next_step} of session {info.session_id[:8]}, "
                f"but this device's state holds step {step}: it cannot have been trained "
                "from this state dir"
            )
        trainer.next_step = step  # the server answers a step it already has from its store
        return step

    def _fresh(self, trainer: SplitTrainer) -> int:
        """A new run: the bundle's initial state is step 0, and durable (nothing trained)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.announced = 0
        self.durable = None
        self.commit(0)
        info = trainer.open()
        self.write_session(info.session_id, info.token)
        return 0

    def rollback(self, trainer: SplitTrainer, step: int) -> int:
        """Go back to ``step`` (the server restarted from a checkpoint holding it)."""
        snap = self.snapshot_at(step)
        if snap is None:
            have = sorted({s.step for s in (self.latest, self.durable) if s is not None})
            raise StateError(
                f"the server resumed this session at step {step}, but this device keeps "
                f"snapshots of steps {have} only: the two cannot continue the same run "
                "exactly; start a new run with another --state-dir"
            )
        current = self.latest.step if self.latest is not None else step
        if step != current:
            self.notify(
                f"spliteasy: the server holds step {step} of this session (restarted from "
                f"its checkpoint); rolling back from step {current} and replaying"
            )
        self.restore(snap)
        if self.latest is None or self.latest.step != step:
            self._write("latest", snap)
            self.latest = snap
        trainer.next_step = step
        return step

    def session_lost(self, trainer: SplitTrainer) -> int:
        """The server does not know the session (it restarted without a checkpoint that
        holds it): start a new session from step 0 if the device still has step 0."""
        snap = self.snapshot_at(0)
        if snap is None:
            raise StateError(
                "the server no longer knows this session (it restarted without a checkpoint "
                "that holds it) and this device has no snapshot of step 0 to start over from; "
                "start a new run with another --state-dir"
            )
        self.notify(
            "spliteasy: the server does not know this session (restarted without a "
            "checkpoint holding it); starting over from step 0 with a new session"
        )
        self.restore(snap)
        self.announced = 0
        if self.latest is None or self.latest.step != 0:
            self._write("latest", snap)
            self.latest = snap
        info = trainer.open()
        self.write_session(info.session_id, info.token)
        return 0
