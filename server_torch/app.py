"""The HTTP face of the server (docs/protocol.md, v1): routing, body limits, headers.

All step logic lives in :class:`server_torch.sessions.SplitService`; this module only
reads bodies (bounded, of the right media type), hands them over in a worker thread so
torch never blocks the event loop, and writes the reply with its timing headers. A
WebSocket transport would sit beside it and call the same service.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from shared_schema import MANIFEST_FILE, MEDIA_TYPE, Manifest, load_manifest

from .errors import BadRequest, BodyTooLarge, NotFound, UnsupportedMediaType, install_handlers
from .sessions import Reply, SplitService

if TYPE_CHECKING:
    from torch import nn

DEFAULT_MAX_BATCH = 1024
MIN_BODY_LIMIT = 1 << 20
MAX_BODY_LIMIT = 1 << 30  # unless asked for explicitly
FRAME_OVERHEAD = 64 * 1024  # headers, names and shapes of a few frames, generously

_FRAME_BODY = {
    "requestBody": {
        "required": True,
        "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    "responses": {
        "200": {"content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}
    },
}


Auth = Annotated[str | None, Header()]


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    aux_label: bool = False


def default_body_limit(manifest: Manifest, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Bytes a message may carry: the largest request of this bundle at ``max_batch``."""
    per_sample = manifest.server_input.bytes_per_sample + max(
        manifest.server_output.bytes_per_sample, manifest.labels.bytes_per_sample
    )
    return max(MIN_BODY_LIMIT, min(max_batch * per_sample + FRAME_OVERHEAD, MAX_BODY_LIMIT))


def find_device_dir() -> Path | None:
    """``device_tf/js`` of the installed (or checked-out) device package, if present."""
    spec = importlib.util.find_spec("device_tf")
    if spec is None or not spec.submodule_search_locations:
        return None
    js = Path(next(iter(spec.submodule_search_locations))) / "js"
    return js if js.is_dir() else None


def _manifest_bytes(bundle_dir: Path | None, manifest: Manifest) -> bytes:
    """The bytes devices hash: the bundle's own file when it is the manifest we serve."""
    if bundle_dir is not None:
        path = bundle_dir / MANIFEST_FILE
        if path.is_file():
            raw = path.read_bytes()
            try:
                if Manifest.model_validate_json(raw) == manifest:
                    return raw
            except ValueError:
                pass
    return manifest.to_json().encode()


