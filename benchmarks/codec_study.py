"""Wire codecs on digits: bytes per step and the accuracy each reaches, beside float32.

For each codec (``shared_schema/codec.py``) the same bundle trains from the same initial
weights on the same batches against a real server (uvicorn on 127.0.0.1, in this
process), with the Python TF device over HTTP; reported per codec: the bytes that went
up and down per step (frame headers included) and their ratio to float32's, the final
loss and the test accuracy, and the accuracy lost against float32. Nothing is asserted
(the bench helper and the README read the JSON).

Usage::

    python benchmarks/codec_study.py [BUNDLE] [--codecs float32 fp16 ...] [--epochs 3]
        [--batch-size 32] [--runtime tf] [--out runs/codec-study]

Without BUNDLE the cached double-split digits-cnn bundle of the test suite is used
(converted once, ``tests/bundle_cache.py``). Writes ``OUT/codec_study.json`` and
``OUT/codec_study.md``. :func:`study` is the function ``spliteasy bench`` can call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def default_bundle() -> Path:
    """The test suite's cached digits-cnn double split (SGD with momentum)."""
    sys.path.insert(0, str(REPO / "tests"))
    from split_helpers import SGD_CFG, digits_bundle

    bundle, _ = digits_bundle(None, "double", SGD_CFG)
    return bundle


def run_codec(
    bundle: Path,
    codec: str,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    runtime: str = "tf",
) -> dict[str, Any]:
    """Train ``bundle`` from its initial weights with ``codec`` on the wire; its figures."""
    from device_tf.data import batch_at
    from device_tf.factory import make_runtime
    from device_tf.loop import SplitTrainer
    from device_tf.transport import HttpTransport
    from server_torch.app import create_app
    from server_torch.serving import ServerThread
    from shared_schema import load_manifest, manifest_digest
    from shared_schema.demo_data import fit_to_input, load_digits_split

    manifest = load_manifest(bundle)
    x, y, x_te, y_te = load_digits_split(seed=seed)
    x, x_te = (fit_to_input(a, manifest.input.sample_shape) for a in (x, x_te))
    steps_per_epoch = -(-len(x) // batch_size)
    rt = make_runtime(runtime, bundle, manifest)
    losses: list[float] = []
    up = down = 0
    codec_ms = 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    # generous start-up and request timeouts: the study (and tests/test_codec.py) may run
    # on a machine loaded far beyond its cores
    srv = ServerThread(create_app(bundle)).start(timeout=180)
    try:
        transport = HttpTransport(srv.url, timeout=300)
        try:
            with SplitTrainer(rt, transport, manifest, manifest_digest(bundle), codec=codec) as tr:
                for step in range(epochs * steps_per_epoch):
                    epoch, pos = divmod(step, steps_per_epoch)
                    xb, yb = batch_at(x, y, batch_size, epoch, pos, seed)
                    r = tr.step(xb, yb)
                    losses.append(r.loss)
                    up += r.timings.bytes_up
                    down += r.timings.bytes_down
                    codec_ms += r.timings.codec_ms
                accuracy = tr.evaluate(x_te, y_te)
                info = transport.session  # as the server opened it (codec included)
        finally:
            transport.close()
    finally:
        srv.stop()
    steps = len(losses)
    first = sum(losses[:steps_per_epoch]) / max(min(steps, steps_per_epoch), 1)
    last = sum(losses[-steps_per_epoch:]) / max(min(steps, steps_per_epoch), 1)
    return {
        "codec": codec,
        "session_codec": info.codec if info is not None else None,
        "steps": steps,
        "bytes_up_per_step": up / max(steps, 1),
        "bytes_down_per_step": down / max(steps, 1),
        "bytes_per_step": (up + down) / max(steps, 1),
        "codec_ms_per_step": codec_ms / max(steps, 1),
        "first_epoch_loss": first,
        "last_epoch_loss": last,
        "first_steps_loss": sum(losses[:10]) / max(min(steps, 10), 1),  # the first 10 steps
        "last_steps_loss": sum(losses[-10:]) / max(min(steps, 10), 1),  # the last 10 steps
        "test_accuracy": accuracy,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - cpu0,
    }


def raw_float32_bytes(bundle: Path, batch_size: int) -> int:
    """The raw float32 tensor bytes of one full-batch step (payloads only, no headers)."""
    from shared_schema import load_manifest

    m = load_manifest(bundle)
    cuts = m.cuts if m.split_mode == "double" else m.cuts[:1]
    return sum(2 * batch_size * c.bytes_per_sample for c in cuts)


def study(
    bundle: Path | None = None,
    codecs: list[str] | None = None,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    runtime: str = "tf",
) -> dict[str, Any]:
    """Every codec's run (float32 first, the reference) and the ratios to float32."""
    from shared_schema.codec import NAMES

    bundle = bundle or default_bundle()
    names = list(codecs or NAMES)
    if "float32" in names:
        names.remove("float32")
    names.insert(0, "float32")
    rows = [
        run_codec(bundle, c, epochs=epochs, batch_size=batch_size, seed=seed, runtime=runtime)
        for c in names
    ]
    ref = rows[0]
    raw = raw_float32_bytes(bundle, batch_size)
    for r in rows:
        r["ratio_to_float32"] = r["bytes_per_step"] / ref["bytes_per_step"]
        r["reduction_x"] = ref["bytes_per_step"] / r["bytes_per_step"]
        r["accuracy_delta_points"] = 100 * (r["test_accuracy"] - ref["test_accuracy"])
    return {
        "bundle": str(bundle),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "runtime": runtime,
        "raw_float32_tensor_bytes_per_full_step": raw,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"digits-cnn double split, {result['epochs']} epochs, batch {result['batch_size']}, "
        f"runtime {result['runtime']}, HTTP on loopback",
        "",
        "| codec | bytes/step (up + down) | vs float32 | test accuracy | vs float32 (points) "
        "| last-epoch loss | codec ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['codec']} | {r['bytes_per_step']:,.0f} | {r['ratio_to_float32']:.3f} "
            f"({r['reduction_x']:.2f}x fewer) | {r['test_accuracy']:.4f} | "
            f"{r['accuracy_delta_points']:+.2f} | {r['last_epoch_loss']:.4f} | "
            f"{r['codec_ms_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", type=Path)
    p.add_argument("--codecs", nargs="+")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runtime", choices=["tf", "tflite"], default="tf")
    p.add_argument("--out", type=Path, default=Path("runs/codec-study"))
    a = p.parse_args(argv)
    result = study(
        a.bundle, a.codecs, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, runtime=a.runtime
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "codec_study.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (a.out / "codec_study.md").write_text(md)
    print(md)
    print(f"wrote {a.out / 'codec_study.json'} and {a.out / 'codec_study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
