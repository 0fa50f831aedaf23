"""``spliteasy plan MODEL --link PROFILE``: rank cut pairs by a measured cost model.

The cost of one double-split training step with cuts (i, j), batch n::

    T(i, j) = dev(A) + dev(C) + srv(B)                           compute
            + 2 x (RTT + jitter/2 x 2 + overhead)                two round trips
            + n (s_i + s_j) / up + n (s_j + s_i) / down           a and dL/db up, b and dL/da down
            + expected loss cost (lost segments x RTO)

- dev(.) and srv(.) are sums of **measured per-layer times** (forward + backward of
  each layer call on a batch of n, in topological order: ``profile_layers``). This
  machine's profile stands for the server; the device's comes from ``--device-profile
  FILE`` (a profile saved with ``--save-profile`` on the device, e.g. a phone running the
  Python device), or this machine's when none is given. Per-layer times are taken eagerly,
  one layer at a time, as the device runtimes run A and C.
- s_i is the cut tensor's bytes per sample at float32; up/down and RTT, jitter and loss
  come from the link profile (``netem.profiles``); ``--overhead-ms`` is the fixed cost of a
  round trip on loopback (HTTP, framing, checks).
- Memory: the device holds A and C's weights, gradients and optimizer slots (SGD with
  momentum: 1; Adam: 2) and every activation of A and C for the backward pass, plus
  ``--device-base-mb`` for the runtime itself (TensorFlow's import alone is ~700 MB).
  Pairs over ``--device-memory`` are dropped.

A single split (``--split single`` or ``both``) is the same with C empty: the head and
loss in B, one round trip (a and labels up, dL/da down).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "Rank the cut pairs of a model by a cost model of measured layer times and the link."

PROFILE_FORMAT = "spliteasy-layer-profile/1"


def parse_memory(text: str) -> float:
    """Megabytes from '512M', '2G', '1.5GB', '300' (MB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read a memory size from {text!r} (say 512M, 2G)")
    value, unit = float(m.group(1)), m.group(2).lower()
    return value * {"k": 1 / 1024, "m": 1, "g": 1024, "": 1}[unit]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="digits-cnn, a zoo name (spliteasy cuts --help), or a model file")
    p.add_argument("--link", default="lte", help="link profile name or JSON file (default lte)")
    p.add_argument("--input-size", type=int, default=None, help="square input size (zoo models)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument(
        "--device-memory", type=parse_memory, default=None, metavar="M", help="e.g. 512M, 2G"
    )
    p.add_argument(
        "--device-base-mb",
        type=float,
        default=0.0,
        help="memory the device runtime takes before any slice (added to every estimate)",
    )
    p.add_argument(
        "--device-profile", type=Path, help="per-layer times measured on the device (JSON)"
    )
    p.add_argument(
        "--server-profile", type=Path, help="per-layer times measured on the server (JSON)"
    )
    p.add_argument(
        "--save-profile", type=Path, help="write this machine's per-layer profile (JSON) here"
    )
    p.add_argument(
        "--device-slowdown",
        type=float,
        default=1.0,
        help="without --device-profile: the device runs layers this many times slower than "
        "this machine (default 1: the device is this machine)",
    )
    p.add_argument("--split", choices=["double", "single", "both"], default="double")
    p.add_argument(
        "--overhead-ms",
        type=float,
        default=1.5,
        help="fixed cost of one round trip besides the link (HTTP, framing, checks)",
    )
    p.add_argument("--reps", type=int, default=2, help="timings per layer (the minimum is kept)")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")


# -- per-layer profile -------------------------------------------------------------------