def _device_artifact_roots(bundle_dir: Path, manifest: Manifest) -> list[Path]:
    """Files a device may fetch: the artefacts of its own slices and of the bundle; B's stay here."""
    arts = [a for s in manifest.slices if s.side == "device" for a in s.artifacts]
    arts += list(manifest.artifacts)
    return [(bundle_dir / a.path).resolve() for a in arts]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def _read_frames(request: Request, limit: int) -> bytearray:
    """The body as writable memory (numpy views it, torch views numpy), at most ``limit`` bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != MEDIA_TYPE:
        raise UnsupportedMediaType(
            f"send tensors as {MEDIA_TYPE}, not {ctype or 'no content type'}"
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise BadRequest(f"bad Content-Length {declared!r}") from None
        if n > limit:
            raise BodyTooLarge(f"{n} bytes; this server takes at most {limit} per message")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(
                f"more than {limit} bytes; this server takes at most {limit} per message"
            )
    return body


def _frame_response(reply: Reply, t0: float) -> Response:
    return Response(
        content=reply.body,
        media_type=MEDIA_TYPE,
        headers={
            "X-Spliteasy-Server-Ms": f"{reply.server_ms:.3f}",
            "X-Spliteasy-Handler-Ms": f"{(time.perf_counter() - t0) * 1e3:.3f}",
            "X-Spliteasy-Replayed": "1" if reply.replayed else "0",
            "X-Spliteasy-Durable-Step": str(reply.durable_step),
        },
    )


def create_app(
    bundle_dir: Path | str | None,
    *,
    module: nn.Module | None = None,
    manifest: Manifest | None = None,
    max_sessions: int = 64,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int | None = None,
    lease_timeout: float = 120.0,
    idle_timeout: float = 3600.0,
    device_dir: Path | Literal["auto"] | None = "auto",
    state_dir: Path | str | None = None,
    checkpoint_every: int = 50,
) -> FastAPI:
    """The server for one bundle.

    Without ``manifest`` the bundle's manifest is loaded and every artefact's hash
    verified; without ``module`` B is rebuilt from the bundle (``server_torch.rebuild``).
    Tests inject both and may pass ``bundle_dir=None``.

    With ``state_dir`` the server keeps its state there (``server_torch.checkpoint``): it
    resumes from the newest intact checkpoint, writes one every ``checkpoint_every``
    steps (0: only at session creation and shutdown), and ``app.state.on_exit`` drains
    and writes the last one (``serving`` calls it on SIGTERM/SIGINT or ``stop()``).
    """
    from .checkpoint import Checkpointer
    from .trainer import Trainer

    bundle = Path(bundle_dir) if bundle_dir is not None else None
    if manifest is None:
        if bundle is None:
            raise ValueError("create_app needs a bundle directory or a manifest")
        manifest = load_manifest(bundle, verify=True)
    if module is None:
        if bundle is None:
            raise ValueError("create_app needs a bundle directory or a module")
        from .rebuild import load_server_slice

        module = load_server_slice(bundle, manifest)

    raw_manifest = _manifest_bytes(bundle, manifest)
    digest = hashlib.sha256(raw_manifest).hexdigest()
    service = SplitService(
        Trainer(module, manifest),
        manifest,
        digest,
        max_sessions=max_sessions,
        lease_timeout=lease_timeout,
        idle_timeout=idle_timeout,
    )
    checkpointer: Checkpointer | None = None
    if state_dir is not None:
        checkpointer = Checkpointer(service, state_dir, every=checkpoint_every)
        checkpointer.open()
        try:
            checkpointer.resume()
        except BaseException:
            checkpointer.close()
            raise
        checkpointer.attach()
    limit = (
        max_body_bytes if max_body_bytes is not None else default_body_limit(manifest, max_batch)
    )
    roots = _device_artifact_roots(bundle, manifest) if bundle is not None else []

    app = FastAPI(
        title="spliteasy server",
        version="1",
        description=f"Slice B of {manifest.model} ({manifest.split_mode} split), trained in PyTorch.",
    )
    app.state.service = service
    app.state.trainer = service.trainer
    app.state.manifest = manifest
    app.state.manifest_sha256 = digest
    app.state.max_body_bytes = limit
    app.state.checkpointer = checkpointer
    if checkpointer is not None:
        app.state.on_exit = checkpointer.final
    install_handlers(app)

    @app.get("/v1/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": manifest.model,
            "split_mode": manifest.split_mode,
            "manifest_sha256": digest,
            "sessions": service.session_count,
            "steps": service.trainer.steps,
            **(
                checkpointer.health()
                if checkpointer is not None
                else {"checkpoint": None, "resumed_from": None}
            ),
        }

    @app.get("/v1/manifest")
    def get_manifest() -> Response:
        return Response(raw_manifest, media_type="application/json")

    @app.get("/v1/schema")
    def get_schema() -> Response:
        """The manifest's JSON Schema, so a device (the TF.js page) validates what it loads."""
        from shared_schema.export_schema import render

        return Response(render(), media_type="application/json")

    demo_data: list[bytes] = []

    @app.get("/v1/demo/digits.frames")
    def demo_digits() -> Response:
        """scikit-learn's digits training split, fitted to this bundle's input, as a frames
        file: demo data for the browser device page. A real device trains on its own data;
        nothing here is needed for training."""
        if manifest.num_classes < 10 or len(manifest.input.shape) != 4:
            raise NotFound("the digits demo data does not fit this bundle's input or classes")
        if not demo_data:
            from device_tf.data import fit_to_input, frames_dataset, load_digits_split

            x, y, _, _ = load_digits_split()
            x = fit_to_input(x, manifest.input.sample_shape)
            demo_data.append(frames_dataset(x, y, manifest.input.name))
        return Response(demo_data[0], media_type=MEDIA_TYPE)

    @app.get("/v1/bundle/{path:path}")
    def bundle_file(path: str) -> FileResponse:
        rel = PurePosixPath(path)
        if rel.is_absolute() or ".." in rel.parts or "\\" in path:
            raise BadRequest(f"bundle paths are relative and stay inside the bundle: {path!r}")
        if bundle is not None:
            target = (bundle / rel).resolve()
            if target.is_file() and any(target == r or target.is_relative_to(r) for r in roots):
                return FileResponse(target)
        raise NotFound(f"{path!r} is not a device artefact of this bundle")

    @app.post("/v1/sessions", status_code=201)
    def create_session(req: SessionRequest) -> JSONResponse:
        s, token = service.create_session(req.manifest_sha256, req.aux_label)
        return JSONResponse({**s.status(manifest.split_mode), "token": token}, status_code=201)

    @app.get("/v1/sessions/{sid}")
    def get_session(sid: str, authorization: Auth = None) -> dict:
        """Where the session stands: next_step, expect, durable_step (needs its token)."""
        return service.session_status(sid, _bearer(authorization))

    @app.delete("/v1/sessions/{sid}", status_code=204)
    def delete_session(sid: str, authorization: Auth = None) -> Response:
        service.delete_session(sid, _bearer(authorization))
        return Response(status_code=204)

    def frame_route(op: str) -> None:
        call = getattr(service, op)

        async def handler(sid: str, request: Request, authorization: Auth = None) -> Response:
            token = _bearer(authorization)
            service.check_access(sid, token)  # refuse before reading a large body
            body = await _read_frames(request, limit)
            t0 = time.perf_counter()
            reply = await run_in_threadpool(call, sid, token, body)
            return _frame_response(reply, t0)

        handler.__name__ = f"session_{op}"
        handler.__doc__ = getattr(SplitService, op).__doc__
        app.add_api_route(
            f"/v1/sessions/{{sid}}/{op}",
            handler,
            methods=["POST"],
            response_class=Response,
            openapi_extra=_FRAME_BODY,
        )

    for op in ("forward", "backward", "step", "infer"):
        frame_route(op)

    device = find_device_dir() if device_dir == "auto" else device_dir
    if device is not None and Path(device).is_dir():
        import mimetypes

        from fastapi.staticfiles import StaticFiles

        mimetypes.add_type("text/javascript", ".mjs")  # module scripts need a JS type

        @app.get("/device", include_in_schema=False)
        @app.get("/device/", include_in_schema=False)
        def device_page() -> RedirectResponse:
            return RedirectResponse("/device/web/")

        app.mount(
            "/device", StaticFiles(directory=device, html=True, check_dir=False), name="device"
        )

    return app
