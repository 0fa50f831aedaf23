"""Load tool (issue #11): N synthetic devices against one server, over HTTP or WebSocket.

::

    python benchmarks/load.py BUNDLE --devices 32 --steps 50 --transport ws --mode parallel
    python benchmarks/load.py BUNDLE --devices 8 --steps 20 --mode turns --rtt-ms 20

Starts ``spliteasy serve BUNDLE --mode MODE`` as a child process (or uses ``--server``),
then runs ``--devices`` device threads. A device here is the protocol without TF: each
step sends a random activation of A's output shape (``forward``) and a small random
gradient of B's output shape (``backward``), so the figures are the server's and the
wire's, not a device runtime's. ``--rtt-ms`` adds a round-trip delay to every message
(half before sending, half after the reply: a slow link, either transport).

Reports (JSON on stdout, one line of figures on stderr): steps sent and errors, B's
optimizer steps (rounds), rounds/s and device steps/s, p50/p99 step latency, and the
server process's CPU utilisation (CPU seconds / wall seconds, from /proc; 2.0 = both
cores of this machine). Figures, not assertions: the tests assert only 0 errors and
server steps == steps sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_load(
    url: str,
    manifest,
    digest: str,
    devices: int,
    steps: int,
    transport: str,
    batch: int,
    rtt_ms: float = 0.0,
    seed: int = 0,
) -> dict:
    """Drive ``devices`` synthetic devices for ``steps`` steps each; returns the figures."""
    from device_tf.ws_transport import make_transport
    from shared_schema import Frame, FrameKind, decode, encode

    a_spec, c_spec = manifest.server_input, manifest.server_output
    latencies: list[list[float]] = [[] for _ in range(devices)]
    errors: list[str] = []
    sent = [0] * devices
    start_gate = threading.Barrier(devices + 1)

    def delay() -> None:
        if rtt_ms > 0:
            time.sleep(rtt_ms / 2000)

    def device(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        t = make_transport(transport, url, reconnect_timeout=60, notify=lambda _m: None)
        try:
            s = t.open_session(digest)
            sid = bytes.fromhex(s.session_id)
            start_gate.wait()
            for step in range(steps):
                t0 = time.perf_counter()
                a = rng.standard_normal((batch, *a_spec.sample_shape)).astype(np.float32)
                delay()
                rep = t.exchange(
                    "forward",
                    encode([Frame(FrameKind.ACTIVATION, a_spec.name, a, a_spec.layout, sid, step)]),
                )
                delay()
                (out,) = decode(rep.body)
                g = (rng.standard_normal(out.array.shape) * 1e-3).astype(np.float32)
                delay()
                t.exchange(
                    "backward",
                    encode([Frame(FrameKind.GRADIENT, c_spec.name, g, c_spec.layout, sid, step)]),
                )
                delay()
                sent[i] += 1
                latencies[i].append((time.perf_counter() - t0) * 1e3)
            t.close_session()
        except BaseException as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"device {i}: {type(exc).__name__}: {exc}")
            if start_gate.n_waiting:
                start_gate.abort()
        finally:
            t.close()

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(devices)]
    for th in threads:
        th.start()
    try:
        start_gate.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = np.array([v for per in latencies for v in per]) if any(latencies) else np.zeros(1)
    return {
        "devices": devices,
        "transport": transport,
        "steps_sent": int(sum(sent)),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": round(wall, 3),
        "device_steps_per_s": round(sum(sent) / wall, 2) if wall > 0 else None,
        "p50_step_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_step_ms": round(float(np.percentile(lat, 99)), 2),
        "rtt_ms": rtt_ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--server", help="use this running server instead of starting one")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--transport", choices=["http", "ws"], default="http")
    p.add_argument("--mode", choices=["turns", "parallel"], default="turns")
    p.add_argument("--devices-per-round", type=int, help="parallel mode (default: --devices)")
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.add_argument("--rtt-ms", type=float, default=0.0, help="added round trip per message")
    args = p.parse_args(argv)

    from server_torch.serving import ServerProcess
    from shared_schema import load_manifest, manifest_digest

    manifest = load_manifest(args.bundle)
    digest = manifest_digest(args.bundle)
    srv = None
    url = args.server
    if url is None:
        extra = [
            "--mode",
            args.mode,
            "--session-rate",
            "0",
            "--max-sessions",
            str(max(64, 2 * args.devices)),
        ]
        if args.mode == "parallel":
            extra += ["--devices-per-round", str(args.devices_per_round or args.devices)]
            extra += ["--round-timeout", str(args.round_timeout)]
        srv = ServerProcess(args.bundle, extra).start()
        url = srv.url
    import httpx

    try:
        before = httpx.get(f"{url}/v1/health").json()["steps"]
        pid = srv.proc.pid if srv is not None and srv.proc is not None else None
        cpu0 = _cpu_seconds(pid) if pid else float("nan")
        report = run_load(
            url, manifest, digest, args.devices, args.steps, args.transport, args.batch, args.rtt_ms
        )
        cpu1 = _cpu_seconds(pid) if pid else float("nan")
        after = httpx.get(f"{url}/v1/health").json()["steps"]
    finally:
        if srv is not None:
            srv.stop()
    rounds = after - before
    report.update(
        mode=args.mode,
        server_steps=rounds,
        rounds_per_s=round(rounds / report["wall_s"], 2) if report["wall_s"] else None,
        server_cpu_utilisation=round((cpu1 - cpu0) / report["wall_s"], 3)
        if pid and report["wall_s"]
        else None,
    )
    expected = report["steps_sent"] if args.mode == "turns" else None
    report["server_steps_match"] = expected is None or rounds == expected
    print(json.dumps(report))
    print(
        f"{args.mode}/{args.transport}: {args.devices} devices x {args.steps} steps, "
        f"{report['errors']} errors; {rounds} B steps in {report['wall_s']} s "
        f"({report['rounds_per_s']} rounds/s, {report['device_steps_per_s']} device steps/s); "
        f"step p50 {report['p50_step_ms']} ms, p99 {report['p99_step_ms']} ms; "
        f"server CPU {report['server_cpu_utilisation']}",
        file=sys.stderr,
    )
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