def profile_layers(model: Any, batch: int, reps: int = 2, seed: int = 0) -> dict[str, Any]:
    """Forward and backward milliseconds of every layer call of ``model`` on a batch.

    The model's graph is run one layer call at a time (topological order of
    ``converters.cuts.Analysis``, so entry p is the layer at cut position p), each call on
    the real output of its parents: forward alone, then forward under a tape and the
    gradient with respect to its inputs and weights for a random upstream gradient.
    The minimum over ``reps`` repetitions is kept, after one untimed round (the first
    call of a layer builds and traces). Also records each call's output bytes
    per sample and parameter count, for the memory model.
    """
    import numpy as np
    import tensorflow as tf

    from converters.cuts import Analysis

    analysis = Analysis(model)
    calls = analysis.calls
    index = {id(c.layer): i for i, c in enumerate(calls)}
    values: dict[int, Any] = {}
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.random((batch, *model.input_shape[1:]), dtype=np.float32))
    rows = []

    def value_of(kt: Any) -> Any:
        layer, _, t_index = kt._keras_history
        v = values[index[id(layer)]]
        return v[t_index] if isinstance(v, list | tuple) else v

    def is_kt(obj: Any) -> bool:
        return hasattr(obj, "_keras_history") and not isinstance(obj, tf.Tensor | tf.Variable)

    for i, call in enumerate(calls):
        layer = call.layer
        out_elems = math.prod(int(d) for d in call.shape) if call.shape else 0
        row = {
            "position": i,
            "layer": layer.name,
            "class": type(layer).__name__,
            "params": int(layer.count_params()),
            "out_bytes_per_sample": 4 * out_elems,
            "fwd_ms": 0.0,
            "bwd_ms": 0.0,
        }
        if i == analysis.input:
            values[i] = x
            rows.append(row)
            continue
        node = layer._inbound_nodes[0]
        args = tf.nest.map_structure(lambda o: value_of(o) if is_kt(o) else o, node.call_args)
        kwargs = tf.nest.map_structure(lambda o: value_of(o) if is_kt(o) else o, node.call_kwargs)
        if getattr(layer, "_expects_training_arg", False):
            kwargs = {**kwargs, "training": True}
        inputs = [t for t in tf.nest.flatten((args, kwargs)) if isinstance(t, tf.Tensor)]
        inputs = [t for t in inputs if t.dtype.is_floating]
        fwd, bwd = [], []
        out = None
        for _ in range(max(reps, 1) + 1):  # the first round builds and traces: not timed
            t0 = time.perf_counter()
            out = layer(*args, **kwargs)
            _ = [o.numpy() for o in tf.nest.flatten(out)][:0]
            fwd.append(time.perf_counter() - t0)
            weights = layer.trainable_weights
            if inputs or weights:
                t0 = time.perf_counter()
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    y = layer(*args, **kwargs)
                dy = tf.nest.map_structure(lambda o: tf.ones_like(o) * 1e-3, y)
                grads = tape.gradient(y, [*inputs, *weights], output_gradients=dy)
                _ = [g.numpy() for g in grads if g is not None][:0]
                bwd.append(max(time.perf_counter() - t0 - fwd[-1], 0.0))
        values[i] = out
        row["fwd_ms"] = 1e3 * min(fwd[1:])
        row["bwd_ms"] = 1e3 * min(bwd[1:]) if bwd else 0.0
        rows.append(row)
    return {
        "format": PROFILE_FORMAT,
        "model": model.name,
        "input_shape": [int(d) for d in model.input_shape[1:]],
        "batch": batch,
        "reps": reps,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layers": rows,
    }


def _read_doc(path: Path) -> dict[str, Any]:
    from shared_schema import SpliteasyError

    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpliteasyError(f"cannot read the layer profile {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise SpliteasyError(f"{path} is not a spliteasy layer profile ({PROFILE_FORMAT})")
    rows = doc.get("layers")
    keys = ("layer", "fwd_ms", "bwd_ms", "params", "out_bytes_per_sample")
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and all(k in r for k in keys) for r in rows
    ):
        raise SpliteasyError(f"{path}: every layer row needs {', '.join(keys)}")
    return doc


def read_profile(path: Path, layers: list[str], batch: int) -> list[float]:
    """Per-position ms (fwd + bwd) from a saved profile, checked against the model."""
    from shared_schema import SpliteasyError

    doc = _read_doc(path)
    names = [r.get("layer") for r in doc.get("layers", [])]
    if names != layers:
        raise SpliteasyError(f"{path} profiles another model (its layers differ from this one's)")
    scale = batch / max(int(doc.get("batch", batch)), 1)  # per-layer time ~ linear in batch
    return [scale * (float(r["fwd_ms"]) + float(r["bwd_ms"])) for r in doc["layers"]]


# -- the cost model ------------------------------------------------------------------------


@dataclass
class Candidate:
    cuts: tuple[str, ...]
    positions: tuple[int, ...]
    device_ms: float
    server_ms: float
    comm_ms: float
    memory_mb: float
    bytes_per_step: int

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.server_ms + self.comm_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "cuts": list(self.cuts),
            "positions": list(self.positions),
            "predicted_ms": self.total_ms,
            "device_ms": self.device_ms,
            "server_ms": self.server_ms,
            "comm_ms": self.comm_ms,
            "device_memory_mb": self.memory_mb,
            "bytes_per_step": self.bytes_per_step,
        }


