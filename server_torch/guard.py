"""What stands between the network and the service: request ids and one log line per
failure, a last-resort 500, enrolment keys, rate limits, the byte budget of bodies in
flight, and the asynchronous wait for B's lease.

Nothing here knows about tensors. ``app`` wires it together; every limit has a flag in
``spliteasy serve`` (README, "Exposing a server").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from .errors import Busy, KeyRequired, RateLimited

log = logging.getLogger("spliteasy.server")
access = logging.getLogger("spliteasy.access")
T = TypeVar("T")

AUTH_KEYS_ENV = "SPLITEASY_AUTH_KEYS"  # enrolment keys, comma-separated (or --auth-keys FILE)

_GENERIC_500 = b'{"error":"internal_error","detail":"internal server error","request_id":"%s"}'


class JsonLines(logging.Formatter):
    """One JSON object a line (``spliteasy serve --log-format json``): time, level, logger,
    message, and the request's fields (request_id, route, status, error, ...) when given."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RequestGuard:
    """ASGI wrapper around the whole app (outside Starlette's own error middleware).

    - gives each request an id (``X-Request-Id`` on the reply, ``scope["spliteasy.request_id"]``
      for the handlers' log lines);
    - logs each failed request as one structured line (``spliteasy.access``);
    - turns anything that still escapes into a generic 500 JSON with ``Connection: close``
      (when no reply has started), and never re-raises: uvicorn would log it a second
      time, with a traceback, and drop a keep-alive connection without telling the client;
    - hands (method, route, status, seconds, error code) to ``observe`` (the metrics).
    """

    def __init__(
        self,
        app: Any,
        observe: Callable[[str, str, int, float, str | None], None] | None = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.observe = observe
        self.on_request = on_request

    def __getattr__(self, name: str) -> Any:  # app.state, app.routes, ... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        scope["spliteasy.request_id"] = rid
        if self.on_request is not None:
            self.on_request()
        t0 = time.perf_counter()
        status = {"code": 0}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the last resort: nothing reaches uvicorn
            if status["code"] == 0:
                if scope.get("spliteasy.error_code") is None:  # not yet logged by a handler
                    log.error("request %s: unhandled %s", rid, type(exc).__name__, exc_info=exc)
                scope["spliteasy.error_code"] = "internal_error"
                await _send_500(send_with_id, rid)
            elif scope.get("spliteasy.error_code") != "internal_error":
                log.error("request %s: failed mid-reply: %s", rid, type(exc).__name__)
        finally:
            seconds = time.perf_counter() - t0
            code = status["code"]
            route = _route_of(scope)
            err = scope.get("spliteasy.error_code")
            if code >= 400 or code == 0 or access.isEnabledFor(logging.DEBUG):
                fields = {
                    "request_id": rid, "method": scope.get("method"), "route": route,
                    "status": code or None, "error": err, "ms": round(seconds * 1e3, 1),
                    "client": _client_of(scope),
                }  # fmt: skip
                access.log(
                    logging.INFO if code >= 400 or code == 0 else logging.DEBUG,
                    " ".join(f"{k}={v if v is not None else '-'}" for k, v in fields.items()),
                    extra={"fields": fields},
                )
            if self.observe is not None:
                with contextlib.suppress(Exception):
                    self.observe(scope.get("method", ""), route, code, seconds, err)


async def _send_500(send: Callable, rid: str) -> None:
    body = _GENERIC_500 % rid.encode()
    with contextlib.suppress(Exception):
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _route_of(scope: dict) -> str:
    """The route template (``/v1/sessions/{sid}/forward``), never the raw path: metrics
    labels and logs must not grow with what clients send."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    return "unmatched"


def _client_of(scope: dict) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


# -- enrolment keys and rate limits ------------------------------------------------------


def load_auth_keys(path: Path | str | None, env: str | None = None) -> dict[str, str] | None:
    """Enrolment keys by sha256 -> name: from ``--auth-keys FILE`` (one key a line, or
    ``name key``; ``#`` comments) and/or ``$SPLITEASY_AUTH_KEYS`` (comma-separated).
    None when neither is given (session creation is open)."""
    keys: dict[str, str] = {}
    raw = os.environ.get(AUTH_KEYS_ENV) if env is None else env
    if path is not None:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, key = line.rpartition(" ")
            _add_key(keys, key.strip(), name.strip() or f"line{n}")
        if not keys:
            raise ValueError(f"{path}: no enrolment keys in the file")
    if raw:
        for i, key in enumerate(k.strip() for k in raw.split(",")):
            if key:
                _add_key(keys, key, f"env{i + 1}")
    return keys or None


def _add_key(keys: dict[str, str], key: str, name: str) -> None:
    if len(key) < 16:
        raise ValueError(f"enrolment key {name!r} is shorter than 16 characters")
    keys[hashlib.sha256(key.encode()).hexdigest()] = name


class Admission:
    """Who may create sessions (enrolment keys) and how often (per key, per address)."""

    def __init__(self, keys: dict[str, str] | None, per_minute: float = 30.0) -> None:
        self.keys = keys
        self.per_key = RateLimiter(per_minute)
        self.per_ip = RateLimiter(per_minute)

    def admit(self, bearer: str | None, client_ip: str) -> str:
        """The key's name ("open" without keys); raises 401 / 429."""
        name = "open"
        if self.keys is not None:
            digest = hashlib.sha256((bearer or "").encode()).hexdigest()
            found = None
            for known, key_name in self.keys.items():
                if secrets.compare_digest(known, digest):
                    found = key_name
            if found is None:
                raise KeyRequired(
                    "creating a session needs an enrolment key: "
                    "'Authorization: Bearer <key>' (spliteasy train --auth-key)"
                    if not bearer
                    else "this enrolment key is not known to the server"
                )
            name = found
            wait = self.per_key.take(name)
            if wait:
                raise RateLimited(
                    f"too many sessions created with key {name!r}; retry later", retry_after=wait
                )
        wait = self.per_ip.take(client_ip)
        if wait:
            raise RateLimited(f"too many sessions created from {client_ip}", retry_after=wait)
        return name


class RateLimiter:
    """Token buckets by name: ``per_minute`` events a minute, bursts of as many."""

    def __init__(self, per_minute: float, max_names: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute)
        self.max_names = max_names
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, name: str) -> float:
        """0 when allowed (one token taken), else the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, since = self._buckets.get(name, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - since) * self.rate)
            if tokens < 1.0:
                self._buckets[name] = (tokens, now)
                return (1.0 - tokens) / self.rate
            if len(self._buckets) >= self.max_names and name not in self._buckets:
                self._buckets = {  # forget the full buckets: they are as good as new
                    k: v for k, v in self._buckets.items() if v[0] < self.capacity
                }
            self._buckets[name] = (tokens - 1.0, now)
            return 0.0


# -- bodies in flight ----------------------------------------------------------------------


class ByteBudget:
    """Bytes of request bodies held in memory at once, across all connections: a stalled
    or slow client holds its part of it, and past the total new bodies get 503 busy."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def reserve(self, n: int) -> None:
        if self.used + n > self.total:
            raise Busy(
                "the server holds as many request bodies as it buffers; retry shortly",
                retry_after=1,
            )
        self.used += n

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


# -- waiting for B without a thread ----------------------------------------------------------


@dataclass
class TurnWaiter:
    """Requests that wait for B's lease wait here, on the event loop, not in a thread.

    The service's decision runs in a worker thread for a moment (``try_turn``); "not yet"
    parks the request on an asyncio event that the service's handovers set. At most
    ``max_waiting`` requests wait (2 per session); past it, 503 busy with Retry-After.
    """

    service: Any
    max_waiting: int = 64
    per_session: int = 2
    waiting: int = 0
    _by_session: dict[str, int] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _event: asyncio.Event | None = None
    on_wait: Callable[[float], None] | None = None  # seconds a request waited (metrics)

    def attach(self) -> None:
        """Called on the event loop: the service's handovers wake the waiters from now on."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()
            self.service.on_handover = self._handover

    def _handover(self) -> None:  # any thread, under the service's lock
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        if ev is not None:
            ev.set()

    async def run(self, sid: str, token: str | None, attempt: Callable[..., T | None]) -> T:
        self.attach()
        service = self.service
        patience = service.lease_timeout + 5.0
        registered = False
        t0 = time.monotonic()
        try:
            seen, deadline = service.handovers, time.monotonic() + patience
            first = True
            while True:
                event = self._event
                assert event is not None
                # ask under the lock (a worker thread) only when B may be ours: a handover
                # wakes every waiter, and most of them would only find B taken again
                if first or service.may_go(sid) or service.draining:
                    first = False
                    result = await run_in_threadpool(service.try_turn, sid, token, attempt)
                    if result is not None:
                        return result
                if not registered:
                    if self.waiting >= self.max_waiting:
                        raise Busy(
                            f"{self.waiting} requests already wait for B; retry shortly",
                            retry_after=max(1.0, service.lease_left() or 1.0),
                        )
                    if self._by_session.get(sid, 0) >= self.per_session:
                        raise Busy("this session already waits for B", retry_after=1)
                    registered = True
                    self.waiting += 1
                    self._by_session[sid] = self._by_session.get(sid, 0) + 1
                now = time.monotonic()
                if service.handovers != seen:
                    seen, deadline = service.handovers, now + patience
                if now >= deadline:
                    raise Busy(
                        "B has been held by other devices for too long; try again", retry_after=5
                    )
                timeout = deadline - now
                left = service.lease_left()
                if left is not None:
                    timeout = min(timeout, left + 0.01)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=max(timeout, 0.01))
        except BaseException:
            # cancelled (client gone) or refused: leave the queue without waiting for the
            # lock (it may be held by a step of B for a while)
            asyncio.get_running_loop().run_in_executor(None, service.leave_queue, sid)
            raise
        finally:
            if registered:
                self.waiting -= 1
                n = self._by_session.get(sid, 1) - 1
                if n:
                    self._by_session[sid] = n
                else:
                    self._by_session.pop(sid, None)
                if self.on_wait is not None:
                    self.on_wait(time.monotonic() - t0)


async def periodic(interval: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job`` every ``interval`` s for the life of the event loop; errors are logged."""
    while True:
        await asyncio.sleep(interval)
        try:
            await job()
        except Exception as exc:  # noqa: BLE001 - a housekeeping job must not stop
            log.error("housekeeping failed: %s", exc, exc_info=exc)
