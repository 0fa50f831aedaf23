"""Every way a request can fail, and the one table that turns failures into HTTP.

Each error names its ``code``; its HTTP status (and Retry-After) is looked up in
``shared_schema/protocol.json``, the table the JS device is tested against.

The step logic (``sessions``, ``trainer``) raises these exceptions and knows nothing of
HTTP; ``app`` installs :func:`install_handlers` so each becomes a 4xx/5xx with the JSON
body ``{"error": code, "detail": message}`` the protocol promises. Another transport
(a WebSocket, say) maps the same exceptions through :func:`error_payload`.

    ServerError (SpliteasyError)
    ├── BadRequest            400  malformed message (frame count, session id in frame, ...)
    ├── Unauthorized          401  no bearer token
    ├── Forbidden             403  wrong bearer token
    ├── NotFound              404  e.g. a bundle file the manifest does not list for devices
    │   ├── UnknownSession         no such session (or it was deleted / evicted)
    │   └── WrongSplitMode         e.g. /forward on a single-split server
    ├── ManifestMismatch      409  the device holds another bundle
    ├── StepConflict          409  a step other than the expected one, or a retry whose body differs
    ├── StaleForward          409  the forward's lease on B expired and B moved on
    ├── BodyTooLarge          413
    │   ├── BatchTooLarge           more samples than --max-batch
    │   └── JsonTooLarge            a JSON body over its small limit
    ├── UnsupportedMediaType  415
    ├── UnsupportedCodec      422  session creation asked for a codec this server does not offer
    ├── InvalidTensor         422  well-formed, but values the server will not train on
    │   ├── NonFinite               NaN / Inf
    │   ├── ValueOutOfRange         |x| beyond the server's bound (--max-abs-value)
    │   ├── UnstableStep            the step would make B non-finite: rolled back
    │   └── LabelOutOfRange
    ├── KeyRequired           401  session creation without a valid enrolment key
    ├── RateLimited           429  too many sessions created by this key / address
    ├── ClientDisconnected    400  the client went away mid-body (nobody reads the reply)
    ├── BodyTimeout           408  the body stalled for longer than --body-timeout
    ├── Busy                  503  another device held B for longer than we could wait,
    │                              or too many requests already wait for B / buffer bodies
    ├── TooManySessions       503
    └── ShuttingDown          503  draining for the final checkpoint (SIGTERM/SIGINT)
"""

from __future__ import annotations

import logging
from typing import Any

from shared_schema import (
    BadMagic,
    FrameError,
    FrameSizeMismatch,
    FrameSpecMismatch,
    SpliteasyError,
    TruncatedFrame,
    UnsupportedVersion,
)
from shared_schema.protocol import ERROR_STATUS, RETRY_AFTER, status_of

log = logging.getLogger("spliteasy.server")