class CostModel:
    """Prefix sums over per-position layer times, so any cut pair costs O(1)."""

    def __init__(
        self,
        cuts: list[Any],  # converters.cuts.CutPoint, in order
        device_ms: list[float],  # per position
        server_ms: list[float],
        profile: Any,  # netem.profiles.LinkProfile
        batch: int,
        *,
        out_bytes: list[int] | None = None,  # per position, per sample (memory model)
        params: list[int] | None = None,
        optimizer_slots: int = 1,
        overhead_ms: float = 1.5,
        base_mb: float = 0.0,
    ) -> None:
        import numpy as np

        self.cuts, self.profile, self.batch = cuts, profile, batch
        self.overhead_ms, self.base_mb, self.slots = overhead_ms, base_mb, optimizer_slots
        n = len(device_ms)
        self._dev = np.concatenate([[0.0], np.cumsum(device_ms)])
        self._srv = np.concatenate([[0.0], np.cumsum(server_ms)])
        self._act = np.concatenate([[0.0], np.cumsum(out_bytes or [0] * n)])
        self._par = np.concatenate([[0.0], np.cumsum(params or [0] * n)])
        self.n = n

    def _span(self, prefix: Any, lo: int, hi: int) -> float:
        """Sum over positions lo..hi-1."""
        return float(prefix[hi] - prefix[lo])

    def _memory_mb(self, spans: list[tuple[int, int]]) -> float:
        total = 0.0
        for lo, hi in spans:
            params = self._span(self._par, lo, hi)
            total += 4 * params * (2 + self.slots)  # weights, gradients, optimizer slots
            total += self.batch * self._span(self._act, lo, hi)  # activations for backward
        return total / 2**20 + self.base_mb

    def double(self, i: int, j: int) -> Candidate:
        """Cut pair (self.cuts[i], self.cuts[j]), i < j."""
        a, b = self.cuts[i], self.cuts[j]
        p, q, n = a.position, b.position, self.n
        s1, s2 = self.batch * a.bytes_per_sample, self.batch * b.bytes_per_sample
        up, down = s1 + s2, s2 + s1
        comm = self.profile.expected_ms(up, down, 2) + 2 * self.overhead_ms
        return Candidate(
            cuts=(a.layer, b.layer),
            positions=(p, q),
            device_ms=self._span(self._dev, 0, p + 1) + self._span(self._dev, q + 1, n),
            server_ms=self._span(self._srv, p + 1, q + 1),
            comm_ms=comm,
            memory_mb=self._memory_mb([(0, p + 1), (q + 1, n)]),
            bytes_per_step=up + down,
        )

    def single(self, i: int) -> Candidate:
        a = self.cuts[i]
        p, n = a.position, self.n
        s1 = self.batch * a.bytes_per_sample
        up, down = s1 + 4 * self.batch, s1 + 4
        comm = self.profile.expected_ms(up, down, 1) + self.overhead_ms
        return Candidate(
            cuts=(a.layer,),
            positions=(p,),
            device_ms=self._span(self._dev, 0, p + 1),
            server_ms=self._span(self._srv, p + 1, n),
            comm_ms=comm,
            memory_mb=self._memory_mb([(0, p + 1)]),
            bytes_per_step=up + down,
        )

    def rank(self, split: str = "double", memory_mb: float | None = None) -> list[Candidate]:
        out: list[Candidate] = []
        k = len(self.cuts)
        if split in ("double", "both"):
            out += [self.double(i, j) for i in range(k) for j in range(i + 1, k)]
        if split in ("single", "both"):
            out += [self.single(i) for i in range(k)]
        if memory_mb is not None:
            out = [c for c in out if c.memory_mb <= memory_mb]
        return sorted(out, key=lambda c: (round(c.total_ms, 6), c.device_ms, c.memory_mb))


