"""``spliteasy bench memory``: the device process's peak memory, split against unsplit.

::

    spliteasy bench memory --networks digits-cnn resnet50 --size 64 --batch 16 --steps 3
    spliteasy bench memory --networks resnet50 --size 64 --cap auto

Every figure comes from a separate, fresh Python process (``python -m
spliteasy_cli.bench_memory child ...``) that reads its own ``/proc/self/status`` at the
end: ``VmHWM``, the resident-set high-water mark (the whole process: interpreter,
TensorFlow's libraries, models, activations, optimizer slots), and ``VmPeak``, the peak
of its virtual address space. The processes are

- ``import``: TensorFlow and tf_keras imported, nothing else (the floor every TF device
  pays);
- ``split``: the Python TF device runtime training the double-split bundle (A and C,
  eager GradientTape, as ``spliteasy train``) against a real ``spliteasy serve`` child
  over HTTP on loopback, for ``--steps`` steps of ``--batch``;
- ``split-recompute``: the same with ``--recompute-a`` (``tf.recompute_grad`` on A);
- ``unsplit``: the same model (the bundle's ``unsplit/model.json``) trained whole by
  tf_keras in the process, eagerly with GradientTape and the same optimizer, loss and
  batch.

**The cap.** ``--cap MB`` (or ``auto``: halfway between the split and unsplit processes'
measured ``VmPeak``) runs the split and unsplit processes again under
``RLIMIT_AS`` (``setrlimit`` in the child before it starts: what ``prlimit --as`` does).
RLIMIT_AS limits the *virtual* address space, not resident memory: TensorFlow reserves
far more address space than it touches (thread stacks, malloc arenas, mapped
libraries), so the cap must be set against ``VmPeak``, not ``VmHWM``; it is the cap an
unprivileged process can put on itself here (no cgroup is ours to make). A process that
exceeds it fails its allocation (``ResourceExhaustedError``, ``MemoryError`` or
``std::bad_alloc``): the report gives each process's exit and its last error line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("import", "split", "split-recompute", "unsplit")


def add_parser(sub: Any) -> None:
    """Register ``memory`` beside the other bench studies (called by ``bench.py``)."""
    from .bench import _common

    me = sub.add_parser("memory", help="device peak memory: double split against unsplit")
    me.add_argument("--networks", nargs="+", default=["digits-cnn", "resnet50"], metavar="NET")
    me.add_argument(
        "--cap",
        default=None,
        help="also run split and unsplit under RLIMIT_AS of this many MB ('auto': halfway "
        "between their measured VmPeak)",
    )
    me.add_argument("--no-recompute", action="store_true", help="skip the --recompute-a row")
    me.add_argument("--bundle", type=Path, help="measure this double-split bundle instead")
    _common(me, size=64, batch=16)
    me.set_defaults(link="loopback")


# -- the measured child process -------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, VmPeak of this process in KiB."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "VmPeak"):
            out[key] = int(rest.split()[0])
    return out


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_memory child")
    p.add_argument("mode", choices=MODES)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--server")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap-mb", type=float)
    a = p.parse_args(argv)
    if a.cap_mb:
        import resource

        cap = int(a.cap_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    result: dict[str, Any] = {"mode": a.mode, "after_import": _status()}
    losses: list[float] = []
    if a.mode != "import":
        from shared_schema import load_manifest

        manifest = load_manifest(a.bundle)
        rng = np.random.default_rng(a.seed)
        x = rng.random((a.batch, *manifest.input.sample_shape), dtype=np.float32)
        y = (np.arange(a.batch) % manifest.num_classes).astype(np.int32)
        if a.mode == "unsplit":
            from device_tf.keras_util import keras_loss, keras_optimizer

            from .bench_run import unsplit_model

            model, _ = unsplit_model(a.bundle)
            opt = keras_optimizer(manifest.optimizer)
            loss_fn = keras_loss(manifest.loss)
            xt, yt = tf.constant(x), tf.constant(y)
            for _ in range(a.steps):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yt, model(xt, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
                losses.append(float(loss))
        else:
            from device_tf.factory import make_runtime
            from device_tf.loop import SplitTrainer
            from device_tf.transport import HttpTransport
            from shared_schema import manifest_digest

            runtime = make_runtime(
                "tf", a.bundle, manifest, recompute_a=a.mode == "split-recompute"
            )
            transport = HttpTransport(
                a.server, timeout=600, reconnect_timeout=60, notify=lambda _m: None
            )
            trainer = SplitTrainer(runtime, transport, manifest, manifest_digest(a.bundle))
            try:
                for _ in range(a.steps):
                    losses.append(float(trainer.step(x, y).loss))
                trainer.close()
            finally:
                transport.close()
        del keras
    result["final"] = _status()
    result["losses"] = losses
    print("BENCH_MEMORY " + json.dumps(result), flush=True)
    return 0


def measure(
    mode: str,
    *,
    bundle: Path | None = None,
    server: str | None = None,
    batch: int = 16,
    steps: int = 3,
    seed: int = 0,
    cap_mb: float | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run one child process; its figures, or how it failed (exit code, last error line)."""
    cmd = [sys.executable, "-m", "spliteasy_cli.bench_memory", "child", mode]
    cmd += ["--batch", str(batch), "--steps", str(steps), "--seed", str(seed)]
    if bundle is not None:
        cmd += ["--bundle", str(bundle)]
    if server is not None:
        cmd += ["--server", server]
    if cap_mb is not None:
        cmd += ["--cap-mb", str(cap_mb)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out: dict[str, Any] = {
        "mode": mode,
        "cap_mb": cap_mb,
        "exit": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_MEMORY "):
            out.update(json.loads(line[len("BENCH_MEMORY ") :]))
    if "final" in out:
        out["ok"] = proc.returncode == 0
        out["peak_rss_mb"] = out["final"]["VmHWM"] / 1024
        out["peak_virtual_mb"] = out["final"]["VmPeak"] / 1024
        out["import_rss_mb"] = out["after_import"]["VmHWM"] / 1024
    else:
        out["ok"] = False
        lines = [s for s in (proc.stderr or "").splitlines() if s.strip()]
        errs = [s for s in lines if "Error" in s or "bad_alloc" in s or "Killed" in s]
        out["error"] = (errs or lines or ["(no output)"])[-1][:300]
    return out


# -- the study ----------------------------------------------------------------------------


def _bundle_for(net: str, args: argparse.Namespace, cache: Any) -> Path:
    from converters.models import builtin_cuts, load_model

    from .bench import _size
    from .bench_run import stem_head_cuts

    if net == "digits-cnn":
        return cache.get(net, None, list(builtin_cuts(net)))
    size = _size(net, args.size)
    model, _ = load_model(net, input_size=size, seed=args.seed)
    return cache.get(net, size, list(stem_head_cuts(model)))


def run_memory(args: argparse.Namespace, out: Path, bar: Any) -> dict[str, Any]:
    from shared_schema import SpliteasyError, load_manifest

    from .bench import _machine, _settings
    from .bench_run import BundleCache, start_server

    cap_arg = args.cap
    if cap_arg not in (None, "auto"):
        try:
            if float(cap_arg) <= 0:
                raise ValueError
        except ValueError:
            raise SpliteasyError(
                f"--cap takes a positive number of MB or 'auto', not {cap_arg!r}"
            ) from None
    settings = _settings(args, "loopback")
    cache = BundleCache(None if args.no_cache else args.cache, seed=args.seed)
    kw = {"batch": args.batch, "steps": args.steps, "seed": args.seed}
    bar.stage("TF import floor")
    floor = measure("import")
    bar.tick()
    rows: list[dict[str, Any]] = []
    try:
        targets = [args.bundle] if args.bundle is not None else args.networks
        for target in targets:
            if isinstance(target, Path):
                bundle = target
            else:
                bar.stage(f"{target}: converting")
                bundle = _bundle_for(target, args, cache)
            manifest = load_manifest(bundle)
            net = manifest.model
            row: dict[str, Any] = {
                "network": net,
                "size": manifest.input.sample_shape[0],
                "cuts": [c.name for c in manifest.cuts],
                "batch": args.batch,
                "steps": args.steps,
            }
            srv = start_server(bundle, settings)
            try:
                modes = ["split"] + ([] if args.no_recompute else ["split-recompute"])
                for mode in [*modes, "unsplit"]:
                    bar.stage(f"{net}: {mode}")
                    row[mode] = measure(mode, bundle=bundle, server=srv.url, **kw)
                    bar.tick()
                if cap_arg is not None:
                    s, u = row["split"], row["unsplit"]
                    if cap_arg == "auto":
                        if (
                            not (s["ok"] and u["ok"])
                            or s["peak_virtual_mb"] >= u["peak_virtual_mb"]
                        ):
                            row["capped"] = {"skipped": "no cap lies between split and unsplit"}
                            rows.append(row)
                            continue
                        cap = round((s["peak_virtual_mb"] + u["peak_virtual_mb"]) / 2)
                    else:
                        cap = float(cap_arg)
                    row["capped"] = {"cap_mb": cap}
                    for mode in ("split", "unsplit"):
                        bar.stage(f"{net}: {mode} under RLIMIT_AS {cap:.0f} MB")
                        row["capped"][mode] = measure(
                            mode, bundle=bundle, server=srv.url, cap_mb=cap, **kw
                        )
                        bar.tick()
            finally:
                srv.stop()
            rows.append(row)
    finally:
        cache.cleanup()
    result = {"study": "memory", "machine": _machine(), "import_floor": floor, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(report(result))
    _plot(out, result)
    return result


def _mb(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:,.0f}" if r.get("ok") else "failed"


def report(result: dict[str, Any]) -> str:
    floor = result["import_floor"]
    lines = [
        "# Device peak memory: double split against unsplit (whole process)",
        "",
        f"TensorFlow + tf_keras import alone: {_mb(floor, 'peak_rss_mb')} MB resident "
        f"(VmPeak {_mb(floor, 'peak_virtual_mb')} MB virtual).",
        "",
        "| network | size | batch | process | peak RSS MB (VmHWM) | above import MB | "
        "VmPeak MB | unsplit / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        un = row["unsplit"]
        for mode in ("split", "split-recompute", "unsplit"):
            r = row.get(mode)
            if r is None:
                continue
            ratio = f"{un['peak_rss_mb'] / r['peak_rss_mb']:.2f}x" if r["ok"] and un["ok"] else "-"
            above = f"{r['peak_rss_mb'] - r['import_rss_mb']:,.0f}" if r["ok"] else "-"
            name = {"split": "double split", "split-recompute": "double split, --recompute-a"}
            lines.append(
                f"| {row['network']} | {row['size']} | {row['batch']} | {name.get(mode, mode)} | "
                f"{_mb(r, 'peak_rss_mb')} | {above} | {_mb(r, 'peak_virtual_mb')} | {ratio} |"
            )
    capped = [r for r in result["rows"] if "capped" in r]
    if capped:
        lines += ["", "Under RLIMIT_AS (virtual address space cap, set in the child):", ""]
        lines += ["| network | cap MB | process | outcome | peak RSS MB |", "|---|---|---|---|---|"]
        for row in capped:
            c = row["capped"]
            if "skipped" in c:
                lines.append(f"| {row['network']} | - | - | {c['skipped']} | - |")
                continue
            for mode in ("split", "unsplit"):
                r = c[mode]
                outcome = (
                    f"trained {len(r['losses'])} steps (loss {r['losses'][-1]:.4f})"
                    if r["ok"]
                    else f"failed (exit {r['exit']}): {r.get('error', '')[:120]}"
                )
                lines.append(
                    f"| {row['network']} | {c['cap_mb']:,.0f} | {mode} | {outcome} | "
                    f"{_mb(r, 'peak_rss_mb')} |"
                )
    m = result["machine"]
    lines += ["", f"Machine: {m['cpus']} CPUs, load average {m['load_average']}, {m['time_utc']}."]
    return "\n".join(lines) + "\n"


def _plot(out: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        return
    floor = result["import_floor"].get("peak_rss_mb", 0.0)
    modes = [m for m in ("split", "split-recompute", "unsplit") if m in rows[0]]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows) * len(modes) / 2, 3.6))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        vals = [r[mode].get("peak_rss_mb", 0.0) if r[mode]["ok"] else 0.0 for r in rows]
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, vals, width, label=mode)
    ax.axhline(floor, color="grey", ls="--", lw=1, label="TF import alone")
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{r['network']} {r['size']}px b{r['batch']}" for r in rows])
    ax.set_ylabel("peak RSS of the device process (MB)")
    ax.set_title("Device peak memory")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit("usage: spliteasy bench memory ... (the module's own entry is for its children)")
