"""B on 2 workers vs 1 (issue #11): the same parallel-mode load, and where the time goes.

::

    python benchmarks/workers_speed.py BUNDLE [BUNDLE ...] --devices 4 --batch 16 --steps 20

For each bundle, back to back: ``spliteasy serve BUNDLE --mode parallel
--devices-per-round N`` with one process, then with ``--workers 2`` (rank 0 + one worker
on this machine, gloo over loopback), each driven by ``benchmarks/load.py``'s synthetic
devices (the protocol without TF: random activations and gradients of the cut shapes),
so the figures are the server's. Reported per configuration (JSON on stdout, a markdown
table on stderr):

- rounds/s and device steps/s, p50/p99 step latency (wall clock, on whatever else this
  machine runs: compare the ratio, not the absolute figures);
- server CPU seconds per round, all ranks together (from /proc: rank 0 and the worker
  it started), the fair cost figure on a loaded machine;
- B per round on rank 0 (``spliteasy_b_compute_seconds``, forward + backward), and with
  2 workers its parts (``/v1/health`` ``workers.timings_s``): *send* (the header and the
  shards to the worker), *local* (rank 0's own shard, including the BatchNorm and
  gradient all-reduces, i.e. waiting for the worker inside DDP), *gather* (the worker's
  results back) and *bn allreduce* (the BatchNorm statistics' all-reduces alone).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _b_seconds(metrics: str) -> float:
    """Sum of spliteasy_b_compute_seconds over forward and backward."""
    total = 0.0
    for m in re.finditer(r'^spliteasy_b_compute_seconds_sum\{op="\w+"\} (\S+)$', metrics, re.M):
        total += float(m.group(1))
    return total


def measure(bundle: Path, workers: int, devices: int, steps: int, batch: int) -> dict:
    import httpx
    from load import _cpu_seconds, run_load

    from server_torch.serving import ServerProcess
    from shared_schema import load_manifest, manifest_digest

    manifest, digest = load_manifest(bundle), manifest_digest(bundle)
    extra = [
        "--mode", "parallel", "--devices-per-round", str(devices), "--round-timeout", "60",
        "--session-rate", "0", "--threads", "1",
    ]  # fmt: skip
    if workers > 1:
        extra += ["--workers", str(workers)]
    with ServerProcess(bundle, extra) as srv:
        assert srv.proc is not None
        pids = [srv.proc.pid, *_children(srv.proc.pid)]
        # one warm-up round each (first-call allocations, DDP's bucket rebuild)
        run_load(srv.url, manifest, digest, devices, 1, "http", batch)
        h0 = httpx.get(f"{srv.url}/v1/health").json()
        b0 = _b_seconds(httpx.get(f"{srv.url}/metrics").text)
        cpu0 = sum(_cpu_seconds(p) for p in pids)
        report = run_load(srv.url, manifest, digest, devices, steps, "http", batch)
        cpu1 = sum(_cpu_seconds(p) for p in pids)
        b1 = _b_seconds(httpx.get(f"{srv.url}/metrics").text)
        h1 = httpx.get(f"{srv.url}/v1/health").json()
    rounds = h1["steps"] - h0["steps"]
    out = {
        "bundle": manifest.model,
        "cuts": [manifest.server_input.name, manifest.server_output.name],
        "workers": workers,
        "devices": devices,
        "batch": batch,
        "round_batch": devices * batch,
        "rounds": rounds,
        "errors": report["errors"],
        "wall_s": report["wall_s"],
        "rounds_per_s": round(rounds / report["wall_s"], 3),
        "device_steps_per_s": report["device_steps_per_s"],
        "p50_step_ms": report["p50_step_ms"],
        "p99_step_ms": report["p99_step_ms"],
        "server_cpu_s_per_round": round((cpu1 - cpu0) / max(rounds, 1), 4),
        "b_ms_per_round": round((b1 - b0) / max(rounds, 1) * 1e3, 2),
    }
    if workers > 1:
        t0, t1 = h0["workers"]["timings_s"], h1["workers"]["timings_s"]
        parts = {}
        for part in ("send", "local", "gather"):
            spent = sum(t1[op][part] - t0[op][part] for op in ("forward", "backward"))
            parts[f"{part}_ms_per_round"] = round(spent / max(rounds, 1) * 1e3, 2)
        parts["bn_allreduce_ms_per_round"] = round(
            (t1["bn_allreduce"] - t0["bn_allreduce"]) / max(rounds, 1) * 1e3, 2
        )
        out.update(parts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="samples per device per round")
    p.add_argument("--steps", type=int, default=20, help="rounds measured per configuration")
    p.add_argument("--repeat", type=int, default=1, help="1 worker / 2 workers pairs per bundle")
    args = p.parse_args(argv)
    rows = []
    for bundle in args.bundles:
        for _ in range(args.repeat):
            for w in (1, 2):
                row = measure(bundle, w, args.devices, args.steps, args.batch)
                rows.append(row)
                print(json.dumps(row), flush=True)
    head = (
        "| B | workers | round batch | rounds/s | p50 step ms | server CPU s/round | "
        "B ms/round | send | local | gather | BN all-reduce |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['bundle']} {r['cuts'][0]}→{r['cuts'][1]} | {r['workers']} | {r['round_batch']} "
            f"| {r['rounds_per_s']} | {r['p50_step_ms']} | {r['server_cpu_s_per_round']} "
            f"| {r['b_ms_per_round']} | {r.get('send_ms_per_round', '')} "
            f"| {r.get('local_ms_per_round', '')} | {r.get('gather_ms_per_round', '')} "
            f"| {r.get('bn_allreduce_ms_per_round', '')} |"
        )
    for i in range(0, len(rows) - 1, 2):
        one, two = rows[i], rows[i + 1]
        lines.append(
            f"\n{one['bundle']}: 2 workers / 1 = {two['rounds_per_s'] / one['rounds_per_s']:.2f}x "
            f"rounds/s, {two['server_cpu_s_per_round'] / one['server_cpu_s_per_round']:.2f}x "
            "server CPU per round"
        )
    print("\n".join(lines), file=sys.stderr)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
