"""Device-runtime benchmark (issue #12; ``make bench-device``, part of ``make bench``).

Per-step device compute of the same bundle -- A's forward, C's forward + loss + backward +
update, A's backward + update, on fixed random inputs and without a server -- in Python TF,
TFLite and TF.js in Node (cpu backend), for the stem/head splits of ResNet50 and MobileNetV2
(``tests/zoo_helpers.DEVICE_SPLITS``) at 96-128 px, batch 16, and TF.js in headless Chromium
on the cpu and webgl backends (``device_tf/js/tools/bench_browser.mjs``: the same step in a
page); the ratios to Python TF; and the kernel-by-kernel gaps on the stems' own shapes
(``device_tf/js/tools/profile_kernels.mjs`` against the same ops in TensorFlow), including the
stem convolution's filter gradient against its forward. The rows of one network are measured
back to back (the machine's load average is recorded beside them: on a shared machine wall
times move with it, CPU seconds much less).

Speed is reported, never asserted. Usage::

    python benchmarks/device_runtimes.py [--nets resnet50 mobilenetv2] [--sizes 96 128]
        [--batch 16] [--steps 3] [--browsers cpu webgl] [--webgl-steps 1] [--no-ops]
        [--out runs/bench-device.json] [--markdown runs/bench-device.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
JS_DIR = REPO / "device_tf" / "js"
sys.path.insert(0, str(REPO / "tests"))  # zoo_helpers: the cached stem/head bundles


def _inputs(rt_shapes: dict[str, tuple[int, ...]], batch: int, classes: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out = {
        "x": rng.random((batch, *rt_shapes["x"]), dtype=np.float32),
        "g_a": (rng.standard_normal((batch, *rt_shapes["a"])) * 1e-3).astype(np.float32),
        "y": (np.arange(batch) % classes).astype(np.int32),
    }
    if "b" in rt_shapes:
        out["b"] = rng.random((batch, *rt_shapes["b"]), dtype=np.float32)
    return out


def time_python_runtime(runtime: Any, inputs: dict[str, Any], steps: int) -> dict[str, float]:
    """Median seconds of each phase of a device step (after one warm-up step)."""

    def step() -> dict[str, float]:
        c0 = time.process_time()  # CPU seconds of all threads: robust to a shared machine
        t0 = time.perf_counter()
        runtime.a_forward(inputs["x"])
        t1 = time.perf_counter()
        if "b" in inputs:
            runtime.c_train(inputs["b"], inputs["y"])
        t2 = time.perf_counter()
        runtime.a_backward(inputs["g_a"])
        t3 = time.perf_counter()
        return {
            "a_forward_s": t1 - t0,
            "c_train_s": t2 - t1,
            "a_backward_s": t3 - t2,
            "step_s": t3 - t0,
            "step_cpu_s": time.process_time() - c0,
        }

    step()
    runs = [step() for _ in range(steps)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def time_tfjs(bundle: Path, batch: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tfjs.json"
        subprocess.run(
            ["node", "tools/bench_device.mjs", str(bundle), "--batch", str(batch),
             "--steps", str(steps), "--profile", "--json", str(out)],
            cwd=JS_DIR, check=True, capture_output=True, text=True,
        )  # fmt: skip
        return json.loads(out.read_text())


def time_browser(bundle: Path, backend: str, batch: int, steps: int) -> dict[str, Any]:
    """The device step in headless Chromium on ``backend`` (tools/bench_browser.mjs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "page.json"
        try:
            subprocess.run(
                ["node", "tools/bench_browser.mjs", str(bundle), "--backend", backend,
                 "--batch", str(batch), "--steps", str(steps), "--json", str(out)],
                cwd=JS_DIR, check=True, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
        except (subprocess.SubprocessError, OSError) as err:
            return {"error": f"{type(err).__name__}: {err}"}
        res = json.loads(out.read_text())
        if res.get("backend") != backend and "error" not in res:
            res["error"] = f"the page trained on {res.get('backend')}: {res.get('note')}"
        return res


def load_average() -> float:
    """The 1-minute load average (the machine is shared: wall times scale with it)."""
    return os.getloadavg()[0]


def tf_op_times(size: int, batch: int) -> dict[str, dict[str, float]]:
    """Forward and gradient seconds of profile_kernels.mjs' ops in TensorFlow (tf.function)."""
    import tensorflow as tf

    half = lambda n, s: -(-n // s)  # noqa: E731
    s2, s4 = half(size, 2), half(half(size, 2), 2)
    rnd = lambda *shape: tf.random.uniform(shape, -1, 1, seed=7)  # noqa: E731

    def moments(v: Any) -> Any:
        mean, var = tf.nn.moments(v, [0, 1, 2])
        return tf.reduce_sum((v - mean) * tf.math.rsqrt(var + 1e-3))

    conv = lambda s, p: lambda a, w: tf.reduce_sum(tf.nn.conv2d(a, w, s, p))  # noqa: E731

    def dconv(s: int, p: str) -> Callable:
        return lambda a, w: tf.reduce_sum(tf.nn.depthwise_conv2d(a, w, [1, s, s, 1], p))

    cases: dict[str, tuple[Callable, list, list[int]]] = {
        # name: (f, inputs, indices of the inputs the gradient is taken for) -- as the JS side
        "resnet50 conv1 7x7/2 3->64": (conv(2, "VALID"), [rnd(batch, size + 6, size + 6, 3), rnd(7, 7, 3, 64)], [1]),
        "resnet50 pool1 maxpool 3x3/2": (lambda a: tf.reduce_sum(tf.nn.max_pool2d(a, 3, 2, "VALID")), [rnd(batch, s2 + 2, s2 + 2, 64)], [0]),
        "resnet50 conv1_bn moments": (moments, [rnd(batch, s2, s2, 64)], [0]),
        "resnet50 conv2 3x3 same 64->64": (conv(1, "SAME"), [rnd(batch, s4, s4, 64), rnd(3, 3, 64, 64)], [0, 1]),
        "resnet50 conv2 1x1 64->256": (conv(1, "SAME"), [rnd(batch, s4, s4, 64), rnd(1, 1, 64, 256)], [0, 1]),
        "mobilenetv2 Conv1 3x3/2 3->32": (conv(2, "SAME"), [rnd(batch, size, size, 3), rnd(3, 3, 3, 32)], [1]),
        "mobilenetv2 depthwise 3x3 32": (dconv(1, "SAME"), [rnd(batch, s2, s2, 32), rnd(3, 3, 32, 1)], [0, 1]),
        "mobilenetv2 block_1 depthwise 3x3/2 96": (dconv(2, "VALID"), [rnd(batch, s2 + 1, s2 + 1, 96), rnd(3, 3, 96, 1)], [0, 1]),
        "mobilenetv2 Conv_1 1x1 320->1280": (conv(1, "VALID"), [rnd(batch, half(size, 32), half(size, 32), 320), rnd(1, 1, 320, 1280)], [0, 1]),
    }  # fmt: skip
    out = {}
    for name, (f, args, wrt) in cases.items():
        fwd = tf.function(f)

        @tf.function
        def both(*a: Any, f: Callable = f, wrt: list[int] = wrt) -> Any:
            with tf.GradientTape() as tape:
                for i in wrt:
                    tape.watch(a[i])
                y = f(*a)
            return tape.gradient(y, [a[i] for i in wrt])

        def best(fn: Callable, args: list = args) -> float:
            fn(*args)  # trace
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                res = fn(*args)
                _ = [r.numpy() for r in (res if isinstance(res, list) else [res])]
                times.append(time.perf_counter() - t0)
            return min(times)

        f_s, b_s = best(fwd), best(both)
        out[name] = {"forward_s": f_s, "grad_s": max(b_s - f_s, 0.0)}
    return out


def js_op_times(size: int, batch: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ops.json"
        subprocess.run(
            ["node", "tools/profile_kernels.mjs", "--size", str(size), "--batch", str(batch),
             "--orig-batch", "1", "--json", str(out)],
            cwd=JS_DIR, check=True, capture_output=True, text=True,
        )  # fmt: skip
        return {r["op"]: r for r in json.loads(out.read_text())["rows"]}


def bench_net(
    net: str,
    size: int,
    batch: int,
    steps: int,
    browsers: list[str],
    webgl_steps: int,
    bundle: Path | None = None,
) -> dict[str, Any]:
    import zoo_helpers

    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    bundle = bundle or zoo_helpers.device_bundle(net, size)
    manifest = load_manifest(bundle)
    tf_rt = TFRuntime.from_bundle(bundle)
    shapes = {"x": tuple(tf_rt.a.input_shape[1:]), "a": tuple(tf_rt.a.output_shape[1:])}
    if tf_rt.c is not None:
        shapes["b"] = tuple(tf_rt.c.input_shape[1:])
    inputs = _inputs(shapes, batch, manifest.num_classes)
    res: dict[str, Any] = {
        "net": net,
        "size": size,
        "batch": batch,
        "cuts": zoo_helpers.DEVICE_SPLITS[net],
    }
    res["load_before"] = load_average()
    res["tf"] = time_python_runtime(tf_rt, inputs, steps)
    try:
        from device_tf.tflite_runtime import TFLiteRuntime

        res["tflite"] = time_python_runtime(TFLiteRuntime.from_bundle(bundle), inputs, steps)
    except Exception as err:  # a bundle without TFLite artefacts, or a TFLite refusal
        res["tflite"] = {"error": f"{type(err).__name__}: {err}"}
    res["tfjs_node"] = time_tfjs(bundle, batch, steps)
    for backend in browsers:
        n = webgl_steps if backend != "cpu" else steps
        res[f"tfjs_chromium_{backend}"] = time_browser(bundle, backend, batch, n)
    res["load_after"] = load_average()
    return res


RUNTIMES = {
    "tf": "Python TF",
    "tflite": "TFLite",
    "tfjs_node": "TF.js Node (cpu)",
    "tfjs_chromium_cpu": "TF.js Chromium (cpu)",
    "tfjs_chromium_webgl": "TF.js Chromium (webgl, SwiftShader)",
    "tfjs_chromium_webgpu": "TF.js Chromium (webgpu)",
}


def report(results: list[dict[str, Any]], ops: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| network (px, batch) | runtime | A fwd s | C train s | A bwd s | step s | x Python TF "
        "| step CPU s | x TF (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base, base_cpu = r["tf"]["step_s"], r["tf"]["step_cpu_s"]
        where = f"{r['net']} ({r['size']}, {r['batch']})"
        for rt, label in RUNTIMES.items():
            t = r.get(rt)
            if t is None:
                continue
            if "error" in t:
                lines.append(f"| {where} | {label} | {t['error'][:80]} | | | | | | |")
                continue
            cpu = t.get("step_cpu_s")
            cpu_cols = f"{cpu:.3f} | {cpu / base_cpu:.1f}x" if cpu else "– | –"
            lines.append(
                f"| {where} | {label} | {t['a_forward_s']:.3f} | {t['c_train_s']:.3f} "
                f"| {t['a_backward_s']:.3f} | {t['step_s']:.3f} | {t['step_s'] / base:.1f}x "
                f"| {cpu_cols} |"
            )
        lines.append(
            f"| {where} | (load average {r.get('load_before', 0):.1f} -> "
            f"{r.get('load_after', 0):.1f} on {os.cpu_count()} cores) | | | | | | | |"
        )
        kernels = r["tfjs_node"].get("kernels_s", {})
        top = ", ".join(f"{k} {v:.2f} s" for k, v in list(kernels.items())[:6])
        lines.append(f"\n{r['net']} {r['size']} px: TF.js kernels of one step: {top}\n")
    for size, o in ops.items():
        lines += [
            f"\nKernels at {size} px (TF.js cpu before -> after, and Python TF): forward s, gradient s",
            "| op | TF.js own fwd / grad | TF.js fast fwd / grad (grad/fwd) | TF fwd / grad | fast / TF (fwd+grad) |",
            "|---|---|---|---|---|",
        ]
        gaps = []
        for name, js in o["js"].items():
            t = o["tf"][name]
            ratio = (js["fast_forward_s"] + js["fast_grad_s"]) / max(
                t["forward_s"] + t["grad_s"], 1e-9
            )
            gaps.append((ratio, name))
            lines.append(
                f"| {name} | {js['orig_forward_s']:.3f} / {js['orig_grad_s']:.2f} | {js['fast_forward_s']:.3f} / "
                f"{js['fast_grad_s']:.3f} ({js['fast_grad_s'] / js['fast_forward_s']:.1f}x) | {t['forward_s']:.4f} / "
                f"{t['grad_s']:.4f} | {ratio:.0f}x |"
            )
        gaps.sort(reverse=True)
        lines.append("largest gaps to TF: " + ", ".join(f"{n} {g:.0f}x" for g, n in gaps[:3]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=["resnet50", "mobilenetv2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[96])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-ops", action="store_true", help="skip the kernel-by-kernel table")
    ap.add_argument(
        "--browsers", nargs="*", default=["cpu", "webgl"], help="Chromium backends (none: skip)"
    )
    ap.add_argument(
        "--webgl-steps", type=int, default=1, help="timed steps on GPU backends (SwiftShader: slow)"
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-device.json")
    ap.add_argument("--markdown", type=Path, default=REPO / "runs" / "bench-device.md")
    ap.add_argument(
        "--bundle",
        action="append",
        default=[],
        metavar="NET=DIR",
        help="an already converted stem/head bundle of NET (with tf, tfjs, tflite artefacts) "
        "instead of the test cache's (which converts on a cache miss)",
    )
    args = ap.parse_args()
    given = {k: Path(v) for k, v in (b.split("=", 1) for b in args.bundle)}
    results = [
        bench_net(n, s, args.batch, args.steps, args.browsers, args.webgl_steps, given.get(n))
        for s in args.sizes
        for n in args.nets
    ]
    ops = {}
    if not args.no_ops:
        for s in args.sizes:
            ops[s] = {"js": js_op_times(s, args.batch), "tf": tf_op_times(s, args.batch)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "ops": ops}, indent=1, default=str))
    text = report(results, ops)
    args.markdown.write_text(text + "\n")
    print(text)
    print(f"\n(written to {args.out} and {args.markdown})")


if __name__ == "__main__":
    main()
