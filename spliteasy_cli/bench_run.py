"""The measurements behind ``spliteasy bench``: real bundles, a real server, a real device.

Every split figure comes from the components a user runs: the bundle is converted by
``converters.bundle.write_bundle`` (kept in a cache, ``.cache/bench-bundles/``, keyed by
the conversion's arguments and the converter's sources), ``spliteasy serve`` runs as a
child process on 127.0.0.1, an optional ``python -m netem --profile P`` child shapes the
link between them, and the Python TF device runtime trains through
``device_tf.loop.SplitTrainer``, whose per-step timings (device compute, the server's
``X-Spliteasy-Server-Ms``, the device's encode/decode, and the rest of each round trip
as wire) are the figures reported. The unsplit baselines run the same network alone:
tf_keras in this process (a compiled ``tf.function`` step and an eager one), and torch
on the single-split bundle cut at the network's first valid cut (B is then the whole
network but its first layer, as the server would train it).

Times are wall clock on whatever else the machine runs; CPU seconds per step of the
device process and of the server process are recorded beside them (steadier on a
shared machine).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared_schema import SpliteasyError

from .bench import NETWORKS, PAPER_NETWORKS  # noqa: F401 - re-exported for bench's callers

REPO = Path(__file__).resolve().parents[1]
CONVERTER_SOURCES = ("converters", "server_torch/passes")


class BenchError(SpliteasyError):
    """A benchmark that cannot run as asked (a bad cut, a server that did not start)."""


# -- which cuts --------------------------------------------------------------------------


def _cut_classes(model: Any) -> tuple[Any, list[Any], list[str]]:
    from converters.cuts import Analysis

    analysis = Analysis(model)
    cuts = analysis.cuts()
    classes = [type(analysis.calls[c.position].layer).__name__ for c in cuts]
    return analysis, cuts, classes


def stem_head_cuts(model: Any) -> tuple[str, str]:
    """The paper's double split: A = the stem up to its first max-pool (or the first valid
    cut after the first convolution when there is none), C = the head after the last
    rank-4 valid cut (global pooling + classifier)."""
    analysis, cuts, classes = _cut_classes(model)
    if len(cuts) < 2:
        raise BenchError(f"{model.name} has fewer than two valid cuts")
    first = next((c for c, k in zip(cuts, classes, strict=True) if k == "MaxPooling2D"), None)
    if first is None:
        conv = next(
            (i for i, c in enumerate(analysis.calls) if type(c.layer).__name__ == "Conv2D"), 0
        )
        first = next((c for c in cuts if c.position > conv), cuts[0])
    rank4 = [c for c in cuts if len(c.shape) == 3 and c.position > first.position]
    last = rank4[-1] if rank4 else cuts[-1]
    if last.position <= first.position:
        raise BenchError(f"{model.name}: no second cut after {first.layer}")
    return first.layer, last.layer


def first_cuts(model: Any, n: int = 3) -> list[str]:
    """The first valid cuts: a single split at the first leaves (nearly) the whole network
    to B; the next ones are fallbacks should the converter refuse a slice A that small."""
    _, cuts, _ = _cut_classes(model)
    return [c.layer for c in cuts[:n]]


def whole_network_bundle(cache: BundleCache, net: str, size: int | None, model: Any) -> Path:
    """A single-split bundle cut as early as the converter accepts (torch alone's B)."""
    errors = []
    for cut in first_cuts(model):
        try:
            return cache.get(net, size, [cut])
        except SpliteasyError as exc:
            errors.append(f"{cut}: {exc}")
    raise BenchError(f"{net}: no early single split converts: {'; '.join(errors)}")


def sweep_cuts(model: Any, every: int = 1, max_cuts: int | None = None) -> tuple[list, str]:
    """Figure 4a's first cuts: after the first convolution block, the first and second
    max-pools (the paper's), then every ``every``-th later valid cut before the head; and
    the fixed second cut (the head). Returns ([(layer, position, why)], second cut)."""
    analysis, cuts, classes = _cut_classes(model)
    _, head = stem_head_cuts(model)
    head_pos = analysis.by_name[head]
    conv = next((i for i, c in enumerate(analysis.calls) if type(c.layer).__name__ == "Conv2D"), 0)
    after_conv = next(
        (
            c
            for c, k in zip(cuts, classes, strict=True)
            if c.position > conv and k in ("Activation", "ReLU")
        ),
        next((c for c in cuts if c.position >= conv), cuts[0]),
    )
    pools = [c for c, k in zip(cuts, classes, strict=True) if k == "MaxPooling2D"]
    chosen: list[tuple[str, int, str]] = [(after_conv.layer, after_conv.position, "first conv")]
    for i, p in enumerate(pools[:2]):
        chosen.append((p.layer, p.position, f"max-pool {i + 1}"))
    last = max(pos for _, pos, _ in chosen)
    head_params = next(c.params_before for c in cuts if c.layer == head)
    # B must train something: a cut right before the head (B = an activation) is skipped
    later = [c for c in cuts if last < c.position < head_pos and c.params_before < head_params]
    picked = later[::every] if every > 1 else later
    if max_cuts is not None and len(picked) > max(max_cuts - len(chosen), 0):
        n = max(max_cuts - len(chosen), 0)
        idx = np.unique(np.linspace(0, len(later) - 1, n).round().astype(int)) if n else []
        picked = [later[i] for i in idx]
    chosen += [(c.layer, c.position, "later") for c in picked]
    chosen = [c for c in chosen if c[1] < head_pos]
    return sorted(set(chosen), key=lambda c: c[1]), head


# -- bundles -----------------------------------------------------------------------------


def _sources_digest() -> str:
    h = hashlib.sha256()
    for rel in CONVERTER_SOURCES:
        for f in sorted((REPO / rel).rglob("*.py")):
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class BundleCache:
    """Converted bundles kept across bench runs (a conversion takes 10-70 s)."""

    root: Path | None  # None: a temporary directory for this run only
    seed: int = 0
    _tmp: Path | None = None

    def _dir(self) -> Path:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._sweep(self.root)
            return self.root
        if self._tmp is None:
            import tempfile

            self._tmp = Path(tempfile.mkdtemp(prefix="spliteasy-bench-"))
        return self._tmp

    @staticmethod
    def _sweep(root: Path) -> None:
        """Remove half-written conversions of bench processes that no longer run."""
        for tmp in root.iterdir():
            m = re.search(r"\.tmp(\d+)", tmp.name)
            if m is None:
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def get(self, net: str, size: int | None, cuts: Sequence[str], classes: int = 10) -> Path:
        from converters.bundle import write_bundle
        from converters.models import load_model
        from shared_schema import SGDSpec, load_manifest

        key_doc = {
            "net": net,
            "size": size,
            "cuts": list(cuts),
            "classes": classes,
            "seed": self.seed,
            "optimizer": "sgd-0.01-0.9",
            "sources": _sources_digest(),
        }
        key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:20]
        out = self._dir() / f"{net}-{size}-{'-'.join(c.replace('/', '_') for c in cuts)}-{key}"
        if (out / "manifest.json").is_file():
            try:
                load_manifest(out)
                return out
            except Exception:  # a stale or torn entry: convert again
                shutil.rmtree(out, ignore_errors=True)
        model, from_logits = load_model(net, input_size=size, num_classes=classes, seed=self.seed)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_bundle(
            model,
            list(cuts),
            tmp,
            model_name=net,
            optimizer=SGDSpec(learning_rate=0.01, momentum=0.9),
            from_logits=from_logits,
            runtimes=("tf",),
            seed=self.seed,
        )
        (tmp / "bench-key.json").write_text(json.dumps(key_doc, indent=1))
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out


