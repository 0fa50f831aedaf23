"""The server's state on disk: B, its optimizer and the session table, so that a server
killed at any moment restarts where its newest checkpoint stands and continues bit for
bit as if it had never stopped.

Layout of a state directory (docs/protocol.md, "Server state")::

    DIR/bundle.json             {"manifest_sha256", "model", "split_mode"}: whose state this is
    DIR/.lock                   held (flock) by the one server using DIR
    DIR/ckpt-<steps:010d>/      one checkpoint; the newest two are kept
        b.safetensors           B's module.state_dict() (parameters and buffers), torch names
        optimizer.safetensors   optimizer slot tensors, keys "<param index>/<slot>"
        state.json              format_version, manifest_sha256, trainer steps, optimizer
                                scalars (Adam's step count), created (ISO), sessions
        store/<sid>-<op>.frames the reply bodies of each session's retry store
        checksums.json          sha256 of every other file (``shared_schema.durable``)

Sessions are kept as the sha256 of their token, never the token. A checkpoint is taken
only when B is *quiescent* -- no forward waiting for its backward --, synchronously under
the service's lock: after each step that makes ``steps % every == 0``, when a session is
created (so a restarted server still knows it), and once more on shutdown. B's BatchNorm
statistics move in the forward, so a checkpoint between a forward and its backward would
hold half a step; there is none.

After writing, every session's ``durable_step`` becomes its ``next_step``: the server
tells the device (``X-Spliteasy-Durable-Step``) which of its steps a restart would keep.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared_schema import SpliteasyError
from shared_schema.durable import CorruptState, Entry, Series, fsync_dir

from .sessions import Session, Stored

if TYPE_CHECKING:
    from .sessions import SplitService

FORMAT_VERSION = 1
DEFAULT_EVERY = 50
KEEP = 2
BUNDLE_FILE = "bundle.json"
LOCK_FILE = ".lock"
PREFIX = "ckpt-"

log = logging.getLogger("spliteasy.server")


class StateDirError(SpliteasyError):
    """A state directory that cannot be used: another bundle's, in use, or unfit for B."""


def default_state_dir(manifest_sha256: str, root: Path | str = "runs") -> Path:
    """``runs/serve-<first 12 hex of the manifest's sha256>``: the same command, the same dir."""
    return Path(root) / f"serve-{manifest_sha256[:12]}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int  # the trainer's optimizer steps held by the checkpoint
    time: str  # when it was written (ISO 8601, UTC)
    path: Path

    def public(self) -> dict[str, Any]:
        return {"step": self.step, "time": self.time}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- capture and restore (pure: files <-> service) ------------------------------------------


def capture(service: SplitService) -> dict[str, bytes]:
    """The files of one checkpoint of ``service`` (call under its lock, B quiescent)."""
    from safetensors.torch import save

    tr = service.trainer
    # B's own memory, no copies: serialised right here, under the lock, between steps
    opt_tensors, opt_scalars = tr.optimizer_state(copy=False)
    files: dict[str, bytes] = {
        "b.safetensors": save(tr.module_state(copy=False)),
        "optimizer.safetensors": save(opt_tensors),
    }
    sessions = []
    for s in service.table.sessions.values():
        store = {}
        for op, st in sorted(s.store.items()):
            name = f"store/{s.id}-{op}.frames"
            files[name] = bytes(st.body)
            store[op] = {"step": st.step, "request_sha256": st.request_sha256, "file": name}
        sessions.append(
            {
                "id": s.id,
                "token_sha256": s.token_sha256,
                "aux_label": s.aux_label,
                "codec": s.codec,
                "next_step": s.next_step,
                "expect": s.expect,
                "stale_step": s.stale_step,
                "store": store,
            }
        )
    group = tr.optimizer.param_groups[0]
    state = {
        "format_version": FORMAT_VERSION,
        "manifest_sha256": service.manifest_sha256,
        "model": service.manifest.model,
        "split_mode": service.manifest.split_mode,
        "steps": tr.steps,
        "optimizer": {
            "class": type(tr.optimizer).__name__,
            "hyper": {k: v for k, v in group.items() if k != "params"},
            "scalars": opt_scalars,
        },
        "created": _now_iso(),
        "sessions": sessions,
    }
    files["state.json"] = json.dumps(state, indent=1, sort_keys=True).encode()
    return files


