"""``spliteasy serve BUNDLE``: train slice B of a bundle behind the HTTP protocol (v1).

B, its optimizer and the session table are checkpointed into a state directory (default
``runs/serve-<manifest sha256[:12]>/``), so running the same command again resumes where
the last checkpoint stands (``server_torch.checkpoint``).
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
    _log_to_stdout(args.log_level, args.log_format)
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
        if args.state_dir is not None:
            raise SpliteasyError("--mode parallel keeps no checkpoints yet; drop --state-dir")
        print("spliteasy serve: --mode parallel keeps no server state (no checkpoints)")
    elif not args.no_state:
        from server_torch.checkpoint import default_state_dir
        from shared_schema import manifest_digest

        state_dir = args.state_dir or default_state_dir(manifest_digest(args.bundle))
    sock = bind_socket(args.host, args.port)
    try:
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
        )
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
        serve_forever(app, sock, args.log_level, **options)
    finally:
        sock.close()
    return 0


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


def _log_to_stdout(level: str, fmt: str = "text") -> None:
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
            return f"spliteasy serve: {msg}"

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
