"""``spliteasy serve BUNDLE``: train slice B of a bundle behind the HTTP protocol (v1).

B, its optimizer and the session table are checkpointed into a state directory (default
``runs/serve-<manifest sha256[:12]>/``), so running the same command again resumes where
the last checkpoint stands (``server_torch.checkpoint``).

``--mode parallel --workers W`` trains B on W processes (``server_torch.distributed``):
this process is rank 0 (the HTTP gateway) and starts W-1 copies of itself as ranks
1..W-1 on this machine. Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
set) every rank runs this same command: rank 0 serves, the others become workers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "serve slice B of a bundle: the PyTorch side of split learning over HTTP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (with manifest.json)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0 picks a free one (default %(default)s)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn log level (default %(default)s; debug also logs each request)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="spliteasy's log lines as text or as one JSON object a line; each failed request "
        "is one line with its request id (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: half the cores, leaving room for a device on the same machine)",
    )
    parser.add_argument(
        "--max-sessions", type=int, default=64, help="open sessions at most (default %(default)s)"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=1024,
        help="largest batch a message may carry; sets the body size limit (default %(default)s)",
    )
    parser.add_argument(
        "--lease-timeout",
        type=float,
        default=120.0,
        help="seconds a device may hold B between its forward and backward before another "
        "device may take over (default %(default)s)",
    )
    state = parser.add_mutually_exclusive_group()
    state.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where B, its optimizer and the sessions are checkpointed; a restart resumes "
        "from the newest checkpoint there (default runs/serve-<12 hex of the manifest sha256>/)",
    )
    state.add_argument(
        "--no-state",
        action="store_true",
        help="keep nothing on disk: a restart starts from the bundle's initial B",
    )
    expose = parser.add_argument_group(
        "exposing the server",
        "TLS, admission and limits (README, 'Exposing a server'). Listening beyond "
        "loopback without TLS and enrolment keys is refused unless --insecure.",
    )
    expose.add_argument(
        "--ssl-certfile", type=Path, help="TLS certificate chain (PEM): serve https"
    )
    expose.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")
    expose.add_argument(
        "--auth-keys",
        type=Path,
        metavar="FILE",
        help="enrolment keys, one a line ('name key' or 'key'): creating a session then needs "
        "'Authorization: Bearer <key>' (spliteasy train --auth-key); also $SPLITEASY_AUTH_KEYS "
        "(comma-separated)",
    )
    expose.add_argument(
        "--insecure",
        action="store_true",
        help="listen beyond loopback without TLS or without enrolment keys (loud warning)",
    )
    expose.add_argument(
        "--session-rate",
        type=float,
        default=30.0,
        metavar="N",
        help="sessions a minute per enrolment key and per client address (0: no limit) "
        "(default %(default)s)",
    )
    expose.add_argument(
        "--idle-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="a session unused for S seconds is evicted (default %(default)s)",
    )
    expose.add_argument(
        "--evict-every",
        type=float,
        default=60.0,
        metavar="S",
        help="look for idle sessions every S seconds (default %(default)s)",
    )
    expose.add_argument(
        "--max-abs-value",
        type=float,
        default=None,
        metavar="X",
        help="refuse incoming tensors with |value| > X (422 value_out_of_range) (default: the "
        "bundle report's limits.max_abs_value, else 1e6)",
    )
    expose.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        metavar="N",
        help="requests that may wait for B's lease at once; past it 503 busy + Retry-After "
        "(default: --max-sessions)",
    )
    expose.add_argument(
        "--max-connections",
        type=int,
        default=512,
        metavar="N",
        help="open connections at most (one request each at a time); past it 503 busy + "
        "Retry-After (default %(default)s)",
    )
    expose.add_argument(
        "--max-buffered-mb",
        type=float,
        default=None,
        metavar="MB",
        help="request bodies held in memory at once, all connections together; past it 503 "
        "busy (default: 16 bodies at the body limit, at most 1024 MB)",
    )
    expose.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="a connection must send its request line and headers within S s (default %(default)s)",
    )
    expose.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a body that sends nothing for S s is dropped (408) (default %(default)s)",
    )
    expose.add_argument(
        "--keep-alive-timeout",
        type=int,
        default=15,
        metavar="S",
        help="an idle keep-alive connection is closed after S s (default %(default)s)",
    )
    parser.add_argument(
        "--codecs",
        default=None,
        metavar="LIST",
        help="wire codecs a session may ask for, comma-separated (default: all of "
        "float32,fp16,bf16,int8,int8-channel,int4; docs/protocol.md, Compression)",
    )
    par = parser.add_argument_group(
        "parallel mode", "synchronous rounds of several devices on one B (docs/protocol.md)"
    )
    par.add_argument(
        "--mode",
        choices=["turns", "parallel"],
        default="turns",
        help="turns: devices take turns on B; parallel: each round trains B once on the "
        "concatenated batches of --devices-per-round devices (default %(default)s)",
    )
    par.add_argument("--devices-per-round", type=int, default=2, metavar="N")
    par.add_argument(
        "--sync-every",
        type=int,
        default=1,
        metavar="K",
        help="devices average A and C every K rounds, weighted by batch size (default 1)",
    )
    par.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="train B on W processes of this machine with torch.distributed (DDP, gloo; "
        "BatchNorm synchronised); devices still use the one URL. Under torchrun the "
        "launch's WORLD_SIZE is used instead (default 1)",
    )
    par.add_argument(
        "--worker-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a worker that does not answer a collective within S s counts as dead: the "
        "server answers 503 workers_failed and exits with status 1 (default %(default)s)",
    )
    par.add_argument(
        "--round-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a round closes S s after its first message with the devices that arrived",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        metavar="K",
        help="checkpoint after every K optimizer steps (also at session creation and on "
        "SIGTERM/SIGINT; 0: only then) (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from server_torch.app import create_app
    from server_torch.serving import bind_socket, configure_threads, serve_forever, url_of
    from shared_schema import SpliteasyError, load_manifest

    for name in ("max_sessions", "max_batch"):
        if getattr(args, name) < 1:
            raise SpliteasyError(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint_every < 0:
        raise SpliteasyError("--checkpoint-every must be 0 or more")
    launch = _launch(args)
    _log_to_stdout(args.log_level, args.log_format, launch.rank if launch else None)
    if launch is not None and launch.rank > 0:
        return _run_worker(args, launch)
    from server_torch.guard import load_auth_keys

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SpliteasyError("--ssl-certfile and --ssl-keyfile go together")
    try:
        auth_keys = load_auth_keys(args.auth_keys)
    except (OSError, ValueError) as exc:
        raise SpliteasyError(f"--auth-keys: {exc}") from None
    _check_exposure(args.host, bool(args.ssl_certfile), auth_keys is not None, args.insecure)
    # Cheap refusals first (a bad bundle, a taken port), then the slow part: loading B.
    manifest = load_manifest(args.bundle, verify=True)
    state_dir = None
    if args.mode == "parallel":
        if args.devices_per_round < 1 or args.sync_every < 0 or args.round_timeout <= 0:
            raise SpliteasyError(
                "--devices-per-round >= 1, --sync-every >= 0 and --round-timeout > 0"
            )
        if manifest.split_mode != "double":
            raise SpliteasyError("--mode parallel trains a double-split bundle")
    if not args.no_state:
        from server_torch.checkpoint import default_state_dir
        from shared_schema import manifest_digest

        state_dir = args.state_dir or default_state_dir(manifest_digest(args.bundle))
    sock = bind_socket(args.host, args.port)
    group = None
    try:
        trainer = None
        if launch is not None:
            configure_threads(args.threads)
            group, trainer = _start_group(args, launch, manifest)
        app = create_app(
            args.bundle,
            manifest=manifest,
            max_sessions=args.max_sessions,
            max_batch=args.max_batch,
            lease_timeout=args.lease_timeout,
            state_dir=state_dir,
            checkpoint_every=args.checkpoint_every,
            max_abs_value=args.max_abs_value,
            max_waiting=args.max_waiting,
            auth_keys=auth_keys,
            session_rate=args.session_rate,
            idle_timeout=args.idle_timeout,
            evict_every=args.evict_every,
            max_buffered_bytes=None
            if args.max_buffered_mb is None
            else int(args.max_buffered_mb * (1 << 20)),
            body_timeout=args.body_timeout,
            mode=args.mode,
            devices_per_round=args.devices_per_round,
            sync_every=args.sync_every,
            round_timeout=args.round_timeout,
            trainer=trainer,
            codecs=tuple(c.strip() for c in args.codecs.split(",")) if args.codecs else None,
        )
        if group is not None:
            group.workers.broadcast_state(trainer)  # a resumed B reaches every replica
        threads = configure_threads(args.threads)
        tls = bool(args.ssl_certfile)
        url = url_of(sock, tls=tls)
        _announce(app, url, threads)
        if auth_keys is not None:
            print(
                f"spliteasy serve: session creation needs one of {len(auth_keys)} enrolment key(s)"
            )
        options = {
            "max_connections": args.max_connections,
            "timeout_keep_alive": args.keep_alive_timeout,
            "header_timeout": args.header_timeout,
        }
        if tls:
            options.update(ssl_certfile=str(args.ssl_certfile), ssl_keyfile=str(args.ssl_keyfile))
        if group is None:
            serve_forever(app, sock, args.log_level, **options)
            return 0
        code = group.serve(app, sock, args.log_level, **options)
    finally:
        sock.close()
        if group is not None:
            group.close()
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Leave without the interpreter's final garbage collection: torch's gloo objects
    of a group whose peer died take ~10 s to be collected (measured, torch 2.14), and
    everything this process had to say is said."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _launch(args: argparse.Namespace) -> Any:
    """This process's place in B's worker group: None for one process, else a
    ``server_torch.distributed.Launch`` from torchrun's variables or ``--workers``."""
    import os

    from server_torch.distributed import Launch
    from shared_schema import SpliteasyError

    if args.workers is not None and args.workers < 1:
        raise SpliteasyError("--workers must be at least 1")
    if args.worker_timeout <= 0:
        raise SpliteasyError("--worker-timeout must be positive")
    try:
        launch = Launch.from_env()
    except ValueError as exc:
        raise SpliteasyError(f"torch.distributed launch: {exc}") from None
    if launch is not None:
        if args.workers is not None and args.workers != launch.world_size:
            raise SpliteasyError(
                f"--workers {args.workers}, but the launch says WORLD_SIZE={launch.world_size}"
            )
        if launch.world_size == 1:
            return None  # one process: nothing to distribute
    elif (args.workers or 1) > 1:
        launch = Launch(0, args.workers, "127.0.0.1", _free_port())
        os.environ.update(
            RANK="0",
            WORLD_SIZE=str(launch.world_size),
            MASTER_ADDR=launch.master_addr,
            MASTER_PORT=str(launch.master_port),
        )
        args._spawn_local = True
    else:
        return None
    if args.mode != "parallel":
        raise SpliteasyError("B on several workers needs --mode parallel")
    return launch


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_replica(args: argparse.Namespace, launch: Any, manifest: Any, gateway: bool) -> Any:
    """Join the group and build this rank's trainer (a collective: all ranks at once)."""
    from server_torch.distributed import GatewayTrainer, ReplicaTrainer, Workers
    from server_torch.rebuild import load_server_slice
    from shared_schema import SpliteasyError

    if manifest.split_mode != "double":
        raise SpliteasyError("B on several workers trains a double-split bundle")
    module = load_server_slice(args.bundle, manifest)
    workers = Workers(launch, timeout=args.worker_timeout)
    try:
        workers.init()
    except Exception as exc:  # noqa: BLE001 - rendezvous timeout, refused address, ...
        raise SpliteasyError(
            f"rank {launch.rank}: could not join B's worker group at "
            f"{launch.master_addr}:{launch.master_port} within {args.worker_timeout:g} s: {exc}"
        ) from None
    cls = GatewayTrainer if gateway else ReplicaTrainer
    return cls(module, manifest, workers)


