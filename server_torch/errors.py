"""Every way a request can fail, and the one table that turns failures into HTTP.

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
    ├── UnsupportedMediaType  415
    ├── InvalidTensor         422  well-formed, but values the server will not train on
    │   ├── NonFinite               NaN / Inf
    │   └── LabelOutOfRange
    ├── Busy                  503  another device held B for longer than we could wait
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

log = logging.getLogger("spliteasy.server")


class ServerError(SpliteasyError):
    """Base of the server's deliberate failures; ``status`` and ``code`` make the reply."""

    status: int = 500
    code: str = "server_error"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail)
        self.extra = extra  # more JSON fields for the reply body (step_conflict's next_step, ...)


class BadRequest(ServerError):
    status, code = 400, "bad_request"


class Unauthorized(ServerError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServerError):
    status, code = 403, "forbidden"


class NotFound(ServerError):
    status, code = 404, "not_found"


class UnknownSession(NotFound):
    code = "unknown_session"


class WrongSplitMode(NotFound):
    code = "wrong_split_mode"


class ManifestMismatch(ServerError):
    status, code = 409, "manifest_mismatch"


class StepConflict(ServerError):
    """The body carries ``next_step``, ``expect`` and ``durable_step`` when a session is known."""

    status, code = 409, "step_conflict"


class StaleForward(ServerError):
    status, code = 409, "stale_forward"


class BodyTooLarge(ServerError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(ServerError):
    status, code = 415, "unsupported_media_type"


class InvalidTensor(ServerError):
    status, code = 422, "invalid_tensor"


class NonFinite(InvalidTensor):
    code = "non_finite"


class LabelOutOfRange(InvalidTensor):
    code = "label_out_of_range"


class Busy(ServerError):
    status, code = 503, "busy"
    headers = {"Retry-After": "1"}


class TooManySessions(ServerError):
    status, code = 503, "too_many_sessions"
    headers = {"Retry-After": "5"}


class ShuttingDown(ServerError):
    """The server is draining for its final checkpoint; the request changed nothing."""

    status, code = 503, "shutting_down"
    headers = {"Retry-After": "5"}


# Frame codec errors: malformed bytes are the client's syntax error (400); a well-formed
# frame that is not the tensor the manifest expects here is a semantic one (422).
_FRAME_ERRORS: list[tuple[type[FrameError], int, str]] = [
    (BadMagic, 400, "bad_magic"),
    (TruncatedFrame, 400, "truncated_frame"),
    (UnsupportedVersion, 400, "unsupported_version"),
    (FrameSizeMismatch, 400, "frame_size_mismatch"),
    (FrameSpecMismatch, 422, "frame_spec_mismatch"),
]

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


def error_payload(exc: BaseException) -> tuple[int, dict[str, object], dict[str, str]]:
    """(status, JSON body, extra headers) for any exception; unknown ones are a 500."""
    if isinstance(exc, ServerError):
        body = {"error": exc.code, "detail": str(exc), **getattr(exc, "extra", {})}
        return exc.status, body, dict(exc.headers or {})
    if isinstance(exc, FrameError):
        for cls, status, code in _FRAME_ERRORS:
            if isinstance(exc, cls):
                return status, {"error": code, "detail": str(exc)}, {}
        return 400, {"error": "bad_frame", "detail": str(exc)}, {}
    if isinstance(exc, SpliteasyError):
        return 400, {"error": "bad_request", "detail": str(exc)}, {}
    return 500, {"error": "internal_error", "detail": f"{type(exc).__name__}: {exc}"}, {}


def install_handlers(app: Any) -> None:
    """Register the JSON error shape on a FastAPI app for our errors and FastAPI's own."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def _reply(exc: BaseException) -> JSONResponse:
        status, body, headers = error_payload(exc)
        if status >= 500 and not isinstance(exc, ServerError):
            log.error("unhandled error", exc_info=exc)
        return JSONResponse(body, status_code=status, headers=headers)

    async def spliteasy_error(_request: Any, exc: Exception) -> JSONResponse:
        return _reply(exc)

    async def http_error(_request: Any, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def validation_error(_request: Any, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "invalid_request", "detail": "; ".join(parts)}, status_code=422
        )

    async def unexpected(_request: Any, exc: Exception) -> JSONResponse:
        return _reply(exc)

    app.add_exception_handler(SpliteasyError, spliteasy_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
