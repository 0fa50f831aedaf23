"""``spliteasy bench``: the paper's Table 1 and Figure 4, measured on this machine.

::

    spliteasy bench table1 --networks resnet50 --size 64 --steps 2
    spliteasy bench cuts --network inceptionresnetv2 --link lte --max-cuts 8
    spliteasy bench breakdown --networks resnet50 mobilenetv2 --links loopback wifi lte

- ``table1``: per network, the per-image time of a double split, a single split, the
  whole network trained by TensorFlow alone (the device, no split) and by the server's
  torch alone (no split), each broken into device compute, server compute, codec and
  wire, with the bytes each step moved beside the raw float32 tensor bytes.
- ``cuts`` (Figure 4a): step time against the position of the first cut (after the
  first convolution, the first and second max-pools -- the paper's -- and later valid
  cuts), C fixed at the head; ``spliteasy plan``'s cost model is run on the same cuts
  and the report says where its choice ranks among the measured ones and how far its
  predictions are from the measurements.
- ``breakdown`` (Figures 4b, 4c): the double split's time breakdown per network and per
  link profile (``netem.profiles``), measured communication against the link's bound
  (bytes / bandwidth + RTT x round trips).

Every run writes a folder (``--out``, default ``runs/bench-<study>-<time>/``) with
``results.json``, ``report.md`` and PNG plots. How each figure is measured:
``spliteasy_cli/bench_run.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HELP = "Measure split training: the paper's Table 1 and Figure 4 (JSON, markdown, PNG plots)."

PARTS = ("device_ms", "server_ms", "codec_ms", "wire_ms")
COLORS = {
    "device_ms": "#4c72b0",
    "server_ms": "#dd8452",
    "codec_ms": "#55a868",
    "wire_ms": "#c44e52",
}
MIN_SIZE = {"inceptionv3": 75, "inceptionresnetv2": 75}
PAPER_NETWORKS = (
    "resnet50",
    "resnet152",
    "densenet121",
    "densenet201",
    "inceptionv3",
    "inceptionresnetv2",
)
NETWORKS = (*PAPER_NETWORKS, "mobilenetv2")


def _common(p: argparse.ArgumentParser, *, size: int, batch: int) -> None:
    p.add_argument("--size", type=int, default=size, help="square input size (default %(default)s)")
    p.add_argument("--batch", type=int, default=batch, help="batch size (default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="server torch threads (default: half the cores, as serve)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="run folder (default runs/bench-<study>-<time>)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache/bench-bundles"),
        help="converted bundles kept here across runs (default %(default)s)",
    )
    p.add_argument("--no-cache", action="store_true", help="convert into a temporary folder")
    p.add_argument("--no-progress", action="store_true")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    t1 = sub.add_parser("table1", help="per-image time of double/single/no split (Table 1)")
    t1.add_argument("--networks", nargs="+", default=list(NETWORKS), metavar="NET")
    t1.add_argument("--link", default="loopback", help="link profile (default loopback)")
    t1.add_argument(
        "--bundle",
        type=Path,
        help="measure this converted double-split bundle (no conversion): its double split "
        "and its unsplit model in TF; --single-bundle adds a single split",
    )
    t1.add_argument("--single-bundle", type=Path, help="with --bundle: a single-split bundle")
    _common(t1, size=96, batch=16)
    cu = sub.add_parser("cuts", help="time against the first cut's position (Figure 4a)")
    cu.add_argument("--network", default="inceptionresnetv2")
    cu.add_argument("--link", default="loopback", help="link profile (default loopback)")
    cu.add_argument("--every", type=int, default=1, help="every K-th later cut (default 1)")
    cu.add_argument("--max-cuts", type=int, default=None, help="at most N first cuts in all")
    cu.add_argument(
        "--overhead-ms", type=float, default=1.5, help="plan: fixed cost per round trip"
    )
    _common(cu, size=75, batch=16)
    br = sub.add_parser("breakdown", help="time breakdown per network and link (Figure 4b/4c)")
    br.add_argument("--networks", nargs="+", default=["resnet50", "mobilenetv2"], metavar="NET")
    br.add_argument(
        "--links", nargs="+", default=["loopback", "lan", "wifi", "lte", "tunnel"], metavar="LINK"
    )
    br.add_argument("--bundle", type=Path, help="measure this double-split bundle (no conversion)")
    _common(br, size=96, batch=16)
    from .bench_memory import add_parser as _memory_parser

    _memory_parser(sub)  # device peak memory, split against unsplit (bench_memory.py)


# -- progress ---------------------------------------------------------------------------


class Progress:
    """tqdm on stderr (off with --no-progress or when stderr is not a terminal)."""

    def __init__(self, total: int, disable: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, desc="bench", file=sys.stderr, disable=True if disable else None
        )

    def stage(self, text: str) -> None:
        self.bar.set_description_str(text[:60])

    def tick(self, _what: str = "") -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# -- shared helpers -----------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    from netem.profiles import load_profile
    from shared_schema import SpliteasyError

    for name in ("batch", "steps", "size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SpliteasyError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise SpliteasyError("--warmup must be >= 0")
    for link in getattr(args, "links", None) or [args.link]:
        try:
            load_profile(link)
        except ValueError as exc:
            raise SpliteasyError(str(exc)) from None
    nets = getattr(args, "networks", None) or [getattr(args, "network", None)]
    unknown = [n for n in nets if n and n not in NETWORKS and n != "digits-cnn"]
    if unknown and getattr(args, "bundle", None) is None:
        raise SpliteasyError(f"unknown network(s) {unknown}; choose from {', '.join(NETWORKS)}")


def _size(net: str, size: int) -> int | None:
    if net == "digits-cnn":
        return None
    return max(size, MIN_SIZE.get(net, 32))


def _settings(args: argparse.Namespace, link: str) -> Any:
    from .bench_run import Settings

    return Settings(
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        link=link,
        threads=args.threads,
        seed=args.seed,
    )


def _run_dir(args: argparse.Namespace) -> Path:
    out = args.out or Path("runs") / f"bench-{args.study}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _machine() -> dict[str, Any]:
    import os
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in load],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _kib(v: float) -> str:
    return f"{v / 1024:,.1f}"


# -- table 1 ------------------------------------------------------------------------------


def _table1(args: argparse.Namespace, out: Path, bar: Progress) -> dict[str, Any]:
    from converters.models import load_model

    from .bench_run import (
        BundleCache,
        measure_split,
        measure_tf_alone,
        measure_torch_alone,
        stem_head_cuts,
        unsplit_model,
        whole_network_bundle,
    )

    settings = _settings(args, args.link)
    cache = BundleCache(None if args.no_cache else args.cache, seed=args.seed)
    rows: list[dict[str, Any]] = []
    try:
        if args.bundle is not None:
            from shared_schema import load_manifest

            manifest = load_manifest(args.bundle)
            net = manifest.model
            row: dict[str, Any] = {"network": net, "size": manifest.input.sample_shape[0]}
            bar.stage(f"{net}: double split")
            row["double"] = measure_split(args.bundle, settings, tick=bar.tick).to_json()
            if args.single_bundle is not None:
                bar.stage(f"{net}: single split")
                row["single"] = measure_split(args.single_bundle, settings, tick=bar.tick).to_json()
            model, from_logits = unsplit_model(args.bundle)
            bar.stage(f"{net}: TF alone")
            row["tf_alone"] = measure_tf_alone(model, from_logits, settings, bar.tick)
            rows.append(row)
        for net in [] if args.bundle is not None else args.networks:
            size = _size(net, args.size)
            model, from_logits = load_model(net, input_size=size, seed=args.seed)
            c1, c2 = stem_head_cuts(model)
            row = {"network": net, "size": size}
            bar.stage(f"{net}: converting double split")
            double = cache.get(net, size, [c1, c2])
            bar.tick()
            bar.stage(f"{net}: converting single split")
            single = cache.get(net, size, [c1])
            bar.tick()
            bar.stage(f"{net}: converting whole (torch alone)")
            whole = whole_network_bundle(cache, net, size, model)
            bar.tick()
            bar.stage(f"{net}: double split")
            row["double"] = measure_split(double, settings, tick=bar.tick).to_json()
            bar.stage(f"{net}: single split")
            row["single"] = measure_split(single, settings, tick=bar.tick).to_json()
            bar.stage(f"{net}: TF alone")
            row["tf_alone"] = measure_tf_alone(model, from_logits, settings, bar.tick)
            bar.stage(f"{net}: torch alone")
            row["torch_alone"] = measure_torch_alone(whole, settings, bar.tick)
            rows.append(row)
            _write_table1(out, args, rows)  # a long study leaves its rows as it goes
    finally:
        cache.cleanup()
    return _write_table1(out, args, rows)


def _table1_rows(r: dict[str, Any], batch: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, {per-image parts, bytes}) rows of one network."""
    out = []
    for key, label in (("double", "double split"), ("single", "single split")):
        if key in r:
            s = r[key]
            out.append(
                (
                    label,
                    {
                        **{p: s[p] / batch for p in PARTS},
                        "total_ms": s["total_ms"] / batch,
                        "bytes": s["bytes_up"] + s["bytes_down"],
                        "raw_bytes": s["raw_bytes"],
                        "bound_ms": s["bound_ms"],
                        "cpu_s": s["device_cpu_s"] + s["server_cpu_s"],
                        "cuts": " / ".join(s["cuts"]),
                    },
                )
            )
    if "tf_alone" in r:
        t = r["tf_alone"]
        c = t["compiled"]
        out.append(
            (
                "no split, TF alone (device)",
                {
                    "device_ms": c["total_ms"] / batch,
                    "server_ms": 0.0,
                    "codec_ms": 0.0,
                    "wire_ms": 0.0,
                    "total_ms": c["total_ms"] / batch,
                    "eager_ms": t["eager"]["total_ms"] / batch,
                    "cpu_s": c["cpu_s"],
                },
            )
        )
    if "torch_alone" in r:
        t = r["torch_alone"]
        out.append(
            (
                "no split, torch alone (server)",
                {
                    "device_ms": 0.0,
                    "server_ms": t["total_ms"] / batch,
                    "codec_ms": 0.0,
                    "wire_ms": 0.0,
                    "total_ms": t["total_ms"] / batch,
                    "cpu_s": t["cpu_s"],
                },
            )
        )
    return out