def _run_worker(args: argparse.Namespace, launch: Any) -> int:
    """Ranks above 0: a replica of B serving rank 0's rounds; no HTTP."""
    from server_torch.distributed import worker_loop
    from server_torch.serving import configure_threads
    from shared_schema import load_manifest

    manifest = load_manifest(args.bundle, verify=True)
    threads = configure_threads(args.threads)
    trainer = _load_replica(args, launch, manifest, gateway=False)
    print(
        f"spliteasy serve: rank {launch.rank}/{launch.world_size}: worker of B ready "
        f"({threads} torch thread(s), {trainer.synced_batchnorms} synchronised BatchNorm(s))",
        flush=True,
    )
    _exit_now(worker_loop(trainer))
    return 1  # not reached


class _Group:
    """Rank 0's side of a worker group: the local workers it started (``--workers``),
    watching them, and serving until a stop or a failure."""

    def __init__(self, workers: Any, children: list[Any]) -> None:
        self.workers = workers
        self.children = children
        self._server: Any = None
        workers.on_failure.append(self._failed)

    def watch(self) -> None:
        """A local worker that exits before the stop fails the group at once."""
        import threading
        import time

        def poll() -> None:
            while not self.workers.stopped and self.workers.failed is None:
                for rank, child in enumerate(self.children, start=1):
                    code = child.poll()
                    if code is not None and not self.workers.stopped:
                        self.workers.fail(f"worker rank {rank} exited with status {code}")
                        return
                time.sleep(0.2)

        if self.children:
            threading.Thread(target=poll, name="spliteasy workers watch", daemon=True).start()

    def _failed(self, why: str) -> None:
        """Stop serving: the round in flight already heard 503 workers_failed."""
        import threading

        def stop() -> None:
            hook = getattr(self._app.state, "on_exit", None) if self._server else None
            try:
                if hook is not None:
                    hook()
            finally:
                if self._server is not None:
                    self._server.should_exit = True

        threading.Thread(target=stop, name="spliteasy workers failed", daemon=True).start()

    def serve(self, app: Any, sock: Any, log_level: str, **options: Any) -> int:
        from server_torch.serving import _uvicorn_server

        inner = getattr(app.state, "on_exit", None)
        workers = self.workers

        def on_exit() -> None:
            try:
                if inner is not None:
                    inner()
            finally:
                workers.stop()

        app.state.on_exit = on_exit
        self._app = app
        self._server = _uvicorn_server(app, log_level, **options)
        workers.start_heartbeat()
        self.watch()
        if workers.failed is None:
            self._server.run(sockets=[sock])
        if workers.failed is not None:
            print(
                f"spliteasy serve: error: B's worker group failed ({workers.failed}); "
                "stopped without a final checkpoint",
                flush=True,
            )
            return 1
        return 0

    def close(self, timeout: float = 10.0) -> None:
        """Stop the group (if nobody did) and reap the local workers."""
        import subprocess

        self.workers.stop()
        for child in self.children:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout)


