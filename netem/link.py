"""How bytes cross the proxy: a perfect link, or a shaped one (issue #10).

Every chunk the proxy passes on goes through ``Link.send``. :class:`Link` writes at
once. :class:`ShapedLink` delays each message as a link with a profile's bandwidth each
way, latency, jitter and loss would (``netem.profiles``); the fault logic never needs to
know.

The shaping model, per direction (one ``ShapedLink`` is one device's link, shared by
all its connections, as a radio is):

- **Serialisation.** The direction's wire is busy until ``free_at``. A message of n
  bytes handed over at time t starts at ``max(t, free_at)`` and its k-th byte has left
  the sender ``k / bandwidth`` later; lost segments (drawn per ``SEGMENT_BYTES``) are
  sent again, taking their bytes' time once more.
- **Propagation.** Each byte arrives ``latency`` (+ this message's jitter, uniform in
  [0, jitter], + one retransmission timeout per lost segment before it) after it left,
  and never before the bytes sent earlier on that direction (TCP delivers in order).
- The proxy writes each chunk (``CHUNK`` bytes) at its arrival time, so the receiver
  sees the bytes trickle in at the link's rate, not in one lump at the end.

All waits are measured on the event loop's monotonic clock and only ever sleep *until*
a computed time, so the link is never faster than its profile (a busy machine can only
make it slower). Connection setup is not shaped: HTTP keep-alive and a WebSocket keep
one connection for a whole run.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from enum import StrEnum

from .profiles import RTO_MIN_MS, SEGMENT_BYTES, LinkProfile

CHUNK = 16 * 1024


class Direction(StrEnum):
    UP = "up"  # client -> server
    DOWN = "down"  # server -> client


class Link:
    """A perfect link: bytes go through as fast as the sockets take them."""

    async def send(self, writer: asyncio.StreamWriter, data: bytes, direction: Direction) -> None:
        writer.write(data)
        await writer.drain()


@dataclass
class LinkStats:
    """What a shaped link carried, per direction (for reports and tests)."""

    messages: int = 0
    bytes: int = 0
    lost_segments: int = 0
    shaped_ms: float = 0.0  # sum over messages of (last byte delivered - handed over)


@dataclass
class _Wire:
    free_at: float = 0.0  # when the sender's side of this direction is idle again
    last_arrival: float = 0.0  # in-order delivery
    stats: LinkStats = field(default_factory=LinkStats)


class ShapedLink(Link):
    """A link with a :class:`~netem.profiles.LinkProfile`'s bandwidth, latency, jitter, loss.

    ``seed`` makes jitter and loss draws repeatable for the same message sequence.
    """

    def __init__(self, profile: LinkProfile, seed: int = 0) -> None:
        self.profile = profile
        self._rng = random.Random(seed)
        self._wires = {Direction.UP: _Wire(), Direction.DOWN: _Wire()}

    def stats(self) -> dict[str, LinkStats]:
        return {d.value: w.stats for d, w in self._wires.items()}

    def _schedule(self, now: float, n: int, direction: Direction) -> list[tuple[int, float]]:
        """(end offset, arrival time) of each chunk of an n-byte message handed over now."""
        p, wire = self.profile, self._wires[direction]
        rate = p.bytes_per_s(direction.value)
        latency = p.latency_ms / 1e3 + (
            self._rng.uniform(0, p.jitter_ms) / 1e3 if p.jitter_ms else 0
        )
        start = max(now, wire.free_at)
        sent_bytes = 0.0  # bytes on the wire so far, retransmissions included
        delay = latency  # propagation + the timeouts of segments lost so far
        rto = (RTO_MIN_MS + p.rtt_ms) / 1e3
        plan: list[tuple[int, float]] = []
        offset = 0
        while offset < n:
            end = min(offset + CHUNK, n)
            size = end - offset
            if p.loss:
                segments = -(-size // SEGMENT_BYTES)
                lost = sum(self._rng.random() < p.loss for _ in range(segments))
                if lost:
                    wire.stats.lost_segments += lost
                    delay += lost * rto
                    sent_bytes += lost * SEGMENT_BYTES
            sent_bytes += size
            left = start + (sent_bytes / rate if rate else 0.0)
            arrival = max(left + delay, wire.last_arrival)
            wire.last_arrival = arrival
            plan.append((end, arrival))
            offset = end
        wire.free_at = start + (sent_bytes / rate if rate else 0.0)
        return plan

    async def send(self, writer: asyncio.StreamWriter, data: bytes, direction: Direction) -> None:
        if not self.profile.shaped or not data:
            await super().send(writer, data, direction)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        plan = self._schedule(now, len(data), direction)
        view = memoryview(data)
        offset = 0
        for end, arrival in plan:
            wait = arrival - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            while loop.time() < arrival:  # asyncio may wake a hair early: never be faster
                await asyncio.sleep(arrival - loop.time())
            writer.write(view[offset:end])
            await writer.drain()
            offset = end
        stats = self._wires[direction].stats
        stats.messages += 1
        stats.bytes += len(data)
        stats.shaped_ms += (loop.time() - now) * 1e3
