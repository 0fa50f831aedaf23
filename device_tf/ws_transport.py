"""The WebSocket binding of the transport seam (``spliteasy train --transport ws``).

Session creation, resumption, health and deletion stay plain HTTP (a handful of calls a
run); every operation's frames travel over one WebSocket, ``/v1/sessions/{sid}/ws``,
opened once for the whole run (docs/protocol.md, "WebSocket binding"). Keepalive pings
come from the ``websockets`` client (and uvicorn on the other side).

Exactly-once survives a dropped socket for the same reason as over HTTP: every frame
carries (session, step), so the transport reconnects and resends the very same message,
and the server answers a step it already applied from its retry store. While the server
is unreachable it retries with the same policy as
:class:`~device_tf.transport.HttpTransport` (:class:`device_tf.retry.Patience`: bounded
exponential backoff for ``reconnect_timeout`` s), honouring the server's ``retry_after``
on ``busy`` / ``shutting_down`` / ``rate_limited``.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import struct
import time
from typing import Any

from ._exceptions import ServerRejected, ServerUnreachable, StepConflict
from .retry import Retry
from .transport import OPS, WAIT_CODES, HttpTransport, Reply

OP_CODES = {"forward": 1, "backward": 2, "step": 3, "infer": 4}
HEAD = struct.Struct(">BI")
REPLY_HEAD = struct.Struct(">BIH")


class WsTransport(HttpTransport):
    """Frames over one WebSocket; sessions and health over HTTP (same arguments as
    :class:`HttpTransport`, plus ``ping_interval`` s between keepalive pings)."""

    def __init__(self, base_url: str, *args: Any, ping_interval: float = 20.0, **kwargs: Any):
        super().__init__(base_url, *args, **kwargs)
        self.ping_interval = ping_interval
        self._timeout = float(kwargs.get("timeout", args[0] if args else 60.0))
        self._ca_file = kwargs.get("ca_file")
        self._ws: Any = None
        self._ws_sid: str | None = None
        self._rid = 0
        self.connections = 0  # sockets opened so far: more than 1 means it reconnected

    # -- the socket --------------------------------------------------------------------------

    def _ws_url(self, sid: str) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/v1/sessions/{sid}/ws"

    def _connect(self) -> Any:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        assert self.session is not None
        sid = self.session.session_id
        if self._ws is not None and self._ws_sid == sid:
            return self._ws
        self._drop()
        context = None
        if self.base_url.startswith("https"):
            context = ssl.create_default_context(
                cafile=str(self._ca_file) if self._ca_file else None
            )
        try:
            self._ws = connect(
                self._ws_url(sid),
                additional_headers={"Authorization": f"Bearer {self.session.token}"},
                subprotocols=["spliteasy.v1"],
                max_size=None,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_interval,
                open_timeout=min(self._timeout, 30.0),
                ssl=context,
            )
        except InvalidStatus as exc:
            response = exc.response
            try:
                body = json.loads(bytes(response.body or b""))
            except ValueError:
                body = {}
            code = str(body.get("error", "error"))
            if response.status_code in (429, 503) and code in WAIT_CODES:
                raise Retry(f"{response.status_code} {code}", _header_seconds(response)) from None
            raise ServerRejected(
                response.status_code, code, str(body.get("detail", "")), body
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise ServerUnreachable(
                f"{self.base_url}: the server's TLS certificate is not trusted ({exc}); "
                "pass the CA that signed it (spliteasy train --ca-file)"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise Retry(f"{type(exc).__name__}: {exc}") from None
        self._ws_sid = sid
        self.connections += 1
        return self._ws

    def _drop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        self._ws, self._ws_sid = None, None

    def _once(self, op: str, body: bytes) -> tuple[dict, bytes]:
        from websockets.exceptions import ConnectionClosed

        ws = self._connect()
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        rid = self._rid
        try:
            ws.send(HEAD.pack(OP_CODES[op], rid) + body)
            while True:
                message = ws.recv(timeout=self._timeout)
                if isinstance(message, str):
                    err = json.loads(message)
                    if err.get("id") != rid:
                        continue  # an answer to an earlier attempt: not ours
                    status, code = int(err.get("status", 0)), str(err.get("error", "error"))
                    if status in (429, 503) and code in WAIT_CODES:
                        raise Retry(f"{status} {code}", float(err.get("retry_after", 0.0)))
                    body_json = {k: v for k, v in err.items() if k not in ("id", "status")}
                    cls = StepConflict if code == "step_conflict" else ServerRejected
                    raise cls(status, code, str(err.get("detail", "")), body_json)
                kind, got, meta_len = REPLY_HEAD.unpack_from(message)
                if got != rid or kind != 0x80 | OP_CODES[op]:
                    continue
                start = REPLY_HEAD.size
                meta = json.loads(message[start : start + meta_len])
                return meta, bytes(message[start + meta_len :])
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            self._drop()
            raise Retry(f"{type(exc).__name__}: {exc}") from None

    # -- the seam ------------------------------------------------------------------------------

    def exchange(self, op: str, body: bytes) -> Reply:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        if self.session is None:
            raise ServerRejected(0, "no_session", "open or resume a session first")
        start = time.perf_counter()
        meta, frames = self._patience().run(
            lambda: self._once(op, body),
            label=f"{self.base_url} (websocket)",
            target=self._ws_url(self.session.session_id),
        )
        return Reply(
            frames,
            float(meta.get("server_ms", 0.0)),
            (time.perf_counter() - start) * 1000,
            int(meta["durable_step"]) if "durable_step" in meta else None,
            bool(meta.get("replayed", False)),
        )

    def resume_session(self, session_id: str, token: str):  # noqa: ANN201 - SessionInfo
        self._drop()
        return super().resume_session(session_id, token)

    def open_session(  # noqa: ANN201 - SessionInfo
        self, manifest_sha256: str, aux_label: bool = False, codec: str = "float32"
    ):
        self._drop()
        return super().open_session(manifest_sha256, aux_label, codec)

    def close_session(self) -> None:
        self._drop()
        super().close_session()

    def close(self) -> None:
        self._drop()
        super().close()


def _header_seconds(response: Any, cap: float = 30.0) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", 0)), 0.0), cap)
    except (TypeError, ValueError):
        return 0.0


def make_transport(kind: str, base_url: str, **kwargs: Any) -> HttpTransport:
    """``http`` or ``ws``: the transport ``spliteasy train --transport`` names."""
    if kind == "http":
        return HttpTransport(base_url, **kwargs)
    if kind == "ws":
        return WsTransport(base_url, **kwargs)
    raise ValueError(f"unknown transport {kind!r} (http or ws)")
