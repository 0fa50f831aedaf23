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

Who the sessions are lives in :class:`SessionTable` (ids, the sha256 of each token --
the token itself is handed out once and never kept --, where each session stands);
:class:`SplitService` adds the lease on B and the protocol calls. Persistence is not
here: ``checkpoint`` registers :attr:`SplitService.on_quiescent`, which the service
calls under its lock whenever B is between steps, and reads/restores the table.
"""

from __future__ import annotations

import hashlib
import math
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
from shared_schema import codec as codecs

from .errors import (
    BadRequest,
    BatchTooLarge,
    Busy,
    Forbidden,
    ManifestMismatch,
    NonFinite,
    ShuttingDown,
    StaleForward,
    StepConflict,
    TooManySessions,
    Unauthorized,
    UnknownSession,
    UnstableStep,
    UnsupportedCodec,
    ValueOutOfRange,
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
    durable_step: int = 0  # the session's next_step as held by the newest checkpoint


@dataclass
class Stored:
    """One reply of the retry store and the hash of the request that produced it."""

    step: int
    request_sha256: str
    body: bytes


def token_digest(token: str) -> str:
    """What the server keeps of a bearer token: its sha256 (hex)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Session:
    id: str
    token_sha256: str  # never the token: it is handed out once, at creation
    aux_label: bool
    created: float
    last_seen: float
    next_step: int = 0
    expect: Literal["forward", "backward"] = "forward"  # double split: what step next_step needs
    stale_step: int | None = None  # a forward whose lease was revoked
    store: dict[str, Stored] = field(default_factory=dict)
    durable_step: int = 0  # next_step as held by the newest durable checkpoint (0: none)
    codec: str = codecs.DEFAULT  # wire codec of its ACTIVATION/GRADIENT frames, both ways

    @property
    def sid_bytes(self) -> bytes:
        return bytes.fromhex(self.id)

    def status(self, split_mode: str) -> dict:
        """Where the session stands (``GET /v1/sessions/{sid}``, step_conflict bodies)."""
        return {
            "session_id": self.id,
            "next_step": self.next_step,
            "expect": "step" if split_mode == "single" else self.expect,
            "durable_step": self.durable_step,
            "split_mode": split_mode,
            "aux_label": self.aux_label,
            "codec": self.codec,
        }