class ServerError(SpliteasyError):
    """Base of the server's deliberate failures; ``status`` and ``code`` make the reply."""

    status: int = status_of("server_error")
    code: str = "server_error"
    headers: dict[str, str] | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Status and Retry-After come from ``shared_schema/protocol.json`` by ``code``,
        so the table the devices are tested against is the one the server answers with."""
        super().__init_subclass__(**kwargs)
        cls.status = ERROR_STATUS.get(cls.code, cls.status)  # tests: every code is listed
        if cls.code in RETRY_AFTER:
            cls.headers = {**(cls.headers or {}), "Retry-After": str(RETRY_AFTER[cls.code])}

    def __init__(
        self, detail: str = "", *, retry_after: float | None = None, **extra: object
    ) -> None:
        super().__init__(detail)
        self.extra = extra  # more JSON fields for the reply body (step_conflict's next_step, ...)
        if retry_after is not None:
            self.headers = {**(self.headers or {}), "Retry-After": str(max(1, round(retry_after)))}


class BadRequest(ServerError):
    code = "bad_request"


class Unauthorized(ServerError):
    code = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServerError):
    code = "forbidden"


class NotFound(ServerError):
    code = "not_found"


class UnknownSession(NotFound):
    code = "unknown_session"


class WrongSplitMode(NotFound):
    code = "wrong_split_mode"


class ManifestMismatch(ServerError):
    code = "manifest_mismatch"


class StepConflict(ServerError):
    """The body carries ``next_step``, ``expect`` and ``durable_step`` when a session is known."""

    code = "step_conflict"


class StaleForward(ServerError):
    code = "stale_forward"


class BodyTooLarge(ServerError):
    code = "body_too_large"


class BatchTooLarge(BodyTooLarge):
    code = "batch_too_large"


class JsonTooLarge(BodyTooLarge):
    code = "json_too_large"


class KeyRequired(ServerError):
    """Session creation needs an enrolment key (``serve --auth-keys``)."""

    code = "key_required"
    headers = {"WWW-Authenticate": "Bearer"}


class RateLimited(ServerError):
    code = "rate_limited"


class BodyTimeout(ServerError):
    """No byte of the body arrived for ``--body-timeout`` seconds (a stalled client)."""

    code = "body_timeout"


class ClientDisconnected(ServerError):
    """The client closed the connection before its body was complete; logged as one line."""

    code = "client_disconnected"


class UnsupportedMediaType(ServerError):
    code = "unsupported_media_type"


class InvalidTensor(ServerError):
    code = "invalid_tensor"


class NonFinite(InvalidTensor):
    code = "non_finite"


class LabelOutOfRange(InvalidTensor):
    code = "label_out_of_range"


class ValueOutOfRange(InvalidTensor):
    code = "value_out_of_range"


class UnstableStep(InvalidTensor):
    """The step would have made B's outputs, gradients or parameters non-finite; B, its
    BatchNorm statistics and its optimizer state were put back as they were before it."""

    code = "non_finite_step"


class UnsupportedCodec(ServerError):
    """Session creation asked for a wire codec this server does not know or offer (or a
    lossy one with auxiliary labels); the body lists what it offers."""

    code = "unsupported_codec"


class Busy(ServerError):
    code = "busy"


class TooManySessions(ServerError):
    code = "too_many_sessions"


class ShuttingDown(ServerError):
    """The server is draining for its final checkpoint; the request changed nothing."""

    code = "shutting_down"


# Frame codec errors: malformed bytes are the client's syntax error (400); a well-formed
# frame that is not the tensor the manifest expects here is a semantic one (422).
_FRAME_ERRORS: list[tuple[type[FrameError], str]] = [
    (BadMagic, "bad_magic"),
    (TruncatedFrame, "truncated_frame"),
    (UnsupportedVersion, "unsupported_version"),
    (FrameSizeMismatch, "frame_size_mismatch"),
    (FrameSpecMismatch, "frame_spec_mismatch"),
]

# FastAPI's own HTTP errors (routing, validation) by status: our code for each
_HTTP_CODES = {
    status_of(code): code
    for code in (
        "bad_request",
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "body_too_large",
        "unsupported_media_type",
        "invalid_request",
    )
}


def error_payload(exc: BaseException) -> tuple[int, dict[str, object], dict[str, str]]:
    """(status, JSON body, extra headers) for any exception; unknown ones are a 500."""
    if isinstance(exc, ServerError):
        body = {"error": exc.code, "detail": str(exc), **getattr(exc, "extra", {})}
        return exc.status, body, dict(exc.headers or {})
    if isinstance(exc, FrameError):
        code = next((c for cls, c in _FRAME_ERRORS if isinstance(exc, cls)), "bad_frame")
        return status_of(code), {"error": code, "detail": str(exc)}, {}
    if isinstance(exc, SpliteasyError):
        return status_of("bad_request"), {"error": "bad_request", "detail": str(exc)}, {}
    # Never the exception's text: it may name files, paths or internals of the server.
    body = {"error": "internal_error", "detail": "internal server error"}
    return status_of("internal_error"), body, {}


def request_id_of(request: Any) -> str:
    """The id ``guard.RequestGuard`` gave this request (``-`` outside it)."""
    scope = getattr(request, "scope", None) or {}
    return str(scope.get("spliteasy.request_id", "-"))


def install_handlers(app: Any) -> None:
    """Register the JSON error shape on a FastAPI app for our errors and FastAPI's own."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def _reply(request: Any, exc: BaseException) -> JSONResponse:
        status, body, headers = error_payload(exc)
        rid = request_id_of(request)
        if status >= 500 and not isinstance(exc, ServerError):
            # Logged here, once, with the request id; the reply says only that id. The
            # connection is closed: whatever broke may have left it mid-message.
            log.error("request %s: unhandled %s", rid, type(exc).__name__, exc_info=exc)
            body = {**body, "request_id": rid}
            headers = {**headers, "Connection": "close"}
        elif isinstance(exc, ClientDisconnected | BodyTimeout):
            # one line, from the access log (guard.RequestGuard), no traceback
            headers = {**headers, "Connection": "close"}
        if request is not None and hasattr(request, "scope"):
            request.scope["spliteasy.error_code"] = body.get("error")
        return JSONResponse(body, status_code=status, headers=headers)

    async def spliteasy_error(request: Any, exc: Exception) -> JSONResponse:
        return _reply(request, exc)

    async def http_error(request: Any, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        request.scope["spliteasy.error_code"] = code
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def validation_error(request: Any, exc: RequestValidationError) -> JSONResponse:
        request.scope["spliteasy.error_code"] = "invalid_request"
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid_request", "detail": "; ".join(parts)},
            status_code=status_of("invalid_request"),
        )

    async def unexpected(request: Any, exc: Exception) -> JSONResponse:
        return _reply(request, exc)

    app.add_exception_handler(SpliteasyError, spliteasy_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