def restore(service: SplitService, files: dict[str, bytes], where: str = "checkpoint") -> dict:
    """Put a checkpoint's B, optimizer, step count and sessions into ``service``.

    Everything is parsed and checked before the first tensor is copied; a checkpoint of
    another bundle or one that does not fit B is a :class:`StateDirError` (never a
    partial load). Returns the checkpoint's state.json.
    """
    from safetensors.torch import load

    try:
        state = json.loads(files["state.json"])
        if state.get("format_version") != FORMAT_VERSION:
            raise StateDirError(
                f"{where}: format version {state.get('format_version')!r}, "
                f"this server reads {FORMAT_VERSION}"
            )
        if state["manifest_sha256"] != service.manifest_sha256:
            raise StateDirError(
                f"{where} belongs to bundle manifest {state['manifest_sha256'][:12]}, "
                f"not this bundle's {service.manifest_sha256[:12]}"
            )
        tr = service.trainer
        if state["optimizer"]["class"] != type(tr.optimizer).__name__:
            raise StateDirError(
                f"{where}: optimizer {state['optimizer']['class']}, B trains with "
                f"{type(tr.optimizer).__name__}"
            )
        module_state = load(files["b.safetensors"])
        opt_tensors = load(files["optimizer.safetensors"])
        now = time.monotonic()
        sessions = []
        for d in state["sessions"]:
            store = {
                op: Stored(int(st["step"]), str(st["request_sha256"]), files[st["file"]])
                for op, st in d["store"].items()
            }
            sessions.append(
                Session(
                    id=str(d["id"]),
                    token_sha256=str(d["token_sha256"]),
                    aux_label=bool(d["aux_label"]),
                    codec=str(d.get("codec", "float32")),  # older checkpoints: float32
                    created=now,
                    last_seen=now,
                    next_step=int(d["next_step"]),
                    expect=d["expect"],
                    stale_step=d.get("stale_step"),
                    store=store,
                    durable_step=int(d["next_step"]),
                )
            )
        steps = int(state["steps"])
    except StateDirError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise StateDirError(
            f"{where}: unreadable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    try:
        tr.load_module_state(module_state)
        tr.load_optimizer_state(opt_tensors, state["optimizer"]["scalars"])
    except ValueError as exc:
        raise StateDirError(f"{where} does not fit this bundle's B: {exc}") from None
    tr.steps = steps
    tr.discard()
    service.table.replace_all(sessions)
    return state


def _signature(service: SplitService) -> tuple:
    """What a checkpoint holds, cheaply: equal signatures mean nothing changed since."""
    return (
        service.trainer.steps,
        tuple(
            sorted(
                (
                    s.id,
                    s.next_step,
                    s.expect,
                    s.stale_step,
                    tuple(sorted((op, st.step, st.request_sha256) for op, st in s.store.items())),
                )
                for s in service.table.sessions.values()
            )  # fmt: skip
        ),
    )


@dataclass(frozen=True)
class SavedState:
    """The newest intact checkpoint of a state dir, read without a server (``export``)."""

    step: int
    time: str
    path: Path
    state: dict[str, Any]  # state.json
    module_state: dict[str, Any]  # B's state_dict: torch name -> tensor
    optimizer_state: dict[str, Any]  # "<param index>/<slot>" -> tensor


def read_state_dir(root: Path | str, manifest_sha256: str | None = None) -> SavedState:
    """The newest intact checkpoint under ``root`` (torn/corrupt ones skipped, warned).

    With ``manifest_sha256`` a state dir of another bundle is a :class:`StateDirError`.
    """
    from safetensors.torch import load

    root = Path(root)
    bundle = root / BUNDLE_FILE
    if not bundle.is_file():
        raise StateDirError(f"{root} is not a server state dir (no {BUNDLE_FILE})")
    held = json.loads(bundle.read_text()).get("manifest_sha256", "")
    if manifest_sha256 is not None and held != manifest_sha256:
        raise StateDirError(
            f"state dir {root} belongs to another bundle (manifest {held[:12]}, "
            f"this one is {manifest_sha256[:12]})"
        )
    entry = Series(root, PREFIX).newest()
    if entry is None:
        raise StateDirError(f"{root} holds no intact checkpoint")
    state = json.loads(entry.files["state.json"])
    return SavedState(
        step=int(state["steps"]),
        time=str(state["created"]),
        path=entry.path,
        state=state,
        module_state=load(entry.files["b.safetensors"]),
        optimizer_state=load(entry.files["optimizer.safetensors"]),
    )


# -- the state directory --------------------------------------------------------------


class Checkpointer:
    """One server's state directory: claims it, resumes from it, checkpoints into it.

    ::

        ck = Checkpointer(service, Path("runs/serve-abc"), every=50)
        ck.open()      # refuses another bundle's dir or one in use
        ck.resume()    # newest intact checkpoint -> service (None if there is none)
        ck.attach()    # periodic checkpoints at quiescent points from now on
        ...
        ck.final()     # on shutdown: drain, last checkpoint, release the dir
    """

    def __init__(
        self, service: SplitService, root: Path | str, every: int = DEFAULT_EVERY, keep: int = KEEP
    ) -> None:
        if every < 0:
            raise StateDirError("--checkpoint-every must be 0 (only on shutdown) or more")
        self.service = service
        self.root = Path(root)
        self.every = every
        self.series = Series(self.root, PREFIX, keep, on_skip=self._skipped)
        self.last: CheckpointInfo | None = None
        self.resumed_from: int | None = None
        self.skipped: list[str] = []  # checkpoints passed over as torn or corrupt
        self._lock_fd: int | None = None
        self._written: tuple | None = None
        self._saved_ids: set[str] = set()  # the sessions the newest checkpoint holds

    # -- claiming the directory --

    def open(self) -> None:
        """Create or claim the directory: lock it, and check (or record) whose bundle it holds."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirError(f"cannot create state dir {self.root}: {exc}") from None
        self._lock()
        try:
            self._check_bundle()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirError(
                f"state dir {self.root} is in use by another spliteasy serve (pid {holder}); "
                "stop it or pass another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _check_bundle(self) -> None:
        m, sha = self.service.manifest, self.service.manifest_sha256
        path = self.root / BUNDLE_FILE
        if path.exists():
            try:
                held = json.loads(path.read_text())["manifest_sha256"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StateDirError(
                    f"{path} is unreadable ({exc}); is {self.root} a state dir?"
                ) from None
            if held != sha:
                raise StateDirError(
                    f"state dir {self.root} belongs to another bundle (manifest {held[:12]}, "
                    f"this one is {sha[:12]}); pass another --state-dir or remove that directory"
                )
            return
        if self.series.numbers():
            raise StateDirError(
                f"{self.root} holds checkpoints but no {BUNDLE_FILE}; refusing to guess"
            )
        foreign = sorted(
            p.name
            for p in self.root.iterdir()
            if p.name != LOCK_FILE and not p.name.startswith((".tmp-", ".old-", f".{BUNDLE_FILE}"))
        )
        if foreign:
            raise StateDirError(
                f"{self.root} is not a server state dir (it holds {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); pass a new or empty --state-dir"
            )
        doc = {
            "manifest_sha256": sha,
            "model": m.model,
            "split_mode": m.split_mode,
            "created": _now_iso(),
        }
        tmp = path.with_name(f".{BUNDLE_FILE}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.root)

    def close(self) -> None:
        """Release the directory (the lock also goes when the process dies)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None

    # -- resuming --

    def _skipped(self, path: Path, exc: CorruptState) -> None:
        self.skipped.append(path.name)
        log.warning("skipping checkpoint %s: %s", path.name, exc)

    def resume(self) -> CheckpointInfo | None:
        """Load the newest intact checkpoint (torn or corrupt ones are skipped with a warning)."""
        entry: Entry | None = self.series.newest()
        if entry is None:
            return None
        with self.service.lock:
            state = restore(self.service, entry.files, f"checkpoint {entry.path}")
            self._written = _signature(self.service)
            self._saved_ids = set(self.service.table.sessions)
        self.last = CheckpointInfo(int(state["steps"]), str(state["created"]), entry.path)
        self.resumed_from = self.last.step
        log.debug(  # the CLI prints its own line
            "resumed from checkpoint step %d written at %s (%d session(s))",
            self.last.step, self.last.time, len(state["sessions"]),
        )  # fmt: skip
        return self.last

    # -- writing --

    def attach(self) -> None:
        """Checkpoint at the service's quiescent points from now on."""
        self.service.on_quiescent = self._on_quiescent

    def _on_quiescent(self, reason: Literal["step", "session"]) -> None:
        steps = self.service.trainer.steps
        # A session created while another device held B is saved at the next chance.
        unsaved = not self._saved_ids.issuperset(self.service.table.sessions)
        if reason == "session" or unsaved or (self.every and steps % self.every == 0):
            self._write_locked()

    def _write_locked(self) -> CheckpointInfo | None:
        """Write a checkpoint now (lock held, B quiescent). A failure is logged, not raised:
        the step it follows is applied and its reply must still go out."""
        service = self.service
        sig = _signature(service)
        if sig == self._written and self.last is not None:
            return self.last
        t0 = time.perf_counter()
        try:
            files = capture(service)
            path = self.series.save(service.trainer.steps, files)
        except Exception as exc:
            log.error("checkpoint at step %d failed: %s", service.trainer.steps, exc, exc_info=exc)
            return None
        for s in service.table.sessions.values():
            s.durable_step = s.next_step
        self._saved_ids = set(service.table.sessions)
        created = json.loads(files["state.json"])["created"]
        self.last = CheckpointInfo(service.trainer.steps, created, path)
        self._written = sig
        log.info(
            "checkpoint step %d written to %s (%.0f ms)",
            self.last.step, path, (time.perf_counter() - t0) * 1e3,
        )  # fmt: skip
        return self.last

    def checkpoint(self) -> CheckpointInfo | None:
        """Write a checkpoint now if B is quiescent (else None): for tests and tools."""
        with self.service.lock:
            if not self.service.quiescent:
                return None
            return self._write_locked()

    def final(self, wait: float = 5.0) -> CheckpointInfo | None:
        """On shutdown: refuse new work, wait up to ``wait`` s for a held lease, write the
        last checkpoint, release the directory."""
        try:
            if not self.service.drain(wait):
                log.warning(
                    "a device still holds B after %g s; no final checkpoint (the newest is step %s)",
                    wait, self.last.step if self.last else "none",
                )  # fmt: skip
                return None
            with self.service.lock:
                if self.last is not None and _signature(self.service) == self._written:
                    log.info("final checkpoint: nothing changed since step %d", self.last.step)
                    return self.last
                return self._write_locked()
        finally:
            self.close()

    def health(self) -> dict[str, Any]:
        return {
            "checkpoint": self.last.public() if self.last else None,
            "resumed_from": self.resumed_from,
        }