# -- processes: the server and the link proxy --------------------------------------------


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class NetemProcess:
    """``python -m netem --upstream URL --profile P`` as a child process."""

    def __init__(self, upstream_url: str, profile: str, seed: int = 0) -> None:
        m = re.match(r"https?://([^:/]+):(\d+)", upstream_url)
        if not m:
            raise BenchError(f"cannot proxy {upstream_url}")
        self.args = [
            sys.executable, "-m", "netem", "--upstream", f"{m.group(1)}:{m.group(2)}",
            "--profile", profile, "--seed", str(seed),
        ]  # fmt: skip
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 30.0) -> NetemProcess:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m and not self.url:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.stop()
            raise BenchError("the netem proxy did not start:\n" + "".join(self.output))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- one measured configuration ------------------------------------------------------------


@dataclass
class Settings:
    batch: int = 16
    steps: int = 3
    warmup: int = 1
    link: str = "loopback"
    threads: int | None = None  # torch intra-op threads of the server (default: serve's own)
    seed: int = 0

    def server_threads(self) -> int:
        """As ``spliteasy serve`` defaults: half the cores (the device shares the machine;
        oversubscribed OpenMP threads stall badly on a busy one)."""
        return self.threads or max(1, (os.cpu_count() or 1) // 2)


@dataclass
class Split:
    """A split configuration's measured step (means over the measured steps)."""

    config: str  # "double" or "single"
    cuts: list[str]
    batch: int
    link: str
    steps: int
    device_ms: float
    server_ms: float
    codec_ms: float
    wire_ms: float
    total_ms: float
    bytes_up: float
    bytes_down: float
    raw_bytes: int  # the float32 tensors' bytes per step (no framing)
    round_trips: int
    bound_ms: float  # bytes/bandwidth + RTT x round trips of the link profile
    expected_ms: float  # the bound + mean jitter + expected loss cost
    device_cpu_s: float  # CPU seconds per step of this (device) process
    server_cpu_s: float  # CPU seconds per step of the server process
    step_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def raw_tensor_bytes(manifest: Any, batch: int) -> int:
    """Bytes of the tensors one step must move, at float32, without framing."""

    def nbytes(spec: Any) -> int:
        return batch * math.prod(spec.sample_shape) * 4

    a = nbytes(manifest.cuts[0])
    if manifest.split_mode == "double":
        b = nbytes(manifest.cuts[1])
        return 2 * a + 2 * b  # a up, b down, dL/db up, dL/da down
    return 2 * a + batch * 4 + 4  # a and int32 labels up, dL/da and the loss down


def start_server(bundle: Path, settings: Settings) -> Any:
    """``spliteasy serve BUNDLE`` as a child process (no state kept), started."""
    from server_torch.serving import ServerProcess

    args = [
        "--threads",
        str(settings.server_threads()),
        "--max-batch",
        str(max(settings.batch, 64)),
    ]
    return ServerProcess(bundle, args).start()


def measure_split(
    bundle: Path,
    settings: Settings,
    *,
    tick: Callable[[str], None] = lambda _s: None,
    server: Any = None,
) -> Split:
    """Train ``settings.steps`` steps (after ``warmup``) of ``bundle`` through a real
    ``spliteasy serve`` child (``server``, one already running, or a new one) and,
    unless the link is ``loopback``, a netem child. Each call opens its own session."""
    from device_tf.factory import make_runtime
    from device_tf.loop import SplitTrainer
    from device_tf.transport import HttpTransport
    from netem.profiles import load_profile
    from shared_schema import load_manifest, manifest_digest

    profile = load_profile(settings.link)
    manifest = load_manifest(bundle)
    digest = manifest_digest(bundle)
    rng = np.random.default_rng(settings.seed)
    x = rng.random((settings.batch, *manifest.input.sample_shape), dtype=np.float32)
    y = (np.arange(settings.batch) % manifest.num_classes).astype(np.int32)
    runtime = make_runtime("tf", bundle, manifest)
    srv = server or start_server(bundle, settings)
    proxy: NetemProcess | None = None
    try:
        url = srv.url
        if profile.name != "loopback":
            proxy = NetemProcess(srv.url, settings.link, settings.seed).start()
            url = proxy.url
        transport = HttpTransport(url, timeout=600, reconnect_timeout=60, notify=lambda _m: None)
        trainer = SplitTrainer(runtime, transport, manifest, digest)
        try:
            for _ in range(settings.warmup):
                trainer.step(x, y)
                tick("warm-up")
            pid = srv.proc.pid if srv.proc is not None else None
            c0, s0 = time.process_time(), _cpu_seconds(pid)
            results = []
            for _ in range(settings.steps):
                results.append(trainer.step(x, y))
                tick("step")
            c1, s1 = time.process_time(), _cpu_seconds(pid)
            trainer.close()
        finally:
            transport.close()
    finally:
        if proxy is not None:
            proxy.stop()
        if server is None:
            srv.stop()
    n = max(len(results), 1)

    def mean(attr: str) -> float:
        return float(sum(getattr(r.timings, attr) for r in results) / n)

    up, down = mean("bytes_up"), mean("bytes_down")
    trips = 2 if manifest.split_mode == "double" else 1
    return Split(
        config=manifest.split_mode,
        cuts=[c.name for c in manifest.cuts],
        batch=settings.batch,
        link=settings.link,
        steps=len(results),
        device_ms=mean("device_ms"),
        server_ms=mean("server_ms"),
        codec_ms=mean("codec_ms"),
        wire_ms=mean("wire_ms"),
        total_ms=mean("total_ms"),
        bytes_up=up,
        bytes_down=down,
        raw_bytes=raw_tensor_bytes(manifest, settings.batch),
        round_trips=trips,
        bound_ms=profile.bound_ms(int(up), int(down), trips),
        expected_ms=profile.expected_ms(int(up), int(down), trips),
        device_cpu_s=(c1 - c0) / n,
        server_cpu_s=(s1 - s0) / n,
        step_ms=[r.timings.total_ms for r in results],
        losses=[r.loss for r in results],
    )


def unsplit_model(bundle: Path) -> tuple[Any, bool]:
    """The whole network of a bundle (``unsplit/model.json``), freshly initialised."""
    import tf_keras as keras

    from shared_schema import load_manifest

    manifest = load_manifest(bundle)
    path = bundle / "unsplit" / "model.json"
    if not path.is_file():
        raise BenchError(f"{bundle} holds no unsplit/model.json (convert it again)")
    model = keras.models.model_from_json(path.read_text())
    return model, manifest.loss.from_logits


def measure_tf_alone(
    model: Any, from_logits: bool, settings: Settings, tick: Callable[[str], None]
) -> dict[str, Any]:
    """The whole model trained by tf_keras alone (the "no split, on the device" row):
    one ``tf.function`` step (as ``model.fit`` runs it) and one eager step (as the device
    runtimes run A and C), SGD with momentum, sparse cross-entropy."""
    import tensorflow as tf
    import tf_keras as keras

    rng = np.random.default_rng(settings.seed)
    x = tf.constant(rng.random((settings.batch, *model.input_shape[1:]), dtype=np.float32))
    n_classes = int(model.output_shape[-1])
    y = tf.constant((np.arange(settings.batch) % n_classes).astype(np.int32))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)

    def step() -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    out: dict[str, Any] = {}
    for mode, fn in (("compiled", tf.function(step)), ("eager", step)):
        for _ in range(settings.warmup):
            float(fn())
            tick(f"tf {mode} warm-up")
        times, c0 = [], time.process_time()
        for _ in range(settings.steps):
            t0 = time.perf_counter()
            float(fn())
            times.append((time.perf_counter() - t0) * 1e3)
            tick(f"tf {mode}")
        out[mode] = {
            "total_ms": float(np.mean(times)),
            "step_ms": times,
            "cpu_s": (time.process_time() - c0) / max(settings.steps, 1),
        }
    return out