def _start_group(args: argparse.Namespace, launch: Any, manifest: Any) -> tuple[_Group, Any]:
    """Rank 0: start the local workers (``--workers``), join the group, build the gateway."""
    import os
    import subprocess
    import sys

    children = []
    if getattr(args, "_spawn_local", False):
        argv = [
            sys.executable, "-m", "spliteasy_cli.main", "serve", str(args.bundle),
            "--mode", "parallel", "--worker-timeout", str(args.worker_timeout),
            "--log-level", args.log_level, "--log-format", args.log_format,
            *(["--threads", str(args.threads)] if args.threads else []),
        ]  # fmt: skip
        for rank in range(1, launch.world_size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            # its own session: a Ctrl-C in the terminal reaches rank 0 only, which stops
            # the workers once it has drained and checkpointed
            children.append(subprocess.Popen(argv, env=env, start_new_session=True))
    try:
        trainer = _load_replica(args, launch, manifest, gateway=True)
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        raise
    print(
        f"spliteasy serve: B on {launch.world_size} workers (torch.distributed "
        f"{trainer.workers.backend}, rank 0 serves; {trainer.synced_batchnorms} "
        "synchronised BatchNorm(s))",
        flush=True,
    )
    return _Group(trainer.workers, children), trainer


def _check_exposure(host: str, tls: bool, keys: bool, insecure: bool) -> None:
    """Beyond loopback, tensors and tokens need TLS and session creation needs keys."""
    import sys

    from server_torch.serving import is_loopback
    from shared_schema import SpliteasyError

    if is_loopback(host) or (tls and keys):
        return
    missing = " and ".join(
        m
        for m, ok in (("TLS (--ssl-certfile/--ssl-keyfile)", tls), ("--auth-keys", keys))
        if not ok
    )
    if not insecure:
        raise SpliteasyError(
            f"--host {host} listens beyond this machine without {missing}: anyone who reaches "
            "the port could read the tensors and tokens or train B. Add them, or pass "
            "--insecure to do it anyway"
        )
    print(
        f"spliteasy serve: WARNING: listening on {host} without {missing} (--insecure): "
        "anyone who reaches the port can "
        + ("read tensors and tokens" if not tls else "create sessions and train B"),
        file=sys.stderr,
        flush=True,
    )


def _log_to_stdout(level: str, fmt: str = "text", rank: int | None = None) -> None:
    """spliteasy's own log lines (checkpoints, resume, skipped checkpoints) as CLI lines."""
    import logging
    import sys

    class Lines(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                msg = f"{record.levelname.lower()}: {msg}"
            if record.exc_info:  # a server bug: its traceback, once, under its request id
                msg += "\n" + self.formatException(record.exc_info)
            return f"spliteasy serve{'' if rank is None else f' [rank {rank}]'}: {msg}"

    from server_torch.guard import JsonLines

    class CurrentStdout(logging.StreamHandler):
        """Writes to whatever ``sys.stdout`` is when a line is logged, not the stream of
        the moment ``serve`` started: an in-process ``serve`` (tests, embedding) must not
        keep a closed capture stream alive in the logger."""

        @property  # type: ignore[override]
        def stream(self):  # noqa: D401
            return sys.stdout

        @stream.setter
        def stream(self, value) -> None:
            pass

    handler = CurrentStdout()
    handler.setFormatter(JsonLines() if fmt == "json" else Lines())
    logger = logging.getLogger("spliteasy")
    logger.handlers[:] = [handler]
    logger.propagate = False
    numeric = logging.getLevelName(level.upper())
    logger.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    # failed requests, one key=value line each with its request id; every request at debug
    logging.getLogger("spliteasy.access").setLevel(
        logging.INFO if logger.level <= logging.INFO else logger.level
    )


def _announce(app: Any, url: str, threads: int) -> None:
    m = app.state.manifest
    print(
        f"spliteasy serve: {m.model} ({m.split_mode} split, manifest {app.state.manifest_sha256[:12]}, "
        f"{threads} torch thread(s))"
    )
    ck = app.state.checkpointer
    if ck is None:
        print("spliteasy serve: no state dir (--no-state): nothing is checkpointed")
    else:
        if app.state.rounds is not None:  # parallel mode: B only, between rounds
            every = f"every {ck.every} rounds" if ck.every else "B only"
        else:
            every = f"every {ck.every} steps" if ck.every else "at session creation"
        print(f"spliteasy serve: state dir {ck.root} (checkpoint {every} and on shutdown)")
        if ck.resumed_from is not None:
            sessions = app.state.service.session_count
            print(
                f"spliteasy serve: resumed from checkpoint step {ck.last.step} written at "
                f"{ck.last.time} ({sessions} session(s))"
            )
        else:
            print("spliteasy serve: no checkpoint yet: starting from the bundle's B")
    if any(getattr(r, "path", None) == "/device" for r in app.routes):
        print(f"spliteasy serve: device page {url}/device/")
    print(f"spliteasy serve: listening on {url}", flush=True)
