"""How bytes cross the proxy: the seam where link shaping goes (issue #10).

Every chunk the proxy passes on goes through ``Link.send``. The default link writes at
once. A shaped link (bandwidth, latency, jitter per direction) subclasses it and waits
before or while writing; the fault logic never needs to know.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum


class Direction(StrEnum):
    UP = "up"  # client -> server
    DOWN = "down"  # server -> client


class Link:
    """A perfect link: bytes go through as fast as the sockets take them."""

    async def send(self, writer: asyncio.StreamWriter, data: bytes, direction: Direction) -> None:
        writer.write(data)
        await writer.drain()
