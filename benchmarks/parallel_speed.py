"""Parallel vs turns with real devices behind a slow link (issue #11's benchmark target).

::

    python benchmarks/parallel_speed.py BUNDLE --devices 8 --rtt-ms 20 --batch 16
    python benchmarks/parallel_speed.py BUNDLE --runtime tflite --repeat 2 --json runs/ps.json

The target: "8 devices behind a 20 ms round-trip link: parallel mode finishes an epoch
at least 3x faster than turns mode on this 2-core machine". For each mode this starts
``spliteasy serve BUNDLE --mode turns|parallel`` (a child process), one ``netem`` proxy
per device on 127.0.0.1 with a :class:`netem.link.ShapedLink` of ``--rtt-ms`` round
trip (half each way, unlimited bandwidth; every message of that device's connection
crosses it), and ``--devices`` device *processes*. Each device is the real device loop
(:class:`device_tf.loop.SplitTrainer` with a :mod:`device_tf` runtime, the HTTP or
WebSocket transport, and in parallel mode the A/C averaging of
:mod:`device_tf.parallel` every ``sync_every`` rounds, as ``spliteasy train`` does) on
its own 1/N shard of the digits training set (1437 samples; the remainder after equal
shards is dropped so every device has the same number of steps).

What is timed: one epoch, from the moment every device has loaded its runtime and data
and warmed up (one local step on a copy of its state, then restored: TF's first-call
tracing is not the protocol's cost) until the last device has finished its last step.
Process start-up (importing TF: several CPU seconds per device) is reported beside it,
not inside it, for both modes alike.

Where the time goes (JSON on stdout; a table on stderr): per mode the epoch's wall time,
steps and rounds, each device's mean step split into device compute, server compute (B,
as the server reports it), codec and the rest of the round trips (link + waiting for B
or for the round), the sync time (parallel), the CPU seconds of the devices, the server
and this process (the proxies) during the epoch, as a share of the machine's 2 cores,
and the server's lease-wait and B-compute totals from ``/metrics``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- one device process ------------------------------------------------------------------


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def device_main(args: argparse.Namespace) -> int:
    """A device process: load the runtime and its shard, warm up, say ``ready``; then for
    each ``open URL`` line start from the initial weights with a new session there (say
    ``opened``), for each ``go`` train one epoch and print its figures as one JSON line;
    ``quit`` ends it. The same processes serve every mode's epochs, back to back."""
    t_start = time.perf_counter()
    import numpy as np

    from device_tf.factory import make_runtime
    from device_tf.loop import SplitTrainer
    from device_tf.parallel import sync_slices
    from device_tf.runtime import RuntimeState
    from device_tf.ws_transport import make_transport
    from shared_schema import load_manifest, manifest_digest

    bundle = Path(args.bundle)
    manifest = load_manifest(bundle)
    digest = manifest_digest(bundle)
    if args.runtime == "tflite" and args.device_threads:
        from device_tf.tflite_runtime import TFLiteRuntime

        # one interpreter thread: 8 devices share 2 cores (XNNPACK's pool spins otherwise)
        runtime = TFLiteRuntime.from_bundle(bundle, manifest, num_threads=args.device_threads)
    else:
        runtime = make_runtime(args.runtime, bundle, manifest)
    batches = _shard_batches(args.shard, args.of, args.batch, args.seed)
    # warm-up: one local step (TF traces its functions on the first call), then undo it
    initial = runtime.state()
    a = runtime.a_forward(batches[0][0])
    b_shape = (len(batches[0][0]), *manifest.server_output.sample_shape)
    runtime.c_train(np.zeros(b_shape, np.float32), batches[0][1])
    runtime.a_backward(np.zeros_like(a))
    runtime.load_state(RuntimeState(initial.slices, initial.optimizer))
    load_s = time.perf_counter() - t_start
    print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
    transport = trainer = parallel = None
    for line in sys.stdin:
        command, _, url = line.strip().partition(" ")
        if command == "open":
            runtime.load_state(RuntimeState(initial.slices, initial.optimizer))
            transport = make_transport(args.transport, url, notify=lambda m: None)
            parallel = transport.health().get("parallel")
            trainer = SplitTrainer(runtime, transport, manifest, digest)
            trainer.open()
            print(json.dumps({"opened": True}), flush=True)
        elif command == "go" and trainer is not None and transport is not None:
            cpu0, t0 = _cpu_self(), time.perf_counter()
            steps, syncs = [], []
            every = int(parallel["sync_every"]) if parallel else 0
            for i, (bx, by) in enumerate(batches):
                r = trainer.step(bx, by)
                steps.append(r.to_dict())
                if every and (i + 1) % every == 0:
                    ts = time.perf_counter()
                    sync_slices(transport, runtime, len(syncs), len(bx))
                    syncs.append((time.perf_counter() - ts) * 1e3)
            wall, cpu = time.perf_counter() - t0, _cpu_self() - cpu0
            trainer.close()
            transport.close()
            figures = {"wall_s": wall, "cpu_s": cpu, "steps": steps, "sync_ms": syncs}
            print(json.dumps(figures), flush=True)
        else:
            break
    sys.stdout.flush()
    os._exit(0)  # TF's interpreter teardown can take long on a loaded machine: not ours


