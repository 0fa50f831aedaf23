"""``python -m netem``: the fault proxy as a process.

python -m netem --upstream 127.0.0.1:8000 --port 9000 --drop-before-server 0.1 --drop-after-apply 0.1
"""

from __future__ import annotations

import argparse
import signal
import threading

from .faults import Fault, FaultSchedule, path_matches
from .proxy import FaultProxy


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netem", description=__doc__.splitlines()[0])
    p.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT of the server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="regex: fault only requests whose path matches")
    for fault in Fault:
        if fault is not Fault.NONE:
            flag = "--" + fault.value.replace("_", "-")
            p.add_argument(flag, type=float, default=0.0, help=f"probability of {fault.value}")
    args = p.parse_args(argv)
    probabilities = {
        f: getattr(args, f.value) for f in Fault if f is not Fault.NONE and getattr(args, f.value)
    }
    schedule = FaultSchedule(
        probabilities=probabilities,
        seed=args.seed,
        applies_to=path_matches(args.only) if args.only else None,
    )
    proxy = FaultProxy(args.upstream, schedule, host=args.host, port=args.port).start()
    print(f"netem: listening on {proxy.url} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    proxy.stop()
    print(f"netem: {dict(proxy.counts())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