def build_cost_model(
    model: Any,
    batch: int,
    link: str,
    *,
    profile_doc: dict[str, Any] | None = None,
    device_profile: Path | None = None,
    server_profile: Path | None = None,
    overhead_ms: float = 1.5,
    base_mb: float = 0.0,
    optimizer_slots: int = 1,
    reps: int = 2,
    device_slowdown: float = 1.0,
) -> tuple[CostModel, dict[str, Any]]:
    """The cost model of ``model`` on ``link``; measures this machine's per-layer profile
    unless ``profile_doc`` (an earlier measurement) is given."""
    from converters.cuts import Analysis
    from netem.profiles import load_profile

    try:
        link_profile = load_profile(link)
    except ValueError as exc:
        from shared_schema import SpliteasyError

        raise SpliteasyError(str(exc)) from None
    analysis = Analysis(model)
    if profile_doc is None and device_profile and server_profile:
        doc = _read_doc(server_profile)  # both sides given: nothing to measure here
    else:
        doc = profile_doc or profile_layers(model, batch, reps)
    here = [r["fwd_ms"] + r["bwd_ms"] for r in doc["layers"]]
    names = [c.layer.name for c in analysis.calls]
    dev = (
        read_profile(device_profile, names, batch)
        if device_profile
        else [device_slowdown * t for t in here]
    )
    srv = read_profile(server_profile, names, batch) if server_profile else here
    cm = CostModel(
        analysis.cuts(),
        dev,
        srv,
        link_profile,
        batch,
        out_bytes=[r["out_bytes_per_sample"] for r in doc["layers"]],
        params=[r["params"] for r in doc["layers"]],
        optimizer_slots=optimizer_slots,
        overhead_ms=overhead_ms,
        base_mb=base_mb,
    )
    return cm, doc


def _load(args: argparse.Namespace) -> Any:
    from converters.models import load_model

    model, _ = load_model(args.model, input_size=args.input_size, num_classes=args.num_classes)
    return model


def run(args: argparse.Namespace) -> int:
    from shared_schema import SpliteasyError

    if args.batch < 1:
        raise SpliteasyError("--batch must be >= 1")
    if args.device_slowdown <= 0:
        raise SpliteasyError("--device-slowdown must be > 0")
    model = _load(args)
    if not (args.device_profile and args.server_profile):
        print(f"profiling {model.name}'s layers at batch {args.batch} ...", file=sys.stderr)
    cm, doc = build_cost_model(
        model,
        args.batch,
        args.link,
        device_profile=args.device_profile,
        server_profile=args.server_profile,
        overhead_ms=args.overhead_ms,
        base_mb=args.device_base_mb,
        reps=args.reps,
        device_slowdown=args.device_slowdown,
    )
    if args.save_profile:
        args.save_profile.parent.mkdir(parents=True, exist_ok=True)
        args.save_profile.write_text(json.dumps(doc, indent=1))
        print(f"layer profile written to {args.save_profile}", file=sys.stderr)
    ranked = cm.rank(args.split, args.device_memory)
    total = len(cm.rank(args.split))
    if not ranked:
        raise SpliteasyError(
            f"no cut pair fits in {args.device_memory:.0f} MB of device memory "
            f"(the smallest needs {min(c.memory_mb for c in cm.rank(args.split)):.0f} MB)"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "model": model.name,
                    "batch": args.batch,
                    "link": cm.profile.to_json(),
                    "device_memory_mb": args.device_memory,
                    "candidates": total,
                    "fit_in_memory": len(ranked),
                    "ranking": [c.to_json() for c in ranked[: args.top]],
                },
                indent=1,
            )
        )
        return 0
    print(
        f"{model.name}, batch {args.batch}, link {cm.profile.describe()}; "
        f"{len(ranked)} of {total} cut choices"
        + (f" fit in {args.device_memory:.0f} MB" if args.device_memory else "")
    )
    print(
        f"{'rank':>4}  {'cuts':<44} {'step ms':>9} {'device':>8} {'server':>8} {'comm':>8} "
        f"{'dev MB':>8} {'KiB/step':>9}"
    )
    for k, c in enumerate(ranked[: args.top], 1):
        print(
            f"{k:>4}  {' | '.join(c.cuts):<44} {c.total_ms:>9.1f} {c.device_ms:>8.1f} "
            f"{c.server_ms:>8.1f} {c.comm_ms:>8.1f} {c.memory_mb:>8.1f} "
            f"{c.bytes_per_step / 1024:>9.1f}"
        )
    src = "device profile " + str(args.device_profile) if args.device_profile else "this machine"
    print(
        f"device times from {src}; server times from "
        + (str(args.server_profile) if args.server_profile else "this machine")
    )
    return 0