def _shard_batches(shard: int, of: int, batch: int, seed: int) -> list:
    """Device ``shard``'s batches of one epoch: its 1/``of`` of the digits training set
    (equal shards; the remainder is dropped), shuffled by (seed, shard)."""
    import numpy as np

    from shared_schema.demo_data import load_digits_split

    x, y, _, _ = load_digits_split()
    per = len(x) // of
    x, y = x[shard * per : (shard + 1) * per], y[shard * per : (shard + 1) * per]
    order = np.random.default_rng([seed, shard]).permutation(per)
    return [(x[order[i : i + batch]], y[order[i : i + batch]]) for i in range(0, per, batch)]


# -- the driver ----------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _metric_sums(text: str) -> dict[str, float]:
    """The ``_sum`` and ``_count`` series of the histograms we report, summed over labels."""
    want = ("spliteasy_lease_wait_seconds", "spliteasy_b_compute_seconds")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for w in want:
            if name in (f"{w}_sum", f"{w}_count"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def start_devices(args: argparse.Namespace) -> tuple[list[subprocess.Popen], float]:
    """``args.devices`` device processes, loaded and warmed up; (processes, seconds)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    if args.device_threads:
        env["TF_NUM_INTRAOP_THREADS"] = env["TF_NUM_INTEROP_THREADS"] = str(args.device_threads)
        env["OMP_NUM_THREADS"] = str(args.device_threads)
    t0 = time.perf_counter()
    devices = []
    for i in range(args.devices):
        cmd = [sys.executable, __file__, str(args.bundle), "--device", "--shard", str(i)]
        cmd += ["--of", str(args.devices), "--batch", str(args.batch), "--seed", str(args.seed)]
        cmd += ["--runtime", args.runtime, "--transport", args.transport]
        cmd += ["--device-threads", str(args.device_threads)]
        devices.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None if args.verbose else subprocess.DEVNULL,
                text=True,
                env=env,
                cwd=REPO,
            )
        )
    ready = [json.loads(d.stdout.readline() or "{}") for d in devices]
    if not all(r.get("ready") for r in ready):
        stop_devices(devices)
        raise RuntimeError(f"a device did not start: {ready}")
    return devices, time.perf_counter() - t0


def stop_devices(devices: list[subprocess.Popen]) -> None:
    for d in devices:
        try:
            if d.poll() is None:
                d.stdin.write("quit\n")
                d.stdin.flush()
            d.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            d.kill()


def _tell(devices: list[subprocess.Popen], lines: list[str]) -> list[dict]:
    """Send each device its line, then read one JSON line from each."""
    for d, line in zip(devices, lines, strict=True):
        d.stdin.write(line + "\n")
        d.stdin.flush()
    return [json.loads(d.stdout.readline() or "{}") for d in devices]


def run_mode(args: argparse.Namespace, label: str, devices: list[subprocess.Popen]) -> dict:
    """One epoch of the devices against a fresh server in mode ``label`` (``turns``,
    ``parallel`` or ``parallel:K``: A and C averaged every K rounds), each device behind
    its own link."""
    mode, _, every = label.partition(":")
    sync_every = int(every) if every else args.sync_every
    import httpx
    import numpy as np

    from netem.link import ShapedLink
    from netem.profiles import LinkProfile
    from netem.proxy import FaultProxy
    from server_torch.serving import ServerProcess

    n = len(devices)
    extra = ["--mode", mode, "--session-rate", "0", "--max-sessions", str(max(64, 4 * n))]
    if mode == "parallel":
        extra += ["--devices-per-round", str(n), "--sync-every", str(sync_every)]
        extra += ["--round-timeout", str(args.round_timeout)]
    srv = ServerProcess(args.bundle, extra).start()
    port = int(srv.url.rsplit(":", 1)[1])
    profile = LinkProfile(f"rtt{args.rtt_ms:g}", None, None, latency_ms=args.rtt_ms / 2)
    proxies = [
        FaultProxy(("127.0.0.1", port), link=ShapedLink(profile, seed=i)).start() for i in range(n)
    ]
    try:
        opened = _tell(devices, [f"open {p.url}" for p in proxies])
        if not all(o.get("opened") for o in opened):
            raise RuntimeError(f"a device could not open its session: {opened}")
        metrics0 = _metric_sums(httpx.get(f"{srv.url}/metrics").text)
        steps0 = httpx.get(f"{srv.url}/v1/health").json()["steps"]
        cpu_srv0, cpu_me0 = _proc_cpu(srv.proc.pid), _cpu_self()
        t0 = time.perf_counter()
        results = _tell(devices, ["go"] * n)
        wall = time.perf_counter() - t0
        cpu_srv, cpu_me = _proc_cpu(srv.proc.pid) - cpu_srv0, _cpu_self() - cpu_me0
        metrics = _metric_sums(httpx.get(f"{srv.url}/metrics").text)
        b_steps = httpx.get(f"{srv.url}/v1/health").json()["steps"] - steps0
    finally:
        for p in proxies:
            p.stop()
        srv.stop()
    if any("steps" not in r for r in results):
        raise RuntimeError(f"a device failed: {results}")
    recs = [s for r in results for s in r["steps"]]

    def mean(key: str) -> float:
        return float(np.mean([s[key] for s in recs]))

    sync = [v for r in results for v in r["sync_ms"]]
    # The link's floor: in turns B's lease spans one round trip of every step (forward
    # reply down, backward up) and steps are serial; a parallel round needs forward,
    # backward and (every K rounds) sync round trips in sequence.
    rtt = args.rtt_ms / 1e3
    link_floor = (
        len(recs) * rtt if mode == "turns" else b_steps * (2 + 1 / max(sync_every, 1)) * rtt
    )
    if mode == "parallel" and sync_every == 0:
        link_floor = b_steps * 2 * rtt
    dev_cpu = sum(r["cpu_s"] for r in results)
    delta = {k: metrics.get(k, 0.0) - metrics0.get(k, 0.0) for k in metrics}
    return {
        "mode": label,
        "sync_every": sync_every if mode == "parallel" else None,
        "epoch_s": round(wall, 3),
        "device_steps": len(recs),
        "b_steps": b_steps,
        "step_ms": {
            "total": round(mean("total_ms"), 2),
            "device": round(mean("device_ms"), 2),
            "server": round(mean("server_ms"), 2),
            "codec": round(mean("codec_ms"), 2),
            "wire_and_wait": round(mean("wire_ms"), 2),
        },
        "sync_ms_mean": round(float(np.mean(sync)), 2) if sync else None,
        "cpu_s": {
            "devices": round(dev_cpu, 2),
            "server": round(cpu_srv, 2),
            "proxies_and_driver": round(cpu_me, 2),
        },
        "cpu_share_of_2_cores": round((dev_cpu + cpu_srv + cpu_me) / (2 * wall), 3),
        "device_cpu_ms_per_step": round(1e3 * dev_cpu / max(len(recs), 1), 2),
        "link_floor_s": round(link_floor, 3),
        "server": {
            "lease_wait_s": round(delta.get("spliteasy_lease_wait_seconds_sum", 0.0), 3),
            "lease_waits": int(delta.get("spliteasy_lease_wait_seconds_count", 0)),
            "b_compute_s": round(delta.get("spliteasy_b_compute_seconds_sum", 0.0), 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, nargs="?")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=16, help="samples per device step")
    p.add_argument("--runtime", choices=["tf", "tflite"], default="tf")
    p.add_argument("--transport", choices=["http", "ws"], default="http")
    p.add_argument("--sync-every", type=int, default=1)
    p.add_argument(
        "--round-timeout",
        type=float,
        default=300.0,
        help="long, so a device slowed by the machine's load is waited for, not dropped",
    )
    p.add_argument(
        "--device-threads",
        type=int,
        default=1,
        help="TF threads per device process (8 devices share 2 cores; 0: TF's default)",
    )
    p.add_argument(
        "--modes",
        default="turns,parallel",
        help="comma-separated, run in this order each repeat: turns, parallel, parallel:K "
        "(parallel averaging A and C every K rounds)",
    )
    p.add_argument("--repeat", type=int, default=1, help="alternate the modes this many times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--verbose", action="store_true", help="show the devices' stderr")
    # internal: one device process
    p.add_argument("--device", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device:
        return device_main(args)
    if args.bundle is None:
        p.error("BUNDLE is required")
    modes = [m for m in args.modes.split(",") if m]
    runs: list[dict] = []
    devices, startup = start_devices(args)
    print(
        f"{args.devices} device processes ({args.runtime}) loaded and warmed up in {startup:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    try:
        for _ in range(args.repeat):
            for mode in modes:
                try:
                    r = run_mode(args, mode, devices)
                except Exception as exc:  # noqa: BLE001 - a loaded machine: report, go on
                    print(f"{mode}: failed: {exc}"[:2000], file=sys.stderr, flush=True)
                    runs.append({"mode": mode, "error": str(exc)[:2000]})
                    continue
                runs.append(r)
                print(
                    f"{mode:8s} epoch {r['epoch_s']:7.2f} s  {r['device_steps']} device steps, "
                    f"{r['b_steps']} B steps; step {r['step_ms']}; sync {r['sync_ms_mean']} ms; "
                    f"cpu {r['cpu_s']} ({r['cpu_share_of_2_cores']:.0%} of 2 cores); "
                    f"server {r['server']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stop_devices(devices)
    done = [r for r in runs if "epoch_s" in r]
    best = {m: min(r["epoch_s"] for r in done if r["mode"] == m) for m in {r["mode"] for r in done}}
    report = {
        "devices": args.devices,
        "rtt_ms": args.rtt_ms,
        "batch": args.batch,
        "runtime": args.runtime,
        "transport": args.transport,
        "sync_every": args.sync_every,
        "device_threads": args.device_threads,
        "device_startup_s": round(startup, 2),
        "load_average": os.getloadavg(),
        # if devices, server and proxies took no time: turns pays one RTT per device step,
        # parallel (2 + 1/K) RTTs per round of N device steps
        "link_bound_speedup": {
            m: round(args.devices / (2 + 1 / int(m.partition(":")[2] or args.sync_every)), 2)
            for m in modes
            if m.startswith("parallel") and int(m.partition(":")[2] or args.sync_every) > 0
        },
        "runs": runs,
    }
    # each parallel run against the turns run just before it (back to back)
    ratios: dict[str, list[float]] = {}
    last_turns = None
    for r in runs:
        if "epoch_s" not in r:
            if r["mode"] == "turns":
                last_turns = None  # no back-to-back partner
            continue
        if r["mode"] == "turns":
            last_turns = r["epoch_s"]
        elif last_turns is not None:
            ratios.setdefault(r["mode"], []).append(round(last_turns / r["epoch_s"], 2))
    report["speedup_over_turns"] = ratios
    report["best_epoch_s"] = best
    for label, values in ratios.items():
        print(
            f"{label} speed-up over turns (epoch wall, back to back): "
            f"{', '.join(f'{v:.2f}x' for v in values)}",
            file=sys.stderr,
        )
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
