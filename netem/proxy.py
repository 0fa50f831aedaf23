"""A loopback TCP proxy that breaks HTTP/1.1 exchanges on purpose, for tests.

::

    with FaultProxy(("127.0.0.1", server_port), schedule) as proxy:
        client talks to proxy.url; proxy.events says what was done to which request

Each client connection gets its own upstream connection. The proxy reads one whole
request (``netem.http11``), asks the schedule what to do with it, and then either
passes request and reply through unchanged or breaks the exchange at the chosen point
(``netem.faults.Fault``). Connections are closed with a TCP reset where a fault says
"reset", so the client sees exactly what a dying peer or a lossy radio link produces.

Every byte passes through ``link`` (``netem.link``): a perfect one by default, or a
``ShapedLink`` with a profile's bandwidth, latency, jitter and loss. A WebSocket upgrade
(101) is relayed as raw bytes both ways through the same link, so a shaped link shapes
either transport.

The asyncio loop runs in a daemon thread of the calling process; ``python -m netem``
runs the same proxy as a process. The upstream can be changed while running
(``set_upstream``), e.g. to follow a server restarted on another port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .faults import NO_FAULTS, Fault, FaultSchedule
from .http11 import IncompleteMessage, MalformedMessage, Message, read_message
from .link import Direction, Link


@dataclass(frozen=True)
class Event:
    """What the proxy did with one request."""

    index: int
    method: str
    target: str
    fault: Fault
    status: int | None  # the server's status, when the server answered
    time: float


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()


class FaultProxy:
    """Proxy ``host:port`` -> ``upstream`` applying ``schedule`` to every request."""

    def __init__(
        self,
        upstream: tuple[str, int],
        schedule: FaultSchedule = NO_FAULTS,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        link: Link | None = None,
    ) -> None:
        self.upstream = upstream
        self.schedule = schedule
        self.host, self.port = host, port
        self.link = link or Link()
        self.events: list[Event] = []
        self._count = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"netem proxy :{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("netem proxy did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                _close(w)
            if self._server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_upstream(self, upstream: tuple[str, int]) -> None:
        """Send new connections to ``upstream`` from now on (open ones keep theirs)."""
        self.upstream = upstream

    def drop_all(self) -> None:
        """Reset every open connection now (a network outage in one call)."""
        if self._loop is None:
            return

        def reset() -> None:
            for w in list(self._writers):
                _reset(w)

        self._loop.call_soon_threadsafe(reset)

    # -- statistics --------------------------------------------------------------------

    def counts(self) -> Counter:
        """How many requests got each fault."""
        with self._lock:
            return Counter(e.fault for e in self.events)

    # -- one client connection -----------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        up_w: asyncio.StreamWriter | None = None
        up_r: asyncio.StreamReader | None = None
        try:
            while True:
                try:
                    request = await read_message(client_r, response=False)
                except (IncompleteMessage, MalformedMessage):
                    return
                if request is None:
                    return
                with self._lock:
                    index = self._count
                    self._count += 1
                fault = self.schedule.decide(index, request)
                if fault is Fault.DROP_BEFORE_SERVER:
                    self._record(index, request, fault, None)
                    _reset(client_w)
                    return
                if up_w is None:
                    try:
                        up_r, up_w = await asyncio.open_connection(*self.upstream)
                    except OSError:  # server down: the client sees its connection go
                        self._record(index, request, Fault.NONE, None)
                        _reset(client_w)
                        return
                    self._writers.add(up_w)
                assert up_r is not None
                if fault is Fault.RESET_REQUEST_BODY:
                    cut = len(request.head) + len(request.body) // 2
                    await self.link.send(up_w, request.raw[:cut], Direction.UP)
                    self._record(index, request, fault, None)
                    _reset(up_w)
                    _reset(client_w)
                    return
                await self.link.send(up_w, request.raw, Direction.UP)
                try:
                    reply = await read_message(up_r, response=True, request_method=request.method)
                except (IncompleteMessage, MalformedMessage):
                    reply = None
                if reply is None:  # the server went away: so does the client's connection
                    self._record(index, request, Fault.NONE, None)
                    _reset(client_w)
                    return
                self._record(index, request, fault, reply.status)
                if fault is Fault.DROP_AFTER_APPLY:
                    _reset(client_w)
                    return
                if fault is Fault.RESET_RESPONSE_BODY:
                    cut = len(reply.head) + len(reply.body) // 2
                    await self.link.send(client_w, reply.raw[:cut], Direction.DOWN)
                    _reset(client_w)
                    return
                await self.link.send(client_w, reply.raw, Direction.DOWN)
                if reply.status == 101:  # an upgrade (WebSocket): relay raw bytes from now on
                    await self._tunnel(client_r, client_w, up_r, up_w)
                    return
                if not (request.keep_alive and reply.keep_alive):
                    return
        except (ConnectionError, OSError):
            return
        finally:
            for w in (client_w, up_w):
                if w is not None:
                    self._writers.discard(w)
                    if not w.transport.is_closing():
                        _close(w)

    async def _tunnel(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
    ) -> None:
        """Relay an upgraded connection's bytes both ways through the link (no faults:
        a WebSocket's messages have no HTTP framing to fault), until either side closes."""

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, d: Direction) -> None:
            try:
                while data := await src.read(64 * 1024):
                    await self.link.send(dst, data, d)
            except (ConnectionError, OSError):
                pass

        tasks = [
            asyncio.ensure_future(pump(client_r, up_w, Direction.UP)),
            asyncio.ensure_future(pump(up_r, client_w, Direction.DOWN)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()

    def _record(self, index: int, request: Message, fault: Fault, status: int | None) -> None:
        with self._lock:
            self.events.append(
                Event(index, request.method, request.target, fault, status, time.time())
            )