class SessionTable:
    """The sessions of one server, by id. Not thread-safe: the service's lock guards it."""

    def __init__(self, max_sessions: int = 64, idle_timeout: float = 3600.0) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def create(
        self, aux_label: bool, busy: set[str], codec: str = codecs.DEFAULT
    ) -> tuple[Session, str]:
        """A new session and its bearer token (returned here once, kept only hashed)."""
        now = time.monotonic()
        if len(self.sessions) >= self.max_sessions:
            self.evict_idle(now, busy)
        if len(self.sessions) >= self.max_sessions:
            raise TooManySessions(f"{self.max_sessions} sessions are open; delete one first")
        token = secrets.token_urlsafe(32)
        s = Session(
            id=uuid.uuid4().hex,
            token_sha256=token_digest(token),
            aux_label=bool(aux_label),
            created=now,
            last_seen=now,
            codec=codec,
        )
        self.sessions[s.id] = s
        return s, token

    def lookup(self, session_id: str, token: str | None) -> Session:
        s = self.sessions.get(session_id) if _SID.match(session_id) else None
        if s is None:
            raise UnknownSession(f"no session {session_id!r} (expired, deleted or never created)")
        if not token:
            raise Unauthorized("session endpoints need 'Authorization: Bearer <token>'")
        if not secrets.compare_digest(token_digest(token), s.token_sha256):
            raise Forbidden("wrong token for this session")
        return s

    def remove(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def evict_idle(self, now: float, busy: set[str]) -> None:
        for sid, s in list(self.sessions.items()):
            if sid not in busy and now - s.last_seen > self.idle_timeout:
                del self.sessions[sid]

    def replace_all(self, sessions: list[Session]) -> None:
        """The table restored from a checkpoint."""
        self.sessions = {s.id: s for s in sessions}


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
        max_batch: int | None = None,
        max_abs_value: float = float("inf"),
        codecs_offered: tuple[str, ...] | None = None,
    ) -> None:
        """``max_batch``: most samples a message may carry; ``max_abs_value``: the largest
        magnitude an incoming float may have (a finite bound keeps a client from pushing B
        towards overflow; see ``app.default_max_abs_value``); ``codecs_offered``: the wire
        codecs a session may ask for (None: every codec of ``shared_schema.codec``)."""
        offered = tuple(codecs_offered) if codecs_offered is not None else codecs.NAMES
        for name in offered:
            codecs.get(name)  # a typo in the server's configuration fails at start
        self.codecs_offered = offered
        self.trainer = trainer
        self.max_batch = max_batch
        self.max_abs_value = max_abs_value
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.lease_timeout = lease_timeout
        self.table = SessionTable(max_sessions, idle_timeout)
        self._lease: _Lease | None = None
        self._queue: list[str] = []  # sessions waiting for their turn on B, in arrival order
        self._handovers = 0  # leases granted and released: progress, for waiters' patience
        # One lock guards sessions, the lease and B; the condition lets a forward wait
        # for another device's turn without holding it.
        self._cond = threading.Condition(threading.Lock())
        # Called under the lock whenever B is between steps (no lease held) after a step or
        # a session creation; ``checkpoint`` hangs the periodic checkpoint here.
        self.on_quiescent: Callable[[Literal["step", "session"]], None] | None = None
        self.draining = False  # shutting down: nothing new may change B or the table
        # Called (under the lock, from any thread) whenever B changes hands or the queue
        # moves: the asynchronous waiters (``guard.TurnWaiter``) wake on it.
        self.on_handover: Callable[[], None] | None = None

    def _notify(self) -> None:
        self._cond.notify_all()
        if self.on_handover is not None:
            self.on_handover()

    @property
    def handovers(self) -> int:
        """Leases granted and released so far: progress, for waiters' patience."""
        return self._handovers

    def may_go(self, session_id: str) -> bool:
        """Without the lock: False when another session surely still holds B (its lease
        has not expired), so a waiter need not ask under the lock yet."""
        lease = self._lease
        return lease is None or lease.session_id == session_id or lease.expires <= time.monotonic()

    def lease_left(self) -> float | None:
        """Seconds until the held lease may be revoked (None: B is free)."""
        lease = self._lease
        return None if lease is None else max(0.0, lease.expires - time.monotonic())

    def evict_idle(self) -> int:
        """Drop sessions idle for longer than ``idle_timeout`` (not one holding or waiting
        for B); the number dropped. Run on a schedule by the app."""
        with self._cond:
            before = len(self.table)
            self.table.evict_idle(time.monotonic(), self._busy())
            return before - len(self.table)

    # -- sessions ----------------------------------------------------------------------

    @property
    def lock(self) -> threading.Condition:
        """The lock that guards the table, the lease and B (held to take a checkpoint)."""
        return self._cond

    @property
    def _sessions(self) -> dict[str, Session]:
        return self.table.sessions

    @property
    def max_sessions(self) -> int:
        return self.table.max_sessions

    @property
    def session_count(self) -> int:
        return len(self.table)

    @property
    def quiescent(self) -> bool:
        """B is between steps: no forward waits for its backward (call under the lock)."""
        return self._lease is None

    def create_session(
        self, manifest_sha256: str, aux_label: bool = False, codec: str = codecs.DEFAULT
    ) -> tuple[Session, str]:
        """A new session and its token; the token is not kept (only its sha256).

        ``codec``: the wire codec its ACTIVATION/GRADIENT frames travel in, both ways; one
        this server does not offer is refused (422 ``unsupported_codec``), as is a lossy
        codec with ``aux_label`` (a rounded target c - g loses g, far smaller than c)."""
        if not secrets.compare_digest(manifest_sha256.lower(), self.manifest_sha256):
            raise ManifestMismatch(
                f"the server holds bundle manifest {self.manifest_sha256}, "
                f"the device {manifest_sha256}: both must load the same bundle"
            )
        if codec not in self.codecs_offered:
            known = "" if codec in codecs.NAMES else "unknown "
            raise UnsupportedCodec(
                f"{known}codec {codec!r}; this server offers {', '.join(self.codecs_offered)}",
                offered=list(self.codecs_offered),
            )
        if aux_label and not codecs.get(codec).exact:
            raise UnsupportedCodec(
                f"codec {codec!r} with aux_label: the target c - dL/dc would be rounded at the "
                "scale of c, losing the gradient; use the gradient form or codec float32",
                offered=list(self.codecs_offered),
            )
        with self._cond:
            if self.draining:
                raise ShuttingDown(
                    "the server is shutting down; create the session after it restarts"
                )
            s, token = self.table.create(aux_label, self._busy(), codec)
            self._quiescent_point("session")
            return s, token

    def session_status(self, session_id: str, token: str | None) -> dict:
        """Where a session stands: next_step, expect, durable_step (no state changes)."""
        with self._cond:
            return self._authorize(session_id, token).status(self.manifest.split_mode)

    def delete_session(self, session_id: str, token: str | None) -> None:
        with self._cond:
            s = self._authorize(session_id, token)
            self._release(s.id)
            self.table.remove(s.id)
            self._leave(s.id)
            self._notify()  # its waiting requests learn that it is gone

    def drain(self, timeout: float) -> bool:
        """Refuse new work and wait up to ``timeout`` s for a held lease to be returned.

        True when B is quiescent (a final checkpoint may be taken). Stored replies and
        backwards of a forward already on B are still answered meanwhile.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self.draining = True
            self._notify()  # waiting forwards learn now that they will not get B
            while self._lease is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.2))
            return True

    def _busy(self) -> set[str]:
        busy = {self._lease.session_id} if self._lease else set()
        busy.update(self._queue)
        return busy

    def _quiescent_point(self, reason: Literal["step", "session"]) -> None:
        if self.on_quiescent is not None and self._lease is None:
            self.on_quiescent(reason)

    def check_access(self, session_id: str, token: str | None) -> None:
        """The authorisation check without the lock, for an event loop that must not wait
        for B; every call checks again under the lock."""
        self._lookup(session_id, token)

    def authorize(self, session_id: str, token: str | None) -> Session:
        with self._cond:
            return self._authorize(session_id, token)

    def _authorize(self, session_id: str, token: str | None) -> Session:
        s = self.table.lookup(session_id, token)
        s.last_seen = time.monotonic()
        return s

    def _lookup(self, session_id: str, token: str | None) -> Session:
        return self.table.lookup(session_id, token)

    # -- the lease on B ----------------------------------------------------------------

    def _release(self, session_id: str) -> None:
        if self._lease and self._lease.session_id == session_id:
            self._lease = None
            self._handovers += 1
            self.trainer.discard()
            self._notify()

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
        self._notify()  # whoever is first in line may go

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
                    self._notify()  # the next in line may go now

    def try_turn(
        self, session_id: str, token: str | None, attempt: Callable[[Session], T | None]
    ) -> T | None:
        """One non-blocking try of ``attempt`` (see :meth:`_with_turn`): its result, or
        None when it is not this session's turn yet -- the session is then queued and the
        caller waits elsewhere (the event loop) for :attr:`on_handover` and tries again.
        The queue entry is removed on success or error, or by :meth:`leave_queue`."""
        with self._cond:
            try:
                s = self._authorize(session_id, token)
                self._revoke_expired(s.id, time.monotonic())
                result = attempt(s)
            except BaseException:
                self._leave(session_id)
                raise
            if result is not None:
                self._leave(session_id)
                return result
            if s.id not in self._queue:
                self._queue.append(s.id)
            return None

    def leave_queue(self, session_id: str) -> None:
        """A waiting request gave up (client gone, timed out)."""
        with self._cond:
            self._leave(session_id)

    def _leave(self, session_id: str) -> None:
        if session_id in self._queue:
            self._queue.remove(session_id)
            self._notify()

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
        frames = decode(body, s.codec, self._max_elements(expected))
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
        if self.max_batch is not None and ordered[0].array.shape[0] > self.max_batch:
            raise BatchTooLarge(
                f"batch of {ordered[0].array.shape[0]} samples; this server takes at most "
                f"{self.max_batch} (--max-batch)"
            )
        for f in ordered:
            if f.array.dtype.kind == "f" and f.array.size:
                # one pass: NaN propagates through max, Inf is larger than any bound
                top = float(np.abs(f.array).max())
                if not np.isfinite(top):
                    raise NonFinite(f"{f.name}: contains NaN or Inf")
                if top > self.max_abs_value:
                    raise ValueOutOfRange(
                        f"{f.name}: |value| up to {top:.3g}; this server takes at most "
                        f"{self.max_abs_value:.3g} (--max-abs-value)"
                    )
        return step, ordered

    def _max_elements(self, expected: list[tuple[FrameKind, TensorSpec]]) -> int | None:
        """Most elements a compressed frame of this message may decode to: the batch limit
        times the largest expected sample (None: no batch limit)."""
        if self.max_batch is None:
            return None
        per_sample = max(math.prod(spec.sample_shape) for _, spec in expected)
        return self.max_batch * max(per_sample, 1)

    # -- the store: retries are answered from it ----------------------------------------

    def _replay(self, s: Session, op: Op, step: int, digest: str) -> Reply | None:
        stored = s.store.get(op)
        if stored is None or stored.step != step:
            return None
        if stored.request_sha256 != digest:
            raise self._conflict(
                s, f"{op} step {step} was already done with a different request body"
            )
        return Reply(stored.body, 0.0, replayed=True, durable_step=s.durable_step)

    def _conflict(self, s: Session, detail: str) -> StepConflict:
        """409 step_conflict telling the device where the session stands."""
        st = s.status(self.manifest.split_mode)
        return StepConflict(
            detail,
            next_step=st["next_step"],
            expect=st["expect"],
            durable_step=st["durable_step"],
        )

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down after its final checkpoint; retry after it restarts"
            )

    # -- protocol calls ----------------------------------------------------------------

    def _need(self, mode: str, op: str) -> None:
        if self.manifest.split_mode != mode:
            raise WrongSplitMode(
                f"/{op} belongs to the {mode} split; this server runs a {self.manifest.split_mode} split"
            )

    def forward(self, session_id: str, token: str | None, body: bytes | bytearray) -> Reply:
        """Double split, first round trip: ACTIVATION cuts[0] -> ACTIVATION cuts[1]."""
        return self._with_turn(session_id, token, self.prepare_forward(session_id, token, body))

    def prepare(
        self, op: str, session_id: str, token: str | None, body: bytes | bytearray
    ) -> Callable[[Session], Reply | None]:
        """The message of a ``forward`` or ``step`` parsed and checked (no lock, no B), as
        the attempt :meth:`try_turn` runs once it is the session's turn."""
        if op == "forward":
            return self.prepare_forward(session_id, token, body)
        if op == "step":
            return self.prepare_step(session_id, token, body)
        raise ValueError(f"{op} does not wait for a turn on B")

    def prepare_forward(
        self, session_id: str, token: str | None, body: bytes | bytearray
    ) -> Callable[[Session], Reply | None]:
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
                raise self._conflict(s, _expected(s, "forward", step))
            self._refuse_if_draining()
            if not self._free_for(s):
                return None
            t0 = time.perf_counter()
            out = self.trainer.forward(frame.array)
            ms = (time.perf_counter() - t0) * 1e3
            spec = self.manifest.server_output
            reply = encode(
                [
                    Frame(
                        FrameKind.ACTIVATION,
                        spec.name,
                        out,
                        spec.layout,
                        s.sid_bytes,
                        step,
                        s.codec,
                    )
                ]
            )
            self._grant(s)
            s.expect, s.stale_step = "backward", None
            s.store["forward"] = Stored(step, digest, reply)
            return Reply(reply, ms, durable_step=s.durable_step)

        return attempt

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
                raise self._conflict(s, _expected(s, "backward", step))
            lease = self._lease
            if lease is None or lease.session_id != s.id:  # pragma: no cover - invariant
                raise StaleForward("this session does not hold B; send the forward again")
            pending = self.trainer.pending_batch
            if pending is not None and frame.array.shape[0] != pending:
                raise FrameSpecMismatch(
                    f"{frame.name}: batch {frame.array.shape[0]}, the forward had {pending}"
                )
            t0 = time.perf_counter()
            try:
                g_a = self.trainer.backward(frame.array, target=s.aux_label)
            except UnstableStep:
                # B is back where it was before this step's forward: the step never
                # happened. The device may send the forward of this step again.
                s.expect = "forward"
                s.store.pop("forward", None)
                self._lease = None
                self._handovers += 1
                self._notify()
                raise
            ms = (time.perf_counter() - t0) * 1e3
            spec = self.manifest.server_input
            reply = encode([Frame(kind, spec.name, g_a, spec.layout, s.sid_bytes, step, s.codec)])
            s.store["backward"] = Stored(step, digest, reply)
            s.next_step, s.expect = step + 1, "forward"
            self._lease = None
            self._handovers += 1
            self._notify()
            self._quiescent_point("step")
            return Reply(reply, ms, durable_step=s.durable_step)

    def step(self, session_id: str, token: str | None, body: bytes | bytearray) -> Reply:
        """Single split, one round trip: ACTIVATION cuts[0] + LABELS -> GRADIENT (TARGET) cuts[0] + loss."""
        return self._with_turn(session_id, token, self.prepare_step(session_id, token, body))

    def prepare_step(
        self, session_id: str, token: str | None, body: bytes | bytearray
    ) -> Callable[[Session], Reply | None]:
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
                raise self._conflict(s, _expected(s, "step", step))
            self._refuse_if_draining()
            if not self._free_for(s):
                return None
            t0 = time.perf_counter()
            g_a, loss = self.trainer.step_single(frame.array, labels.array, target=s.aux_label)
            ms = (time.perf_counter() - t0) * 1e3
            spec = self.manifest.server_input
            kind = FrameKind.TARGET if s.aux_label else FrameKind.GRADIENT
            reply = encode(
                [
                    Frame(kind, spec.name, g_a, spec.layout, s.sid_bytes, step, s.codec),
                    scalar("loss", loss, s.sid_bytes, step),
                ]
            )
            s.store["step"] = Stored(step, digest, reply)
            s.next_step = step + 1
            self._quiescent_point("step")
            return Reply(reply, ms, durable_step=s.durable_step)

        return attempt

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
            durable = s.durable_step
        spec = self.manifest.server_output
        frame = Frame(FrameKind.ACTIVATION, spec.name, out, spec.layout, s.sid_bytes, step, s.codec)
        return Reply(
            encode([frame]),
            ms,
            durable_step=durable,
        )


def _expected(s: Session, op: str, step: int) -> str:
    if s.expect == "backward":
        want = f"the backward of step {s.next_step} (or a retry of its forward)"
    elif op == "step":
        want = f"step {s.next_step}"
    else:
        want = f"the forward of step {s.next_step}"
    return f"{op} of step {step} is out of order: the session expects {want}"
