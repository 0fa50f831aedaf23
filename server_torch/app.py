"""The HTTP face of the server (docs/protocol.md, v1): routing, body limits, headers.

All step logic lives in :class:`server_torch.sessions.SplitService`; this module only
reads bodies (bounded, of the right media type), hands them over in a worker thread so
torch never blocks the event loop, and writes the reply with its timing headers. A
WebSocket transport would sit beside it and call the same service.

Exposed to the network (``guard``): a forward or step that waits for B's lease waits on
the event loop (no worker thread), in a bounded queue; bodies in flight share one byte
budget; session creation may need an enrolment key and is rate-limited per key and per
address; idle sessions are evicted on a schedule; anything unexpected becomes a generic
500 that closes its connection. ``GET /metrics`` speaks Prometheus.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from shared_schema import MANIFEST_FILE, MEDIA_TYPE, Manifest, load_manifest
from shared_schema.assets import device_page_dir

from .errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    JsonTooLarge,
    NotFound,
    UnsupportedMediaType,
    install_handlers,
)
from .guard import Admission, ByteBudget, RequestGuard, TurnWaiter, periodic
from .sessions import Reply, SplitService

if TYPE_CHECKING:
    from torch import nn

    from .trainer import Trainer

DEFAULT_MAX_BATCH = 1024
MIN_BODY_LIMIT = 1 << 20
MAX_BODY_LIMIT = 1 << 30  # unless asked for explicitly
FRAME_OVERHEAD = 64 * 1024  # headers, names and shapes of a few frames, generously
JSON_LIMIT = 16 * 1024  # a session request is ~100 bytes
# Incoming tensors larger in magnitude than this are refused (422 value_out_of_range)
# unless the bundle's report.json says otherwise ("limits": {"max_abs_value": x}) or
# --max-abs-value does: far beyond what a trained net's cut carries, far below overflow.
DEFAULT_MAX_ABS_VALUE = 1e6
DEFAULT_BODY_TIMEOUT = 30.0
log = logging.getLogger("spliteasy.server")

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
    # the wire codec of the session's ACTIVATION/GRADIENT frames (shared_schema/codec.py);
    # any string, so an unknown one gets 422 unsupported_codec naming what is offered
    codec: str = Field(default="float32", max_length=64)


def default_body_limit(manifest: Manifest, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """Bytes a message may carry: the largest request of this bundle at ``max_batch``."""
    per_sample = manifest.server_input.bytes_per_sample + max(
        manifest.server_output.bytes_per_sample, manifest.labels.bytes_per_sample
    )
    return max(MIN_BODY_LIMIT, min(max_batch * per_sample + FRAME_OVERHEAD, MAX_BODY_LIMIT))


def default_max_abs_value(bundle_dir: Path | None) -> float:
    """The magnitude bound for incoming tensors: the bundle report's ``limits.max_abs_value``
    when its conversion recorded one, else :data:`DEFAULT_MAX_ABS_VALUE`."""
    if bundle_dir is not None:
        try:
            report = json.loads((bundle_dir / "report.json").read_text())
            value = float(report["limits"]["max_abs_value"])
            if value > 0:
                return value
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return DEFAULT_MAX_ABS_VALUE


def default_buffer_budget(body_limit: int) -> int:
    """Bytes of bodies held at once: 16 full bodies, at most 1 GiB (at least one body)."""
    return max(body_limit, min(16 * body_limit, 1 << 30))


def find_device_dir() -> Path | None:
    """``device_tf/js`` of the installed device package, found without importing it."""
    return device_page_dir()


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


def servable_files(bundle_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """Files a device may fetch, by their path relative to the bundle: the regular files of
    its own slices' artefacts and of the bundle's; B's stay here. Built once at start-up,
    so a request is a dictionary lookup: no path from the network ever reaches the file
    system. Symlinks are not followed (a loop, or a link out of the bundle, is skipped)."""
    arts = [a for s in manifest.slices if s.side == "device" for a in s.artifacts]
    arts += list(manifest.artifacts)
    root = bundle_dir.resolve()
    files: dict[str, Path] = {}

    def add(path: Path) -> None:
        try:
            st = path.lstat()
        except OSError:
            return
        if stat.S_ISREG(st.st_mode):
            files[path.relative_to(root).as_posix()] = path

    for art in arts:
        top = root / art.path
        if top.is_symlink() or not (top == root or top.resolve().is_relative_to(root)):
            continue
        if top.is_dir():
            for folder, _dirs, names in os.walk(top, followlinks=False):
                for name in names:
                    add(Path(folder) / name)
        else:
            add(top)
    return files


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class _Body:
    """Reads one request body within its limit, the shared byte budget and an idle timeout;
    ``release()`` returns its bytes to the budget once the reply is made."""

    def __init__(self, budget: ByteBudget, timeout: float) -> None:
        self.budget, self.timeout, self.held = budget, timeout, 0

    async def read(self, request: Request, limit: int, too_large: type[BodyTooLarge]) -> bytearray:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise BadRequest("bad Content-Length") from None
            if n > limit:
                raise too_large(f"{n} bytes; this server takes at most {limit} per message")
            self._hold(n)
        body = bytearray()
        stream = request.stream()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(stream), self.timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise BodyTimeout(
                        f"no body bytes for {self.timeout:g} s; closing the request"
                    ) from None
                body += chunk
                if len(body) > limit:
                    raise too_large(
                        f"more than {limit} bytes; this server takes at most {limit} per message"
                    )
                if len(body) > self.held:
                    self._hold(len(body) - self.held)
        except ClientDisconnect:
            raise ClientDisconnected(
                f"client disconnected after {len(body)} body bytes; request dropped"
            ) from None
        finally:
            await stream.aclose()
        return body

    def _hold(self, n: int) -> None:
        self.budget.reserve(n)
        self.held += n

    def release(self) -> None:
        self.budget.release(self.held)
        self.held = 0


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


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
    max_abs_value: float | None = None,
    max_waiting: int | None = None,
    auth_keys: dict[str, str] | None = None,
    session_rate: float = 30.0,
    evict_every: float = 60.0,
    max_buffered_bytes: int | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    metrics: bool = True,
    mode: Literal["turns", "parallel"] = "turns",
    devices_per_round: int = 1,
    sync_every: int = 1,
    round_timeout: float = 30.0,
    codecs: tuple[str, ...] | None = None,
    trainer: Trainer | None = None,
) -> FastAPI:
    """The server for one bundle.

    Without ``manifest`` the bundle's manifest is loaded and every artefact's hash
    verified; without ``module`` B is rebuilt from the bundle (``server_torch.rebuild``).
    Tests inject both and may pass ``bundle_dir=None``.

    With ``state_dir`` the server keeps its state there (``server_torch.checkpoint``): it
    resumes from the newest intact checkpoint, writes one every ``checkpoint_every``
    steps (0: only at session creation and shutdown), and ``app.state.on_exit`` drains
    and writes the last one (``serving`` calls it on SIGTERM/SIGINT or ``stop()``).

    Exposure (``guard``): ``max_abs_value`` bounds incoming magnitudes (None: the bundle
    report's or :data:`DEFAULT_MAX_ABS_VALUE`); ``max_waiting`` requests may wait for
    B's lease (None: ``max_sessions``); ``auth_keys`` (sha256 -> name, ``guard.load_auth_keys``)
    makes session creation need a key; ``session_rate`` sessions a minute per key and per
    address; sessions idle for ``idle_timeout`` s are evicted every ``evict_every`` s;
    ``max_buffered_bytes`` of bodies are held at once; a body silent for ``body_timeout``
    s is dropped (408).

    ``mode="parallel"`` (``server_torch.parallel``): rounds of ``devices_per_round``
    devices train B on their concatenated batches (one forward, one backward, one
    optimizer step a round); devices average A and C through ``/sync`` every
    ``sync_every`` rounds; a round closes after ``round_timeout`` s with who arrived.

    ``codecs``: the wire codecs a session may ask for (None: all of
    ``shared_schema.codec``); ``/v1/health`` lists them.

    ``trainer``: B's trainer ready-made (``server_torch.distributed.GatewayTrainer`` for
    B on several workers); then ``module`` is not used. In parallel mode a state dir's
    checkpoints hold B, its optimizer and the step count; sessions are not resumed
    (their rounds' stores and syncs are not kept): devices open new sessions.
    """
    from .checkpoint import Checkpointer
    from .trainer import Trainer

    bundle = Path(bundle_dir) if bundle_dir is not None else None
    if manifest is None:
        if bundle is None:
            raise ValueError("create_app needs a bundle directory or a manifest")
        manifest = load_manifest(bundle, verify=True)
    if module is None and trainer is None:
        if bundle is None:
            raise ValueError("create_app needs a bundle directory or a module")
        from .rebuild import load_server_slice

        module = load_server_slice(bundle, manifest)

    raw_manifest = _manifest_bytes(bundle, manifest)
    digest = hashlib.sha256(raw_manifest).hexdigest()
    service = SplitService(
        trainer if trainer is not None else Trainer(module, manifest),
        manifest,
        digest,
        max_sessions=max_sessions,
        lease_timeout=lease_timeout,
        idle_timeout=idle_timeout,
        max_batch=max_batch,
        max_abs_value=max_abs_value if max_abs_value is not None else default_max_abs_value(bundle),
        codecs_offered=codecs,
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
        if mode == "parallel":
            service.table.replace_all([])  # see the docstring: B resumes, sessions do not
        else:
            checkpointer.attach()
    limit = (
        max_body_bytes if max_body_bytes is not None else default_body_limit(manifest, max_batch)
    )
    servable = servable_files(bundle, manifest) if bundle is not None else {}
    budget = ByteBudget(
        max_buffered_bytes if max_buffered_bytes is not None else default_buffer_budget(limit)
    )
    waiter = TurnWaiter(
        service, max_waiting=max_waiting if max_waiting is not None else max_sessions
    )
    admission = Admission(auth_keys, per_minute=session_rate)
    rounds = None
    if mode == "parallel":
        from .parallel import ParallelRounds

        rounds = ParallelRounds(service, devices_per_round, sync_every, round_timeout)
        rounds.checkpointer = checkpointer
    elif mode != "turns":
        raise ValueError(f"mode must be 'turns' or 'parallel', not {mode!r}")

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
    app.state.waiter = waiter
    app.state.budget = budget
    app.state.admission = admission
    app.state.rounds = rounds
    if rounds is not None:
        app.state.on_exit = rounds.final  # drains the round in flight, then checkpoints
    elif checkpointer is not None:
        app.state.on_exit = checkpointer.final
    install_handlers(app)

    meter = None
    if metrics:
        from .metrics import Metrics

        meter = Metrics(service, waiter, budget)
        waiter.on_wait = meter.lease_wait.observe
        app.state.metrics = meter
        if rounds is not None:
            rounds.on_compute = lambda op, seconds: meter.b_seconds.labels(op).observe(seconds)

        @app.get("/metrics", include_in_schema=False)
        async def get_metrics() -> Response:
            return Response(meter.render(), media_type=meter.content_type)

    housekeeping: list[asyncio.Task] = []

    async def evict() -> None:
        n = await run_in_threadpool(service.evict_idle)
        if n:
            log.info("evicted %d idle session(s) (idle for more than %g s)", n, idle_timeout)
            if meter is not None:
                meter.evicted.inc(n)

    def on_request() -> None:
        # started with the first request, on uvicorn's loop (lifespan is off), lives with it
        if not housekeeping and evict_every > 0:
            housekeeping.append(
                asyncio.get_running_loop().create_task(periodic(evict_every, evict))
            )
        waiter.attach()

    app.add_middleware(
        RequestGuard, observe=meter.observe if meter is not None else None, on_request=on_request
    )

    @app.get("/v1/health")
    async def health() -> dict:
        """Answered on the event loop, never behind B's lock or a worker thread."""
        workers = getattr(service.trainer, "workers", None)
        return {
            "status": "error" if workers is not None and workers.failed else "ok",
            "model": manifest.model,
            "split_mode": manifest.split_mode,
            "manifest_sha256": digest,
            "sessions": service.session_count,
            "steps": service.trainer.steps,
            "codecs": list(service.codecs_offered),
            **(
                checkpointer.health()
                if checkpointer is not None
                else {"checkpoint": None, "resumed_from": None}
            ),
            **({"parallel": rounds.info()} if rounds is not None else {}),
            **({"workers": workers.info()} if workers is not None else {}),
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
            from shared_schema.demo_data import fit_to_input, frames_dataset, load_digits_split

            x, y, _, _ = load_digits_split()
            x = fit_to_input(x, manifest.input.sample_shape)
            demo_data.append(frames_dataset(x, y, manifest.input.name))
        return Response(demo_data[0], media_type=MEDIA_TYPE)

    @app.get("/v1/bundle/{path:path}")
    def bundle_file(path: str) -> FileResponse:
        if path.startswith("/") or "\\" in path or ".." in path.split("/"):
            raise BadRequest("bundle paths are relative and stay inside the bundle")
        target = servable.get(path)
        if target is None:
            raise NotFound("not a device artefact of this bundle")
        return FileResponse(target)

    session_schema = SessionRequest.model_json_schema()

    @app.post(
        "/v1/sessions",
        status_code=201,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": session_schema}},
            }
        },
    )
    async def create_session(request: Request, authorization: Auth = None) -> JSONResponse:
        """A new session (and its bearer token). With ``--auth-keys``, send an enrolment key
        as ``Authorization: Bearer <key>``."""
        client = request.client.host if request.client else "-"
        key = admission.admit(_bearer(authorization), client)
        body = _Body(budget, body_timeout)
        try:
            raw = await body.read(request, JSON_LIMIT, JsonTooLarge)
        finally:
            body.release()
        try:
            req = SessionRequest.model_validate_json(bytes(raw))
        except ValidationError as exc:
            raise RequestValidationError(
                [{"loc": ("body", *e["loc"]), "msg": e["msg"]} for e in exc.errors()]
            ) from None
        s, token = await run_in_threadpool(
            service.create_session, req.manifest_sha256, req.aux_label, req.codec
        )
        if meter is not None:
            meter.sessions_created.labels(key).inc()
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
            ctype = _media_type(request)
            if ctype != MEDIA_TYPE:
                raise UnsupportedMediaType(
                    f"send tensors as {MEDIA_TYPE}, not {ctype or 'no content type'}"
                )
            reader = _Body(budget, body_timeout)
            try:
                body = await reader.read(request, limit, BodyTooLarge)
                t0 = time.perf_counter()
                if rounds is not None and op in ("forward", "backward"):
                    reply = await getattr(rounds, op)(sid, token, bytes(body))
                elif op in ("forward", "step"):
                    # parse in a worker, wait for the turn on the event loop
                    attempt = await run_in_threadpool(service.prepare, op, sid, token, body)
                    reply = await waiter.run(sid, token, attempt)
                else:
                    reply = await run_in_threadpool(call, sid, token, body)
            finally:
                reader.release()
            if (
                meter is not None
                and not reply.replayed
                and not (rounds is not None and op in ("forward", "backward"))
            ):
                meter.b_seconds.labels(op).observe(reply.server_ms / 1e3)
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

    if rounds is not None:

        @app.post("/v1/sessions/{sid}/sync", include_in_schema=False)
        async def session_sync(sid: str, request: Request, authorization: Auth = None) -> Response:
            """Parallel mode: this device's A and C variables in (safetensors, metadata
            ``sync`` and ``batch``), the batch-weighted average of the round's devices out."""
            token = _bearer(authorization)
            service.check_access(sid, token)
            reader = _Body(budget, body_timeout)
            try:
                body = await reader.read(request, limit, BodyTooLarge)
            finally:
                reader.release()
            out = await rounds.sync(sid, token, bytes(body))
            return Response(out, media_type="application/octet-stream")

    from .ws import add_ws_route

    add_ws_route(app, limit=limit, meter=meter)  # the same calls over one WebSocket

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
