"""The protocol's step logic, independent of any transport.

One B per server, many sessions (one per device). A session walks through its steps in
order; for a double split each step is ``forward n`` then ``backward n``. Every reply is
kept (the last forward, backward and single-split step of each session, with a hash of
the request that produced it), so a retried request is answered from the store and
never reaches B twice; a request for any other step is a conflict.

Devices take turns on B (vanilla split learning): a forward takes a *lease* on B that
its backward returns. Another session's forward waits for the lease; a lease held
longer than ``lease_timeout`` (a device that vanished mid-step) is revoked when someone
else needs B, and the late backward is told its forward went stale.

Each public call takes the session id, the bearer token and the raw message body, and
returns the raw reply body: HTTP (``app``) and any future transport share it. Everything
a request carries is validated before B is touched, so a rejected request changes
neither B nor the session.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from shared_schema import (
    Frame,
    FrameKind,
    FrameSpecMismatch,
    Manifest,
    TensorSpec,
    check,
    decode,
    encode,
    scalar,
)

from .errors import (
    BadRequest,
    Busy,
    Forbidden,
    ManifestMismatch,
    NonFinite,
    StaleForward,
    StepConflict,
    TooManySessions,
    Unauthorized,
    UnknownSession,
    WrongSplitMode,
)

if TYPE_CHECKING:  # torch loads with the trainer, not with this module
    from .trainer import Trainer

Op = Literal["forward", "backward", "step"]
_SID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


@dataclass(frozen=True)
class Reply:
    """A reply body and what the server spent on it."""

    body: bytes
    server_ms: float  # time inside B (forward/backward/optimizer) for this call
    replayed: bool = False  # answered from the session's store; B not touched


@dataclass
class _Stored:
    step: int
    request_sha256: str
    body: bytes


@dataclass
class Session:
    id: str
    token: str
    aux_label: bool
    created: float
    last_seen: float
    next_step: int = 0
    expect: Literal["forward", "backward"] = "forward"  # double split: what step next_step needs
    stale_step: int | None = None  # a forward whose lease was revoked
    store: dict[str, _Stored] = field(default_factory=dict)

    @property
    def sid_bytes(self) -> bytes:
        return bytes.fromhex(self.id)

    def public(self, split_mode: str) -> dict:
        return {
            "session_id": self.id,
            "token": self.token,
            "next_step": self.next_step,
            "split_mode": split_mode,
            "aux_label": self.aux_label,
        }


@dataclass
class _Lease:
    session_id: str
    expires: float


class SplitService:
    """Sessions, turn-taking on B and the retry store around one :class:`Trainer`."""

    def __init__(
        self,
        trainer: Trainer,
        manifest: Manifest,
        manifest_sha256: str,
        *,
        max_sessions: int = 64,
        lease_timeout: float = 120.0,
        idle_timeout: float = 3600.0,
    ) -> None:
        self.trainer = trainer
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.max_sessions = max_sessions
        self.lease_timeout = lease_timeout
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, Session] = {}
        self._lease: _Lease | None = None
        self._queue: list[str] = []  # sessions waiting for their turn on B, in arrival order
        self._handovers = 0  # leases granted and released: progress, for waiters' patience
        # One lock guards sessions, the lease and B; the condition lets a forward wait
        # for another device's turn without holding it.
        self._cond = threading.Condition(threading.Lock())

    # -- sessions ----------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def create_session(self, manifest_sha256: str, aux_label: bool = False) -> Session:
        if not secrets.compare_digest(manifest_sha256.lower(), self.manifest_sha256):
            raise ManifestMismatch(
                f"the server holds bundle manifest {self.manifest_sha256}, "
                f"the device {manifest_sha256}: both must load the same bundle"
            )
        now = time.monotonic()
        with self._cond:
            if len(self._sessions) >= self.max_sessions:
                self._evict_idle(now)
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(f"{self.max_sessions} sessions are open; delete one first")
            s = Session(
                id=uuid.uuid4().hex,
                token=secrets.token_urlsafe(32),
                aux_label=bool(aux_label),
                created=now,
                last_seen=now,
            )
            self._sessions[s.id] = s
            return s

    def delete_session(self, session_id: str, token: str | None) -> None:
        with self._cond:
            s = self._authorize(session_id, token)
            self._release(s.id)
            del self._sessions[s.id]

    def check_access(self, session_id: str, token: str | None) -> None:
        """The authorisation check without the lock, for an event loop that must not wait
        for B; every call checks again under the lock."""
        self._lookup(session_id, token)

    def authorize(self, session_id: str, token: str | None) -> Session:
        with self._cond:
            return self._authorize(session_id, token)

    def _authorize(self, session_id: str, token: str | None) -> Session:
        s = self._lookup(session_id, token)
        s.last_seen = time.monotonic()
        return s

    def _lookup(self, session_id: str, token: str | None) -> Session:
        s = self._sessions.get(session_id) if _SID.match(session_id) else None
        if s is None:
            raise UnknownSession(f"no session {session_id!r} (expired, deleted or never created)")
        if not token:
            raise Unauthorized("session endpoints need 'Authorization: Bearer <token>'")
        if not secrets.compare_digest(token.encode(), s.token.encode()):
            raise Forbidden("wrong token for this session")
        return s

    def _evict_idle(self, now: float) -> None:
        busy = {self._lease.session_id} if self._lease else set()
        busy.update(self._queue)
        for sid, s in list(self._sessions.items()):
            if sid not in busy and now - s.last_seen > self.idle_timeout:
                del self._sessions[sid]

    # -- the lease on B ----------------------------------------------------------------

    def _release(self, session_id: str) -> None:
        if self._lease and self._lease.session_id == session_id:
            self._lease = None
            self._handovers += 1
            self.trainer.discard()
            self._cond.notify_all()

    def _revoke_expired(self, requester: str, now: float) -> None:
        lease = self._lease
        if lease is None or lease.session_id == requester or now < lease.expires:
            return
        holder = self._sessions.get(lease.session_id)
        if holder is not None and holder.expect == "backward":
            holder.expect = "forward"
            holder.stale_step = holder.next_step
            holder.store.pop("forward", None)
        self._lease = None
        self.trainer.discard()
        self._cond.notify_all()  # whoever is first in line may go

    def _with_turn(
        self, session_id: str, token: str | None, attempt: Callable[[Session], T | None]
    ) -> T:
        """Run ``attempt`` under the lock once it is this session's turn on B.

        ``attempt`` re-validates the session state each time (it may have changed while
        we waited) and returns None to say "needs B, which is not ours yet". Waiting
        sessions queue in arrival order, so devices take B round-robin. We give up (503)
        only if B changes hands for longer than a lease without anyone finishing.
        """
        patience = self.lease_timeout + 5.0
        with self._cond:
            seen, deadline = self._handovers, time.monotonic() + patience
            try:
                while True:
                    s = self._authorize(session_id, token)
                    now = time.monotonic()
                    self._revoke_expired(s.id, now)
                    result = attempt(s)
                    if result is not None:
                        return result
                    if s.id not in self._queue:
                        self._queue.append(s.id)
                    if self._handovers != seen:
                        seen, deadline = self._handovers, now + patience
                    if now >= deadline:
                        raise Busy("B has been held by other devices for too long; try again")
                    wait = deadline - now
                    if self._lease is not None:
                        wait = min(wait, self._lease.expires - now)
                    self._cond.wait(timeout=max(wait, 0.01))
            finally:
                if session_id in self._queue:
                    self._queue.remove(session_id)
                    self._cond.notify_all()  # the next in line may go now

    def _free_for(self, s: Session) -> bool:
        """B is free for ``s``: nobody else holds it and nobody queued before ``s``."""
        if self._lease is not None:
            return self._lease.session_id == s.id
        return not self._queue or self._queue[0] == s.id

    def _grant(self, s: Session) -> None:
        self._lease = _Lease(s.id, time.monotonic() + self.lease_timeout)
        self._handovers += 1

    # -- message parsing (no lock, no B) -----------------------------------------------

    def _frames(
        self,
        body: bytes | bytearray | memoryview,
        s: Session,
        expected: list[tuple[FrameKind, TensorSpec]],
    ) -> tuple[int, list[Frame]]:
        frames = decode(body)
        if len(frames) != len(expected):
            kinds = " + ".join(k.name for k, _ in expected)
            raise BadRequest(f"expected {len(expected)} frame(s) ({kinds}), got {len(frames)}")
        by_kind = {f.kind: f for f in frames}
        ordered: list[Frame] = []
        for kind, spec in expected:
            frame = by_kind.get(kind, frames[len(ordered)])
            check(frame, spec, kind)
            ordered.append(frame)
        step = frames[0].step
        for f in frames:
            if f.session != s.sid_bytes:
                raise BadRequest(f"frame {f.name!r} names session {f.session.hex()}, not {s.id}")
            if f.step != step:
                raise BadRequest("all frames of one message must carry the same step")
        for f in ordered:
            if f.array.dtype.kind == "f" and not np.isfinite(f.array).all():
                raise NonFinite(f"{f.name}: contains NaN or Inf")
        return step, ordered

    # -- the store: retries are answered from it ----------------------------------------

    @staticmethod
    def _replay(s: Session, op: Op, step: int, digest: str) -> Reply | None:
        stored = s.store.get(op)
        if stored is None or stored.step != step:
            return None
        if stored.request_sha256 != digest:
            raise StepConflict(f"{op} step {step} was already done with a different request body")
        return Reply(stored.body, 0.0, replayed=True)

    # -- protocol calls ----------------------------------------------------------------

    def _need(self, mode: str, op: str) -> None:
        if self.manifest.split_mode != mode:
            raise WrongSplitMode(
                f"/{op} belongs to the {mode} split; this server runs a {self.manifest.split_mode} split"
            )

    def forward(self, session_id: str, token: str | None, body: bytes | bytearray) -> Reply:
        """Double split, first round trip: ACTIVATION cuts[0] -> ACTIVATION cuts[1]."""
        self._need("double", "forward")
        s0 = self.authorize(session_id, token)
        step, (frame,) = self._frames(
            body, s0, [(FrameKind.ACTIVATION, self.manifest.server_input)]
        )
        digest = hashlib.sha256(body).hexdigest()

        def attempt(s: Session) -> Reply | None:
            replay = self._replay(s, "forward", step, digest)
            if replay is not None:
                return replay
            if s.expect != "forward" or step != s.next_step:
                raise StepConflict(_expected(s, "forward", step))
            if not self._free_for(s):
                return None
            t0 = time.perf_counter()
            out = self.trainer.forward(frame.array)
            ms = (time.perf_counter() - t0) * 1e3
            spec = self.manifest.server_output
            reply = encode(
                [Frame(FrameKind.ACTIVATION, spec.name, out, spec.layout, s.sid_bytes, step)]
            )
            self._grant(s)
            s.expect, s.stale_step = "backward", None
            s.store["forward"] = _Stored(step, digest, reply)
            return Reply(reply, ms)

        return self._with_turn(session_id, token, attempt)

    def backward(self, session_id: str, token: str | None, body: bytes | bytearray) -> Reply:
        """Double split, second round trip: GRADIENT (TARGET) cuts[1] -> GRADIENT (TARGET) cuts[0]."""
        self._need("double", "backward")
        s0 = self.authorize(session_id, token)
        kind = FrameKind.TARGET if s0.aux_label else FrameKind.GRADIENT
        step, (frame,) = self._frames(body, s0, [(kind, self.manifest.server_output)])
        digest = hashlib.sha256(body).hexdigest()

        with self._cond:
            s = self._authorize(session_id, token)
            replay = self._replay(s, "backward", step, digest)
            if replay is not None:
                return replay
            if s.stale_step == step and s.expect == "forward":
                raise StaleForward(
                    f"the forward of step {step} held B longer than {self.lease_timeout:g} s and "
                    "was dropped when another device needed B; send that forward again"
                )
            if s.expect != "backward" or step != s.next_step:
                raise StepConflict(_expected(s, "backward", step))
            lease = self._lease
            if lease is None or lease.session_id != s.id:  # pragma: no cover - invariant
                raise StaleForward("this session does not hold B; send the forward again")
            pending = self.trainer.pending_batch
            if pending is not None and frame.array.shape[0] != pending:
                raise FrameSpecMismatch(
                    f"{frame.name}: batch {frame.array.shape[0]}, the forward had {pending}"
                )
            t0 = time.perf_counter()
            g_a = self.trainer.backward(frame.array, target=s.aux_label)
            ms = (time.perf_counter() - t0) * 1e3
            spec = self.manifest.server_input
            reply = encode([Frame(kind, spec.name, g_a, spec.layout, s.sid_bytes, step)])
            s.store["backward"] = _Stored(step, digest, reply)
            s.next_step, s.expect = step + 1, "forward"
            self._lease = None
            self._handovers += 1
            self._cond.notify_all()
            return Reply(reply, ms)

    def step(self, session_id: str, token: str | None, body: bytes | bytearray) -> Reply:
        """Single split, one round trip: ACTIVATION cuts[0] + LABELS -> GRADIENT (TARGET) cuts[0] + loss."""
        self._need("single", "step")
        s0 = self.authorize(session_id, token)
        step, (frame, labels) = self._frames(
            body,
            s0,
            [
                (FrameKind.ACTIVATION, self.manifest.server_input),
                (FrameKind.LABELS, self.manifest.labels),
            ],
        )
        digest = hashlib.sha256(body).hexdigest()

        def attempt(s: Session) -> Reply | None:
            replay = self._replay(s, "step", step, digest)
            if replay is not None:
                return replay
            if step != s.next_step:
                raise StepConflict(_expected(s, "step", step))
            if not self._free_for(s):
                return None
            t0 = time.perf_counter()
            g_a, loss = self.trainer.step_single(frame.array, labels.array, target=s.aux_label)
            ms = (time.perf_counter() - t0) * 1e3
            spec = self.manifest.server_input
            kind = FrameKind.TARGET if s.aux_label else FrameKind.GRADIENT
            reply = encode(
                [
                    Frame(kind, spec.name, g_a, spec.layout, s.sid_bytes, step),
                    scalar("loss", loss, s.sid_bytes, step),
                ]
            )
            s.store["step"] = _Stored(step, digest, reply)
            s.next_step = step + 1
            return Reply(reply, ms)

        return self._with_turn(session_id, token, attempt)

    def infer(self, session_id: str, token: str | None, body: bytes | bytearray) -> Reply:
        """B in inference mode; no state changes, no step bookkeeping."""
        s0 = self.authorize(session_id, token)
        step, (frame,) = self._frames(
            body, s0, [(FrameKind.ACTIVATION, self.manifest.server_input)]
        )
        with self._cond:
            s = self._authorize(session_id, token)
            t0 = time.perf_counter()
            out = self.trainer.infer(frame.array)
            ms = (time.perf_counter() - t0) * 1e3
        spec = self.manifest.server_output
        return Reply(
            encode([Frame(FrameKind.ACTIVATION, spec.name, out, spec.layout, s.sid_bytes, step)]),
            ms,
        )


def _expected(s: Session, op: str, step: int) -> str:
    if s.expect == "backward":
        want = f"the backward of step {s.next_step} (or a retry of its forward)"
    elif op == "step":
        want = f"step {s.next_step}"
    else:
        want = f"the forward of step {s.next_step}"
    return f"{op} of step {step} is out of order: the session expects {want}"
