"""Getting a session's messages to the server and back; knows nothing of steps or tensors.

The step loop talks to a :class:`Transport`: open (or resume) a session, exchange one
operation's frames (``forward``, ``backward``, ``step``, ``infer``), close it. Where the
server lives, how URLs are built, the bearer token, retries and reconnection are the
transport's business alone, so a WebSocket transport (issue #11) can sit behind the
same seam.

:class:`HttpTransport` keeps one persistent HTTP/1.1 connection (httpx). A request that
fails in transit (connection refused, reset, dropped before the reply) is sent again,
identically: every frame carries (session, step) and the server answers a repeated step
from its retry store without applying it twice, so a retry is always safe. While the
server is unreachable (restarting, network down) it keeps trying with bounded
exponential backoff for up to ``reconnect_timeout`` seconds, saying so in one line,
before giving up with :class:`ServerUnreachable` (the policy both bindings share:
:class:`device_tf.retry.Patience`).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from shared_schema import MEDIA_TYPE

from ._exceptions import ServerRejected, ServerUnreachable, StepConflict
from .retry import Patience, Retry

AUTH_KEY_ENV = "SPLITEASY_AUTH_KEY"  # the enrolment key (spliteasy train --auth-key)

OPS = ("forward", "backward", "step", "infer")
# 503/429 error codes that mean "come back later" (Retry-After), not "refused"
WAIT_CODES = ("busy", "shutting_down", "rate_limited")


@dataclass
class Reply:
    """One operation's reply: the frames' bytes and what the server said about them."""

    body: bytes
    server_ms: float
    round_trip_ms: float
    durable_step: int | None = None  # X-Spliteasy-Durable-Step: the session's checkpointed step
    replayed: bool = False  # answered from the server's retry store


@dataclass
class SessionInfo:
    """A session as the server holds it."""

    session_id: str
    token: str
    next_step: int = 0
    expect: str = "forward"
    durable_step: int = 0
    aux_label: bool = False
    codec: str = "float32"  # the wire codec the server accepted (shared_schema/codec.py)


class Transport(ABC):
    """What the step loop needs from a link to the server."""

    session: SessionInfo | None = None

    @abstractmethod
    def open_session(
        self, manifest_sha256: str, aux_label: bool = False, codec: str = "float32"
    ) -> SessionInfo:
        """Create a new session for a device holding the bundle with this manifest hash,
        asking for a wire codec (the server refuses one it does not offer: 422)."""

    @abstractmethod
    def resume_session(self, session_id: str, token: str) -> SessionInfo:
        """Take up an existing session (after a device restart), proving it with its token.

        Raises :class:`ServerRejected` (404 ``unknown_session``) when the server does not
        hold it (it restarted without a checkpoint that has it).
        """

    @abstractmethod
    def exchange(self, op: str, body: bytes) -> Reply:
        """Send one operation's frames for the open session; return the reply's frames."""

    @abstractmethod
    def close_session(self) -> None:
        """End the session on the server (best effort)."""

    @abstractmethod
    def health(self) -> dict:
        """The server's health document."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class HttpTransport(Transport):
    """The HTTP/1.1 binding of the protocol (docs/protocol.md)."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 60.0,
        reconnect_timeout: float = 300.0,
        *,
        backoff: tuple[float, float] = (0.1, 5.0),
        notify: Callable[[str], None] = _stderr_line,
        retries: int | None = None,
        ca_file: str | None = None,
        auth_key: str | None = None,
    ) -> None:
        """``backoff``: first and longest wait between attempts; ``notify`` receives the
        one-line messages about losing and regaining the server. ``retries`` (old API)
        bounds the attempts instead of the time. ``ca_file``: the CA that signed an https
        server's certificate (always verified; the system's CAs without it). ``auth_key``:
        the enrolment key session creation needs on a server with ``--auth-keys``
        (default ``$SPLITEASY_AUTH_KEY``)."""
        self.base_url = base_url.rstrip("/")
        self.reconnect_timeout = reconnect_timeout
        self.backoff = backoff
        self.notify = notify
        self.retries = retries
        self.session: SessionInfo | None = None
        self.auth_key = auth_key if auth_key is not None else os.environ.get(AUTH_KEY_ENV)
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, verify=verify)

    @property
    def token(self) -> str | None:
        return self.session.token if self.session else None

    # -- the one place requests are sent --------------------------------------------------

    def _patience(self) -> Patience:
        """The retry policy (device_tf/retry.py) with this transport's settings."""
        return Patience(self.reconnect_timeout, self.backoff, self.retries, self.notify)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        def attempt() -> httpx.Response:
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):  # waiting will not fix it
                    raise ServerUnreachable(
                        f"{self.base_url}: the server's TLS certificate is not trusted ({exc}); "
                        "pass the CA that signed it (spliteasy train --ca-file)"
                    ) from None
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise Retry(why) from None
            code = _error_code(response) if response.status_code in (429, 503) else ""
            if code in WAIT_CODES:
                # B is another device's for now, or the server is saving its final
                # checkpoint before it stops: wait as for a restart, not sooner than it said
                raise Retry(f"{response.status_code} {code}", _retry_after(response))
            return response

        response = self._patience().run(
            attempt, label=self.base_url, target=f"{self.base_url}{path}"
        )
        if response.status_code >= 400:
            raise _rejected(response)
        return response

    def _auth(self) -> dict[str, str]:
        if self.session is None:
            raise ServerRejected(0, "no_session", "open or resume a session first")
        return {"Authorization": f"Bearer {self.session.token}"}

    # -- sessions --------------------------------------------------------------------------

    def open_session(
        self, manifest_sha256: str, aux_label: bool = False, codec: str = "float32"
    ) -> SessionInfo:
        request: dict = {"manifest_sha256": manifest_sha256, "aux_label": aux_label}
        if codec != "float32":  # the default is not sent: older servers know no codec field
            request["codec"] = codec
        reply = self._send(
            "POST",
            "/v1/sessions",
            json=request,
            headers={"Authorization": f"Bearer {self.auth_key}"} if self.auth_key else {},
        ).json()
        self.session = _session_info(reply, reply["token"])
        return self.session

    def resume_session(self, session_id: str, token: str) -> SessionInfo:
        reply = self._send(
            "GET", f"/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {token}"}
        ).json()
        reply.setdefault("session_id", session_id)
        self.session = _session_info(reply, token)
        return self.session

    def close_session(self) -> None:
        if self.session is None:
            return
        # best effort: the server evicts idle sessions anyway
        with contextlib.suppress(httpx.TransportError):
            self._client.request(
                "DELETE", f"/v1/sessions/{self.session.session_id}", headers=self._auth()
            )
        self.session = None

    # -- frames ----------------------------------------------------------------------------

    def exchange(self, op: str, body: bytes) -> Reply:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}")
        headers = {"Content-Type": MEDIA_TYPE, **self._auth()}
        path = f"/v1/sessions/{self.session.session_id}/{op}"  # type: ignore[union-attr]
        start = time.perf_counter()
        response = self._send("POST", path, content=body, headers=headers)
        round_trip = (time.perf_counter() - start) * 1000
        durable = response.headers.get("X-Spliteasy-Durable-Step")
        return Reply(
            response.content,
            float(response.headers.get("X-Spliteasy-Server-Ms", 0.0)),
            round_trip,
            int(durable) if durable is not None else None,
            response.headers.get("X-Spliteasy-Replayed") == "1",
        )

    # -- plain JSON --------------------------------------------------------------------------

    def health(self) -> dict:
        return self._send("GET", "/v1/health").json()

    def get_json(self, path: str) -> dict:
        return self._send("GET", path).json()

    def post_json(self, path: str, payload: dict) -> dict:
        return self._send("POST", path, json=payload).json()

    def close(self) -> None:
        self._client.close()


def _retry_after(response: httpx.Response, cap: float = 30.0) -> float:
    """The server's Retry-After in seconds (0 when absent or not a number of seconds)."""
    try:
        return min(max(float(response.headers.get("Retry-After", 0)), 0.0), cap)
    except ValueError:
        return 0.0


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", ""))
    except ValueError:
        return ""


def _rejected(response: httpx.Response) -> ServerRejected:
    try:
        body = response.json()
        if not isinstance(body, dict):
            raise ValueError
        code, detail = body.get("error", "error"), body.get("detail", response.text)
    except ValueError:
        body, code, detail = {}, "error", response.text[:500]
    cls = StepConflict if code == "step_conflict" else ServerRejected
    return cls(response.status_code, str(code), str(detail), body)


def _session_info(reply: dict, token: str) -> SessionInfo:
    return SessionInfo(
        session_id=reply["session_id"],
        token=token,
        next_step=int(reply.get("next_step", 0)),
        expect=str(reply.get("expect", "forward")),
        durable_step=int(reply.get("durable_step", 0) or 0),
        aux_label=bool(reply.get("aux_label", False)),
        codec=str(reply.get("codec", "float32")),
    )