def measure_torch_alone(
    bundle: Path, settings: Settings, tick: Callable[[str], None]
) -> dict[str, Any]:
    """The server's trainer alone on a single-split bundle cut at the network's first
    valid cut: B is the whole network but its first layer, trained as the server trains
    it (``Trainer.step_single``: forward, loss, backward, optimizer), in this process with
    the server's thread count; no HTTP."""
    import torch

    from server_torch.rebuild import load_server_slice
    from server_torch.trainer import Trainer
    from shared_schema import load_manifest

    manifest = load_manifest(bundle)
    before = torch.get_num_threads()
    torch.set_num_threads(settings.server_threads())
    try:
        trainer = Trainer(load_server_slice(bundle, manifest), manifest)
        rng = np.random.default_rng(settings.seed)
        a = rng.random((settings.batch, *manifest.cuts[0].sample_shape), dtype=np.float32)
        y = (np.arange(settings.batch) % manifest.num_classes).astype(np.int32)
        for _ in range(settings.warmup):
            trainer.step_single(a, y)
            tick("torch warm-up")
        times, c0 = [], time.process_time()
        for _ in range(settings.steps):
            t0 = time.perf_counter()
            trainer.step_single(a, y)
            times.append((time.perf_counter() - t0) * 1e3)
            tick("torch")
    finally:
        torch.set_num_threads(before)
    return {
        "total_ms": float(np.mean(times)),
        "step_ms": times,
        "cpu_s": (time.process_time() - c0) / max(settings.steps, 1),
        "first_cut": manifest.cuts[0].name,
        "threads": settings.server_threads(),
    }