def _write_table1(out: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict:
    doc = {
        "study": "table1",
        "machine": _machine(),
        "settings": {
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "link": args.link,
            "size": args.size,
            "threads": args.threads,
        },
        "networks": rows,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    b = args.batch
    lines = [
        f"# Table 1: per-image training time (batch {b}, link {args.link}, "
        f"mean of {args.steps} steps after {args.warmup} warm-up)",
        "",
        f"Machine: {doc['machine']['cpus']} CPUs, load average {doc['machine']['load_average']} "
        f"at {doc['machine']['time_utc']}.",
        "",
        "| network (px) | configuration | ms / image | device | server | codec | wire "
        "| KiB / step (raw f32) | CPU s / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for label, v in _table1_rows(r, b):
            total = _ms(v["total_ms"])
            if "eager_ms" in v:
                total += f" (eager {_ms(v['eager_ms'])})"
            kib = f"{_kib(v['bytes'])} ({_kib(v['raw_bytes'])})" if "bytes" in v else "-"
            wire = _ms(v["wire_ms"])
            if v.get("bound_ms"):
                wire += f" (bound {_ms(v['bound_ms'] / b)})"
            lines.append(
                f"| {r['network']} ({r['size']}) | {label} | {total} | {_ms(v['device_ms'])} "
                f"| {_ms(v['server_ms'])} | {_ms(v['codec_ms'])} | {wire} "
                f"| {kib} | {v['cpu_s']:.2f} |"
            )
    lines += [
        "",
        "Times in ms per image (step time / batch). device: A and C (Python TF runtime, eager); "
        "server: B's compute as the server reports it (X-Spliteasy-Server-Ms); codec: the "
        "device's frame encode/decode; wire: the rest of each round trip (HTTP, the server's "
        "framing and checks, the link), with the link profile's floor (bytes / bandwidth + "
        "RTT x round trips) when shaped. TF alone: one tf.function training step of the whole "
        "network (eager in parentheses); torch alone: the server's trainer on the whole "
        "network but its first layer, no HTTP. CPU s / step: device + server processes.",
    ]
    cuts = [
        f"- {r['network']}: double {' / '.join(r['double']['cuts'])}"
        + (f"; torch alone from {r['torch_alone']['first_cut']}" if "torch_alone" in r else "")
        for r in rows
        if "double" in r
    ]
    if cuts:
        lines += ["", "Cuts:", *cuts]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot_table1(out / "table1.png", rows, b)
    return doc


def _plot_table1(path: Path, rows: list[dict[str, Any]], batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, data = [], []
    for r in rows:
        for label, v in _table1_rows(r, batch):
            labels.append(f"{r['network']}: {label}")
            data.append(v)
    if not data:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(data) + 1.5))
    left = [0.0] * len(data)
    for part in PARTS:
        widths = [d[part] for d in data]
        ax.barh(labels, widths, left=left, color=COLORS[part], label=part.replace("_ms", ""))
        left = [a + w for a, w in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per image")
    ax.set_title(f"Per-image training time, batch {batch}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- figure 4a: cut position ----------------------------------------------------------------


def _cuts(args: argparse.Namespace, out: Path, bar: Progress) -> dict[str, Any]:
    from converters.models import load_model
    from shared_schema import SpliteasyError

    from .bench_run import BundleCache, measure_split, sweep_cuts
    from .plan import build_cost_model

    settings = _settings(args, args.link)
    size = _size(args.network, args.size)
    model, _ = load_model(args.network, input_size=size, seed=args.seed)
    shown = size or int(model.input_shape[1])
    firsts, head = sweep_cuts(model, args.every, args.max_cuts)
    bar.bar.total = len(firsts) * (1 + args.warmup + args.steps) + 1
    bar.bar.refresh()
    cache = BundleCache(None if args.no_cache else args.cache, seed=args.seed)
    bar.stage("profiling layers for plan")
    cm, profile = build_cost_model(model, args.batch, args.link, overhead_ms=args.overhead_ms)
    bar.tick()
    (out / "layer-profile.json").write_text(json.dumps(profile, indent=1))
    index = {c.layer: i for i, c in enumerate(cm.cuts)}
    points: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    try:
        for layer, pos, why in firsts:
            bar.stage(f"converting cut {layer}")
            try:
                bundle = cache.get(args.network, size, [layer, head])
            except SpliteasyError as exc:  # e.g. a slice B the converter cannot verify
                refused.append({"layer": layer, "position": pos, "why": why, "error": str(exc)})
                bar.tick()
                for _ in range(args.warmup + args.steps):
                    bar.tick()
                continue
            bar.tick()
            bar.stage(f"measuring cut {layer}")
            m = measure_split(bundle, settings, tick=bar.tick).to_json()
            pred = cm.double(index[layer], index[head])
            points.append({"layer": layer, "position": pos, "why": why, "measured": m,
                           "predicted": pred.to_json()})  # fmt: skip
            _write_cuts(out, args, shown, head, points, cm, refused)
    finally:
        cache.cleanup()
    return _write_cuts(out, args, shown, head, points, cm, refused)


def _plan_verdict(points: list[dict[str, Any]]) -> dict[str, Any]:
    if not points:
        return {}
    measured = sorted(points, key=lambda p: p["measured"]["total_ms"])
    choice = min(points, key=lambda p: p["predicted"]["predicted_ms"])
    rank = [p["layer"] for p in measured].index(choice["layer"]) + 1
    best = measured[0]
    errors = [
        abs(p["predicted"]["predicted_ms"] - p["measured"]["total_ms"]) / p["measured"]["total_ms"]
        for p in points
    ]
    return {
        "plan_choice": choice["layer"],
        "plan_choice_rank": rank,
        "measured_cuts": len(points),
        "best_measured": best["layer"],
        "choice_vs_best": choice["measured"]["total_ms"] / best["measured"]["total_ms"],
        "choice_prediction_error": abs(
            choice["predicted"]["predicted_ms"] - choice["measured"]["total_ms"]
        )
        / choice["measured"]["total_ms"],
        "median_prediction_error": sorted(errors)[len(errors) // 2],
    }


def _write_cuts(
    out: Path,
    args: argparse.Namespace,
    size: int | None,
    head: str,
    points: list,
    cm: Any,
    refused: list | None = None,
) -> dict:
    verdict = _plan_verdict(points)
    best_pairs = cm.rank("double")[:5]
    doc = {
        "study": "cuts",
        "machine": _machine(),
        "network": args.network,
        "size": size,
        "settings": {"batch": args.batch, "steps": args.steps, "link": args.link},
        "second_cut": head,
        "points": points,
        "refused": refused or [],
        "plan": verdict,
        "plan_overall_top5": [c.to_json() for c in best_pairs],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Figure 4a: step time against the first cut ({args.network}, {size} px, batch "
        f"{args.batch}, link {args.link}, C from {head})",
        "",
        f"Machine: {doc['machine']['cpus']} CPUs, load average {doc['machine']['load_average']}.",
        "",
        "| pos | first cut | why | step ms | device | server | codec | wire | bound | KiB/step "
        "| CPU ms (device + server) | plan predicts | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        m, pr = p["measured"], p["predicted"]
        err = (pr["predicted_ms"] - m["total_ms"]) / m["total_ms"]
        lines.append(
            f"| {p['position']} | {p['layer']} | {p['why']} | {_ms(m['total_ms'])} "
            f"| {_ms(m['device_ms'])} | {_ms(m['server_ms'])} | {_ms(m['codec_ms'])} "
            f"| {_ms(m['wire_ms'])} | {_ms(m['bound_ms'])} | {_kib(m['bytes_up'] + m['bytes_down'])} "
            f"| {1e3 * m['device_cpu_s']:.0f} + {1e3 * m['server_cpu_s']:.0f} "
            f"| {_ms(pr['predicted_ms'])} | {err:+.0%} |"
        )
    if verdict:
        lines += [
            "",
            f"Plan: among these {verdict['measured_cuts']} measured cuts the cost model picks "
            f"**{verdict['plan_choice']}**, which ranks **{verdict['plan_choice_rank']}** by "
            f"measured step time ({verdict['choice_vs_best']:.2f}x the best, "
            f"{verdict['best_measured']}); its predicted step time is "
            f"{verdict['choice_prediction_error']:.0%} off the measurement (median error over "
            f"the cuts {verdict['median_prediction_error']:.0%}).",
        ]
    for r in refused or []:
        lines.append(f"- not measured: {r['layer']} (position {r['position']}): {r['error']}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot_cuts(out / "cuts.png", points, args)
    return doc


def _plot_cuts(path: Path, points: list, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = list(range(len(points)))
    bottom = [0.0] * len(points)
    for part in PARTS:
        h = [p["measured"][part] for p in points]
        ax.bar(xs, h, bottom=bottom, color=COLORS[part], label=part.replace("_ms", ""))
        bottom = [a + b for a, b in zip(bottom, h, strict=True)]
    ax.plot(xs, [p["predicted"]["predicted_ms"] for p in points], "k.--", label="plan predicts")
    ax.set_xticks(xs, [f"{p['layer']} ({p['position']})" for p in points], rotation=60,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("ms per step")
    ax.set_title(f"{args.network}: step time by first cut, batch {args.batch}, link {args.link}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- figure 4b/4c: breakdown ---------------------------------------------------------------


def _breakdown(args: argparse.Namespace, out: Path, bar: Progress) -> dict[str, Any]:
    from converters.models import load_model

    from .bench_run import BundleCache, measure_split, start_server, stem_head_cuts

    cache = BundleCache(None if args.no_cache else args.cache, seed=args.seed)
    results: list[dict[str, Any]] = []
    try:
        for net in [None] if args.bundle is not None else args.networks:
            if net is None:
                from shared_schema import load_manifest

                bundle = args.bundle
                manifest = load_manifest(bundle)
                net, size = manifest.model, manifest.input.sample_shape[0]
            else:
                size = _size(net, args.size)
                model, _ = load_model(net, input_size=size, seed=args.seed)
                cuts = stem_head_cuts(model)
                bar.stage(f"{net}: converting")
                bundle = cache.get(net, size, list(cuts))
            bar.tick()
            server = start_server(bundle, _settings(args, "loopback"))  # one for every link
            try:
                for link in args.links:
                    bar.stage(f"{net} over {link}")
                    settings = _settings(args, link)
                    m = measure_split(bundle, settings, tick=bar.tick, server=server).to_json()
                    results.append({"network": net, "size": size, "link": link, **m})
                    _write_breakdown(out, args, results)
            finally:
                server.stop()
    finally:
        cache.cleanup()
    return _write_breakdown(out, args, results)


def _write_breakdown(out: Path, args: argparse.Namespace, results: list) -> dict:
    doc = {
        "study": "breakdown",
        "machine": _machine(),
        "settings": {"batch": args.batch, "steps": args.steps, "size": args.size},
        "results": results,
    }
    lines = [
        f"# Figures 4b/4c: double-split step breakdown per network and link (batch {args.batch}, "
        f"mean of {args.steps} steps)",
        "",
        f"Machine: {doc['machine']['cpus']} CPUs, load average {doc['machine']['load_average']}.",
        "",
        "| network (px) | link | step ms | device | server | codec | wire | link bound "
        "| wire / bound | (wire - loopback wire) / bound | expected (+ jitter, loss) "
        "| KiB up / down |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    loop = {r["network"]: r["wire_ms"] for r in results if r["link"] == "loopback"}
    for r in results:
        ratio = f"{r['wire_ms'] / r['bound_ms']:.2f}" if r["bound_ms"] > 0 else "-"
        excess = "-"
        if r["bound_ms"] > 0 and r["network"] in loop:
            excess = f"{(r['wire_ms'] - loop[r['network']]) / r['bound_ms']:.2f}"
            r["link_share_over_bound"] = (r["wire_ms"] - loop[r["network"]]) / r["bound_ms"]
        lines.append(
            f"| {r['network']} ({r['size']}) | {r['link']} | {_ms(r['total_ms'])} "
            f"| {_ms(r['device_ms'])} | {_ms(r['server_ms'])} | {_ms(r['codec_ms'])} "
            f"| {_ms(r['wire_ms'])} | {_ms(r['bound_ms'])} | {ratio} | {excess} "
            f"| {_ms(r['expected_ms'])} | {_kib(r['bytes_up'])} / {_kib(r['bytes_down'])} |"
        )
    lines += [
        "",
        "link bound: bytes / bandwidth each way + RTT x round trips (2 per double-split step) "
        "of the profile, the floor no link with that profile can beat; wire is everything "
        "between sending a request and its reply that is not B's compute (the link, HTTP, "
        "the server's framing and checks). loopback connects directly, the other profiles "
        "through `python -m netem --profile P`; wire - loopback wire is the link's own "
        "share (the proxy's relay included), set against the bound; expected adds the "
        "profile's mean jitter and the expected cost of lost segments (an RTO each).",
    ]
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot_breakdown(out, results, args)
    return doc


def _plot_breakdown(out: Path, results: list, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    nets = list(dict.fromkeys(r["network"] for r in results))
    fig, axes = plt.subplots(1, len(nets), figsize=(4.5 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets, strict=True):
        rs = [r for r in results if r["network"] == net]
        xs = list(range(len(rs)))
        bottom = [0.0] * len(rs)
        for part in PARTS:
            h = [r[part] for r in rs]
            ax.bar(xs, h, bottom=bottom, color=COLORS[part], label=part.replace("_ms", ""))
            bottom = [a + b for a, b in zip(bottom, h, strict=True)]
        base = [r["device_ms"] + r["server_ms"] + r["codec_ms"] for r in rs]
        ax.plot(xs, [b + r["bound_ms"] for b, r in zip(base, rs, strict=True)], "k_",
                markersize=18, markeredgewidth=2, label="wire floor (link bound)")  # fmt: skip
        ax.set_xticks(xs, [r["link"] for r in rs])
        ax.set_title(f"{net} ({rs[0]['size']} px)")
        ax.set_ylabel("ms per step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Double-split step by link (Fig. 4c), batch {args.batch}")
    fig.tight_layout()
    fig.savefig(out / "breakdown_links.png", dpi=110)
    plt.close(fig)
    first = args.links[0]
    rs = [r for r in results if r["link"] == first]
    fig, ax = plt.subplots(figsize=(1.6 * len(rs) + 3, 4))
    xs = list(range(len(rs)))
    bottom = [0.0] * len(rs)
    for part in PARTS:
        h = [r[part] for r in rs]
        ax.bar(xs, h, bottom=bottom, color=COLORS[part], label=part.replace("_ms", ""))
        bottom = [a + b for a, b in zip(bottom, h, strict=True)]
    ax.set_xticks(xs, [r["network"] for r in rs])
    ax.set_ylabel("ms per step")
    ax.set_title(f"Double-split step by network (Fig. 4b), link {first}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "breakdown_networks.png", dpi=110)
    plt.close(fig)


# -- entry ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    _check(args)
    out = _run_dir(args)
    per_measure = args.warmup + args.steps
    if args.study == "table1":
        n = 1 if args.bundle is not None else len(args.networks)
        convs = 0 if args.bundle is not None else 3
        total = n * (convs + per_measure * (2 if args.bundle is None or args.single_bundle else 1)
                     + 2 * per_measure + (per_measure if args.bundle is None else 0))  # fmt: skip
    elif args.study == "breakdown":
        n = 1 if args.bundle is not None else len(args.networks)
        total = n * (1 + len(args.links) * per_measure)
    elif args.study == "memory":
        n = 1 if args.bundle is not None else len(args.networks)
        total = 1 + n * (3 + (2 if args.cap is not None else 0))
    else:
        total = 0
    bar = Progress(total, args.no_progress)
    try:
        if args.study == "table1":
            _table1(args, out, bar)
        elif args.study == "cuts":
            _cuts(args, out, bar)
        elif args.study == "memory":
            from .bench_memory import run_memory

            run_memory(args, out, bar)
        else:
            _breakdown(args, out, bar)
    finally:
        bar.close()
    print((out / "report.md").read_text())
    pngs = ", ".join(p.name for p in sorted(out.glob("*.png")))
    print(f"run folder: {out} (results.json, report.md, {pngs})")
    return 0
