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
    _log_to_stdout(args.log_level)
    # Cheap refusals first (a bad bundle, a taken port), then the slow part: loading B.
    manifest = load_manifest(args.bundle, verify=True)
    state_dir = None
    if not args.no_state:
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
        )
        threads = configure_threads(args.threads)
        url = url_of(sock)
        _announce(app, url, threads)
        serve_forever(app, sock, args.log_level)
    finally:
        sock.close()
    return 0


def _log_to_stdout(level: str) -> None:
    """spliteasy's own log lines (checkpoints, resume, skipped checkpoints) as CLI lines."""
    import logging
    import sys

    class Lines(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = record.getMessage()
            if record.levelno >= logging.WARNING:
                msg = f"{record.levelname.lower()}: {msg}"
            return f"spliteasy serve: {msg}"

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(Lines())
    logger = logging.getLogger("spliteasy")
    logger.handlers[:] = [handler]
    logger.propagate = False
    numeric = logging.getLevelName(level.upper())
    logger.setLevel(numeric if isinstance(numeric, int) else logging.INFO)


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
