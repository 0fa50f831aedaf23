"""Synchronous parallel split learning (``spliteasy serve --mode parallel``, issue #11).

In ``turns`` mode devices take turns on B. In ``parallel`` mode each *round* gathers one
``forward`` from each of ``devices_per_round`` devices (double split), runs B once on the
concatenated batch, hands each device its slice of B's output, gathers their gradients,
runs one backward and one optimizer step for B, and hands each device its slice of
dL/da. Device i's gradient g_i = dL_i/dc_i is the mean over its own b_i samples, so the
server weights it by b_i / B (B = the round's samples) before the backward -- exactly the
gradient of the mean loss over the concatenated batch -- and returns dL_i/da_i (its
slice scaled back by B / b_i), which device i's A needs for its own mean loss.

Devices average A and C through ``POST /v1/sessions/{sid}/sync`` every ``--sync-every``
rounds: each uploads its slices' variables (safetensors, metadata ``batch``), the server
waits for the round's devices and answers every one with the batch-weighted average.
With SGD (momentum or not: the update is linear, so averaging the weights each round is
averaging the updates), no BatchNorm in A or C and ``--sync-every 1``, N devices with
batch b train exactly as unsplit training with batch N*b on the concatenated data.

Stragglers: a round closes ``round_timeout`` s after its first forward with the devices
that arrived (a late forward joins the next round); a backward round waits as long for
the gradients of its members and treats a missing one as zero (that device's forward
reply is then 409 ``stale_forward`` on its backward: it redoes the step). A sync waits
as long, then averages what arrived.

Exactly-once: each session's last forward, backward and sync replies are kept with the
hash of their request, so a resent message (a dropped connection, a reconnected
WebSocket) is answered from that store and never counted twice. Everything here runs on
the server's event loop; B runs in a worker thread, one round at a time. B's trainer may
be a :class:`~server_torch.distributed.GatewayTrainer`, which shares each round's
forward and backward among W worker processes: nothing here changes for it.

Checkpoints (``--state-dir``): after every ``checkpointer.every``-th round, while this
coordinator still holds B (between a backward and the next forward: B quiescent), and
once more by :meth:`ParallelRounds.final` on shutdown, which first refuses new rounds
(503 ``shutting_down``) and waits for the one in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from shared_schema import Frame, FrameKind, encode

from .errors import BadRequest, ShuttingDown, StaleForward, StepConflict, WrongSplitMode
from .sessions import Reply, SplitService

log = logging.getLogger("spliteasy.server")


@dataclass
class _Gather:
    members: dict[str, Any] = field(default_factory=dict)  # sid -> payload, arrival order
    steps: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    sessions: dict[str, Any] = field(default_factory=dict)  # sid -> Session
    batch: dict[str, int] = field(default_factory=dict)
    expected: list[str] = field(default_factory=list)  # a backward round: the forward's members
    done: asyncio.Event = field(default_factory=asyncio.Event)
    results: dict[str, bytes] = field(default_factory=dict)
    error: BaseException | None = None
    closed: bool = False
    timer: asyncio.TimerHandle | None = None
    server_ms: float = 0.0


class ParallelRounds:
    """The round coordinator of ``--mode parallel`` for one :class:`SplitService`."""

    def __init__(
        self, service: SplitService, devices_per_round: int, sync_every: int, round_timeout: float
    ) -> None:
        if devices_per_round < 1 or sync_every < 0 or round_timeout <= 0:
            raise ValueError("devices_per_round >= 1, sync_every >= 0, round_timeout > 0")
        if service.manifest.split_mode != "double":
            raise WrongSplitMode("parallel mode trains a double split (forward + backward)")
        self.service = service
        self.n = devices_per_round
        self.sync_every = sync_every
        self.round_timeout = round_timeout
        self.rounds = 0  # optimizer steps of B (rounds completed)
        self.round_sizes: list[int] = []  # devices in each completed round
        self._open: _Gather | None = None  # the forward round gathering now
        self._in_round: dict[str, _Gather] = {}  # sid -> its forward round, until replied
        self._bwd_of: dict[str, _Gather] = {}  # sid -> the backward round it owes
        self._syncs: dict[int, _Gather] = {}
        self._sync_count: dict[str, int] = {}
        self._store: dict[tuple[str, str], tuple[int, str, bytes]] = {}
        self._b = asyncio.Lock()  # held from a round's forward to its backward
        # (op, seconds) once per round's B call: the metrics' B time (a member's reply
        # reports the round's time too, so counting replies would count it N times)
        self.on_compute: Any = None
        self.checkpointer: Any = None  # server_torch.checkpoint.Checkpointer, or None
        self.draining = False  # shutting down: no new round may start
        self._inflight = 0  # rounds between their first forward and their backward's end
        self._loop: asyncio.AbstractEventLoop | None = None

    def info(self) -> dict:
        return {
            "mode": "parallel",
            "devices_per_round": self.n,
            "sync_every": self.sync_every,
            "round_timeout": self.round_timeout,
            "rounds": self.rounds,
        }

    # -- helpers -------------------------------------------------------------------------

    def _replay(self, sid: str, op: str, step: int, digest: str) -> bytes | None:
        held = self._store.get((sid, op))
        if held is None or held[0] != step:
            return None
        if held[1] != digest:
            raise StepConflict(f"a retry of {op} step {step} with a different body")
        return held[2]

    def _arm(self, g: _Gather, close: Any) -> None:
        loop = asyncio.get_running_loop()
        g.timer = loop.call_later(self.round_timeout, lambda: loop.create_task(close(g)))

    async def _wait(self, g: _Gather, sid: str) -> bytes:
        await asyncio.shield(g.done.wait())
        if g.error is not None:
            raise g.error
        if sid not in g.results:
            raise StaleForward(
                "the round closed without this device's gradient; send this step's forward again"
            )
        return g.results[sid]

    # -- forward -------------------------------------------------------------------------

    async def forward(self, sid: str, token: str | None, body: bytes) -> Reply:
        service = self.service
        s = service.authorize(sid, token)
        spec = service.manifest.server_input
        step, (frame,) = service._frames(body, s, [(FrameKind.ACTIVATION, spec)])
        digest = hashlib.sha256(body).hexdigest()
        g = self._in_round.get(sid)
        if g is None:
            held = self._replay(sid, "forward", step, digest)
            if held is not None:
                return Reply(held, 0.0, replayed=True)
            if step != s.next_step or s.expect != "forward":
                raise _conflict(s, "forward", step)
            if self.draining:
                raise ShuttingDown(
                    "the server is shutting down; send this forward after it restarts"
                )
            g = self._open
            if g is None or g.closed:
                g = self._open = _Gather()
                self._inflight += 1
                self._loop = asyncio.get_running_loop()
                self._arm(g, self._close_forward)
            g.members[sid] = frame.array
            g.steps[sid], g.digests[sid], g.sessions[sid] = step, digest, s
            self._in_round[sid] = g
            if len(g.members) >= self.n:
                asyncio.get_running_loop().create_task(self._close_forward(g))
        elif g.steps[sid] != step or g.digests[sid] != digest:
            raise StepConflict(f"forward of step {g.steps[sid]} is still gathering")
        reply = await self._wait(g, sid)
        return Reply(reply, g.server_ms)

    async def _close_forward(self, g: _Gather) -> None:
        if not _seal(g):
            return
        if self._open is g:
            self._open = None
        sids = list(g.members)
        await self._b.acquire()  # the previous round's backward first
        release = True
        try:
            x = np.concatenate([g.members[sid] for sid in sids])
            t0 = time.perf_counter()
            out = await run_in_threadpool(self.service.trainer.forward, x)
            g.server_ms = (time.perf_counter() - t0) * 1e3
            if self.on_compute is not None:
                self.on_compute("forward", g.server_ms / 1e3)
            spec = self.service.manifest.server_output
            bwd = _Gather(expected=sids)
            start = 0
            for sid in sids:
                b = g.members[sid].shape[0]
                step = g.steps[sid]
                reply = encode(
                    [
                        Frame(
                            FrameKind.ACTIVATION,
                            spec.name,
                            out[start : start + b],
                            spec.layout,
                            bytes.fromhex(sid),
                            step,
                            g.sessions[sid].codec,
                        )
                    ]
                )
                start += b
                g.results[sid] = reply
                self._store[(sid, "forward")] = (step, g.digests[sid], reply)
                bwd.steps[sid], bwd.sessions[sid], bwd.batch[sid] = step, g.sessions[sid], b
                self._bwd_of[sid] = bwd
                g.sessions[sid].expect = "backward"
            self._arm(bwd, self._close_backward)
            release = False  # the backward round releases B
        except BaseException as exc:  # noqa: BLE001 - every member hears of it
            g.error = exc
        finally:
            for sid in sids:
                self._in_round.pop(sid, None)
            if release:
                self._b.release()
                self._inflight -= 1
            g.done.set()

    # -- backward ------------------------------------------------------------------------

    async def backward(self, sid: str, token: str | None, body: bytes) -> Reply:
        service = self.service
        s = service.authorize(sid, token)
        spec = service.manifest.server_output
        step, (frame,) = service._frames(body, s, [(FrameKind.GRADIENT, spec)])
        digest = hashlib.sha256(body).hexdigest()
        g = self._bwd_of.get(sid)
        if g is None or g.steps.get(sid) != step:
            held = self._replay(sid, "backward", step, digest)
            if held is not None:
                return Reply(held, 0.0, replayed=True)
            raise _conflict(s, "backward", step)
        if sid in g.members:
            if g.digests[sid] != digest:
                raise StepConflict(f"a retry of backward step {step} with a different body")
        else:
            if frame.array.shape[0] != g.batch[sid]:
                raise BadRequest(
                    f"{spec.name}: batch {frame.array.shape[0]}, the forward had {g.batch[sid]}"
                )
            g.members[sid], g.digests[sid] = frame.array, digest
            if len(g.members) == len(g.expected):
                asyncio.get_running_loop().create_task(self._close_backward(g))
        reply = await self._wait(g, sid)
        return Reply(reply, g.server_ms)

    async def _close_backward(self, g: _Gather) -> None:
        if not _seal(g):
            return
        try:
            total = sum(g.batch.values())
            parts = []
            for sid in g.expected:
                got = g.members.get(sid)
                if got is None:  # a straggler: its samples add nothing to this step
                    shape = (g.batch[sid], *self.service.manifest.server_output.sample_shape)
                    got = np.zeros(shape, np.float32)
                parts.append(got.astype(np.float32) * np.float32(g.batch[sid] / total))
            t0 = time.perf_counter()
            g_a = await run_in_threadpool(self.service.trainer.backward, np.concatenate(parts))
            g.server_ms = (time.perf_counter() - t0) * 1e3
            if self.on_compute is not None:
                self.on_compute("backward", g.server_ms / 1e3)
            spec = self.service.manifest.server_input
            start = 0
            for sid in g.expected:
                b = g.batch[sid]
                s = g.sessions[sid]
                mine = g_a[start : start + b] * np.float32(total / b)
                start += b
                if sid not in g.members:
                    s.expect = "forward"  # redo this step in a later round
                    self._store.pop((sid, "forward"), None)
                    continue
                step = g.steps[sid]
                reply = encode(
                    [
                        Frame(
                            FrameKind.GRADIENT,
                            spec.name,
                            mine,
                            spec.layout,
                            s.sid_bytes,
                            step,
                            s.codec,
                        )
                    ]
                )
                g.results[sid] = reply
                self._store[(sid, "backward")] = (step, g.digests[sid], reply)
                s.next_step, s.expect = step + 1, "forward"
            self.rounds += 1
            self.round_sizes.append(len(g.members))
            ck = self.checkpointer
            if ck is not None and ck.every and self.rounds % ck.every == 0:
                await run_in_threadpool(self._checkpoint)  # B is still ours: quiescent
        except BaseException as exc:  # noqa: BLE001 - every member hears of it
            g.error = exc
            for sid in g.expected:
                g.sessions[sid].expect = "forward"
                self._store.pop((sid, "forward"), None)
        finally:
            for sid in g.expected:
                if self._bwd_of.get(sid) is g:
                    del self._bwd_of[sid]
            self._b.release()
            self._inflight -= 1
            g.done.set()

    # -- checkpoints and shutdown --------------------------------------------------------

    def _checkpoint(self) -> None:
        """Write a checkpoint of B now (the caller holds B between rounds)."""
        with self.service.lock:
            self.checkpointer._write_locked()

    def final(self, wait: float = 5.0) -> None:
        """The shutdown hook (any thread): refuse new rounds, give the round in flight up
        to ``wait`` s, write the last checkpoint when B is quiescent and healthy."""
        self.draining = True
        loop, g = self._loop, self._open
        if loop is not None and g is not None and not g.closed:
            # the gathering round goes ahead with whoever came (its members wait for it)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._close_forward(g)))
        deadline = time.monotonic() + wait
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        ck = self.checkpointer
        if ck is None:
            return
        try:
            workers = getattr(self.service.trainer, "workers", None)
            if workers is not None and workers.failed is not None:
                log.warning("B's workers failed: no final checkpoint (the newest stands)")
            elif self._inflight:
                log.warning(
                    "a round is still in flight after %g s; no final checkpoint (the newest "
                    "is step %s)", wait, ck.last.step if ck.last else "none",
                )  # fmt: skip
            else:
                self._checkpoint()
        finally:
            ck.close()

    # -- averaging A and C ---------------------------------------------------------------

    async def sync(self, sid: str, token: str | None, body: bytes) -> bytes:
        """Batch-weighted average of the round's devices' variables (safetensors in/out)."""
        self.service.authorize(sid, token)
        tensors, meta = _read_safetensors(body)
        try:
            k, batch = int(meta["sync"]), int(meta["batch"])
        except (KeyError, ValueError):
            raise BadRequest("sync metadata needs integers 'sync' and 'batch'") from None
        digest = hashlib.sha256(body).hexdigest()
        held = self._replay(sid, "sync", k, digest)
        if held is not None:
            return held
        if k != self._sync_count.get(sid, 0):
            raise StepConflict(f"expected sync {self._sync_count.get(sid, 0)}, got {k}")
        g = self._syncs.get(k)
        if g is None or g.closed:
            g = self._syncs[k] = _Gather()
            self._arm(g, self._close_sync)
        if sid not in g.members:
            g.members[sid], g.batch[sid], g.digests[sid] = tensors, batch, digest
            g.steps[sid] = k
            if len(g.members) >= self.n:
                asyncio.get_running_loop().create_task(self._close_sync(g))
        await asyncio.shield(g.done.wait())
        if g.error is not None:
            raise g.error
        return g.results[sid]

    async def _close_sync(self, g: _Gather) -> None:
        if not _seal(g):
            return
        try:
            from safetensors.numpy import save

            sids = list(g.members)
            names = set(g.members[sids[0]])
            if any(set(g.members[sid]) != names for sid in sids):
                raise BadRequest("the devices of a sync hold different variables")
            total = float(sum(g.batch[sid] for sid in sids))
            avg = {}
            for name in sorted(names):
                acc = np.zeros(g.members[sids[0]][name].shape, np.float64)
                for sid in sids:
                    acc += g.members[sid][name].astype(np.float64) * (g.batch[sid] / total)
                avg[name] = acc.astype(g.members[sids[0]][name].dtype)
            reply = save(avg, metadata={"devices": str(len(sids))})
            for sid in sids:
                g.results[sid] = reply
                self._store[(sid, "sync")] = (g.steps[sid], g.digests[sid], reply)
                self._sync_count[sid] = g.steps[sid] + 1
        except BaseException as exc:  # noqa: BLE001
            g.error = exc
        finally:
            for k in [k for k, v in self._syncs.items() if v is g]:
                del self._syncs[k]
            g.done.set()


def _conflict(s: Any, op: str, step: int) -> StepConflict:
    return StepConflict(
        f"expected {s.expect} of step {s.next_step}, got {op} of step {step}",
        next_step=s.next_step,
        expect=s.expect,
        durable_step=0,
    )


def _read_safetensors(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors.numpy import load

    try:
        (n,) = struct.unpack_from("<Q", body)
        meta = json.loads(bytes(body[8 : 8 + n])).get("__metadata__") or {}
        return load(bytes(body)), meta
    except Exception as exc:  # noqa: BLE001 - anything malformed is the client's
        raise BadRequest(f"the sync body is not a safetensors file: {exc}") from None


def _seal(g: _Gather) -> bool:
    """Close a gathering once (its timer and its last member may both try); False if it
    was already closed."""
    if g.closed:
        return False
    g.closed = True
    if g.timer is not None:
        g.timer.cancel()
    return True
