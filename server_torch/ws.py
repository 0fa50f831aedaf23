"""The WebSocket binding of the protocol: ``/v1/sessions/{sid}/ws`` (docs/protocol.md).

One connection carries a whole run: the same binary frames as the HTTP binding, each
message wrapped in a small envelope naming the operation and a request id. Every message
goes through the very same :class:`~server_torch.sessions.SplitService` calls as HTTP
(``prepare`` + the turn waiter for ``forward``/``step``, ``backward``/``infer`` in a
worker thread), so the retry store and step logic (exactly-once) are shared: a device
whose socket dropped mid-step reconnects and resends the same message, and a step the
server already applied is answered from the store.

Envelope (all integers big-endian)::

    request  (binary)  op:u8  id:u32  frames...
    reply    (binary)  0x80|op:u8  id:u32  meta_len:u16  meta JSON  frames...
    error    (text)    {"id": id, "status": 409, "error": "step_conflict", "detail": ...,
                        ...the HTTP error body's extra fields, "retry_after": s}

``op``: 1 forward, 2 backward, 3 step, 4 infer. ``meta``: ``{"server_ms", "handler_ms",
"replayed", "durable_step"}`` (the HTTP reply headers). The bearer token comes with the
handshake: ``Authorization: Bearer <token>``, or, for a browser (whose WebSocket cannot
set headers), the subprotocols ``["spliteasy.v1", "bearer.<token>"]``. A handshake with
no token, a wrong one or an unknown session is refused before any message is read (HTTP
401/403/404 with the usual JSON body where the server supports denial responses, else a
close with code 1008). Messages over the server's body limit are refused (413
``body_too_large``) and the byte budget is shared with HTTP bodies. Keepalive pings are
uvicorn's (``ws_ping_interval``) and the client's.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .errors import BodyTooLarge, ServerError, error_payload

OPS = {1: "forward", 2: "backward", 3: "step", 4: "infer"}
OP_CODES = {name: code for code, name in OPS.items()}
SUBPROTOCOL = "spliteasy.v1"
BEARER_PREFIX = "bearer."
HEAD = struct.Struct(">BI")  # op, request id
REPLY_HEAD = struct.Struct(">BIH")  # 0x80|op, request id, meta length
CLOSE_POLICY = 1008
log = logging.getLogger("spliteasy.server")


def _token(websocket: WebSocket) -> str | None:
    auth = websocket.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for proto in websocket.scope.get("subprotocols", []):
        if proto.startswith(BEARER_PREFIX) and len(proto) > len(BEARER_PREFIX):
            return proto[len(BEARER_PREFIX) :]
    return None


def encode_reply(op_code: int, rid: int, meta: dict, body: bytes) -> bytes:
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return REPLY_HEAD.pack(0x80 | op_code, rid, len(raw)) + raw + body


def add_ws_route(app: FastAPI, *, limit: int, meter: Any = None) -> None:
    """Register ``/v1/sessions/{sid}/ws`` on ``app`` (made by ``create_app``).

    ``app.state.ws_fault`` (tests only): a callable ``(op, request id) -> bool``; when it
    answers True the server closes the socket after B applied the message and before the
    reply is sent (a connection dropped mid-step).
    """
    service = app.state.service
    waiter = app.state.waiter
    budget = app.state.budget
    app.state.ws_fault = None

    async def refuse(websocket: WebSocket, exc: BaseException) -> None:
        status, body, headers = error_payload(exc)
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(
                JSONResponse(body, status_code=status, headers=headers)
            )
        else:
            await websocket.close(code=CLOSE_POLICY, reason=str(body.get("error", ""))[:120])

    async def handle(sid: str, token: str, op: str, body: bytes) -> tuple[Any, float]:
        t0 = time.perf_counter()
        rounds = app.state.rounds
        if rounds is not None and op in ("forward", "backward"):
            reply = await getattr(rounds, op)(sid, token, bytes(body))
        elif op in ("forward", "step"):
            attempt = await run_in_threadpool(service.prepare, op, sid, token, body)
            reply = await waiter.run(sid, token, attempt)
        else:
            reply = await run_in_threadpool(getattr(service, op), sid, token, body)
        if (
            meter is not None
            and not reply.replayed
            and not (rounds is not None and op in ("forward", "backward"))
        ):
            meter.b_seconds.labels(op).observe(reply.server_ms / 1e3)
        return reply, t0

    @app.websocket("/v1/sessions/{sid}/ws")
    async def session_ws(websocket: WebSocket, sid: str) -> None:
        waiter.attach()
        token = _token(websocket)
        try:
            service.check_access(sid, token)  # on the handshake, before any message
        except ServerError as exc:
            await refuse(websocket, exc)
            return
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        fault: Callable[[str, int], bool] | None
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                rid = 0
                held = 0
                started = time.perf_counter()
                route = f"/v1/sessions/{{sid}}/ws:{OPS.get(data[0], '?') if data else '?'}"
                try:
                    if data is None or len(data) < HEAD.size:
                        raise _BadEnvelope("send binary messages: op:u8 id:u32 frames")
                    code, rid = HEAD.unpack_from(data)
                    op = OPS.get(code)
                    if op is None:
                        raise _BadEnvelope(f"unknown op code {code}")
                    if len(data) - HEAD.size > limit:
                        raise BodyTooLarge(
                            f"{len(data) - HEAD.size} bytes; this server takes at most "
                            f"{limit} per message"
                        )
                    budget.reserve(len(data))
                    held = len(data)
                    reply, t0 = await handle(sid, token or "", op, data[HEAD.size :])
                except ServerError as exc:
                    _observe(meter, route, exc.status, started, exc.code)
                    await _send_error(websocket, rid, exc)
                    continue
                except WebSocketDisconnect:
                    raise
                except Exception as exc:  # noqa: BLE001 - a frame error, or a server bug
                    status, _, _ = error_payload(exc)
                    if status >= 500:
                        log.error("websocket %s: internal error", sid, exc_info=exc)
                    _observe(meter, route, status, started, None)
                    await _send_error(websocket, rid, exc)
                    continue
                finally:
                    if held:
                        budget.release(held)
                fault = app.state.ws_fault
                if fault is not None and fault(op, rid):
                    await websocket.close(code=1011, reason="test fault: dropped mid-step")
                    return
                meta = {
                    "server_ms": round(reply.server_ms, 3),
                    "handler_ms": round((time.perf_counter() - t0) * 1e3, 3),
                    "replayed": bool(reply.replayed),
                    "durable_step": int(reply.durable_step),
                }
                await websocket.send_bytes(encode_reply(code, rid, meta, bytes(reply.body)))
                _observe(meter, route, 200, started, None)
        except WebSocketDisconnect:
            return


def _observe(meter: Any, route: str, status: int, started: float, code: str | None) -> None:
    """The request metrics of one message (``spliteasy_requests_total`` with method WS,
    ``spliteasy_request_seconds``), as the HTTP guard records a request."""
    if meter is not None:
        meter.observe("WS", route, status, time.perf_counter() - started, code)


class _BadEnvelope(ServerError):
    status, code = 400, "bad_request"


async def _send_error(websocket: WebSocket, rid: int, exc: BaseException) -> None:
    status, body, headers = error_payload(exc)
    payload: dict[str, Any] = {"id": rid, "status": status, **body}
    if "Retry-After" in headers:
        payload["retry_after"] = float(headers["Retry-After"])
    await websocket.send_text(json.dumps(payload))
