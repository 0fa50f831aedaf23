"""``python -m netem``: the fault and link-shaping proxy as a process.

python -m netem --upstream 127.0.0.1:8000 --port 9000 --profile lte
python -m netem --upstream 127.0.0.1:8000 --port 9000 --drop-before-server 0.1 --drop-after-apply 0.1

Point any device at the proxy's URL instead of the server's -- ``spliteasy train
--server``, ``node train.mjs --server``, or a browser at ``http://127.0.0.1:9000/device/``
-- and every request, reply and WebSocket byte crosses the shaped link.
"""

from __future__ import annotations

import argparse
import signal
import threading

from .faults import Fault, FaultSchedule, path_matches
from .link import Link, ShapedLink
from .profiles import PROFILES, load_profile
from .proxy import FaultProxy


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m netem",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="link profiles:\n" + "\n".join(f"  {pr.describe()}" for pr in PROFILES.values()),
    )
    p.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT of the server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="regex: fault only requests whose path matches")
    shape = p.add_argument_group("link shaping")
    shape.add_argument(
        "--profile",
        default=None,
        help=f"link profile: {', '.join(PROFILES)}, or a JSON file with the same fields",
    )
    shape.add_argument("--up-mbps", type=float, help="override: device -> server Mbit/s")
    shape.add_argument("--down-mbps", type=float, help="override: server -> device Mbit/s")
    shape.add_argument("--latency-ms", type=float, help="override: one-way latency")
    shape.add_argument("--jitter-ms", type=float, help="override: extra one-way delay 0..J ms")
    shape.add_argument("--loss", type=float, help="override: TCP segment loss probability")
    for fault in Fault:
        if fault is not Fault.NONE:
            flag = "--" + fault.value.replace("_", "-")
            p.add_argument(flag, type=float, default=0.0, help=f"probability of {fault.value}")
    args = p.parse_args(argv)
    overrides = {
        "up_mbps": args.up_mbps,
        "down_mbps": args.down_mbps,
        "latency_ms": args.latency_ms,
        "jitter_ms": args.jitter_ms,
        "loss": args.loss,
    }
    link: Link = Link()
    profile = None
    if args.profile is not None or any(v is not None for v in overrides.values()):
        try:
            profile = load_profile(args.profile or "loopback").with_overrides(**overrides)
        except ValueError as exc:
            p.error(str(exc))
        link = ShapedLink(profile, seed=args.seed)
    probabilities = {
        f: getattr(args, f.value) for f in Fault if f is not Fault.NONE and getattr(args, f.value)
    }
    schedule = FaultSchedule(
        probabilities=probabilities,
        seed=args.seed,
        applies_to=path_matches(args.only) if args.only else None,
    )
    proxy = FaultProxy(args.upstream, schedule, host=args.host, port=args.port, link=link).start()
    print(f"netem: listening on {proxy.url} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
    if profile is not None:
        print(f"netem: link {profile.describe()}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    proxy.stop()
    print(f"netem: {dict(proxy.counts())}")
    if isinstance(link, ShapedLink):
        for d, s in link.stats().items():
            print(
                f"netem: {d}: {s.messages} messages, {s.bytes} bytes, "
                f"{s.lost_segments} segments lost",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
