"""TF.js' fast cpu kernels (device_tf/js/src/kernels.mjs, issue #12) agree with TensorFlow.

The replaced kernels -- Conv2D and its filter and input gradients, depthwise convolution and
its gradients, max pooling and its gradient, ReLU and ReLU6 (ClipByValue), ZeroPadding2D's pad and its gradient (a strided
slice), the reductions and broadcasting arithmetic of BatchNormalization's moments -- are run by ``tools/check_kernels.mjs`` on the cpu backend as
the device runs it, on the geometries the zoo's device slices use (1x1 to 7x7, stride 1 and
2, 'same' and 'valid', ResNet's 7x7/2 stem and MobileNet's depthwise 3x3/2), and compared
with ``tf.GradientTape`` gradients of the same functions: within 1e-4 of the reference's
largest entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import run_node

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from shared_schema.frame import Frame, FrameKind, decode, encode  # noqa: E402

pytestmark = pytest.mark.js

RTOL = 1e-4
N_FAST = 20  # kernels kernels.mjs replaces (FAST_KERNELS)


def _cases() -> list[dict]:
    cases = []
    for k in (1, 3, 5, 7):
        for stride in (1, 2):
            for pad in ("same", "valid"):
                tag = f"{k}x{k}s{stride}{pad}"
                cases.append(dict(name=f"conv{tag}", op="conv", k=k, stride=stride, pad=pad,
                                  x=[2, 15, 14, 5], w=[k, k, 5, 12]))  # fmt: skip
                if k <= 5:
                    cases.append(dict(name=f"dw{tag}", op="depthwise", k=k, stride=stride,
                                      pad=pad, x=[2, 13, 15, 8], w=[k, k, 8, 1]))  # fmt: skip
                if k in (1, 3):  # pooling windows 2x2 and 3x3
                    pk = max(k, 2)
                    cases.append(dict(name=f"max{pk}x{pk}s{stride}{pad}", op="maxpool", k=pk,
                                      stride=stride, pad=pad, x=[2, 13, 12, 6]))  # fmt: skip
    # ResNet50's stem (ZeroPadding 3 + 7x7/2 valid, 3 -> 64) and pool1 at 32 px; MobileNetV2's
    # stem (3x3/2 same) and its first strided depthwise (ZeroPadding + 3x3/2 valid); the
    # 1x1/2 projection shortcut; BN's moments over N, H, W.
    cases += [
        dict(name="resnet_stem", op="padconv", zpad=3, k=7, stride=2, pad="valid", x=[4, 32, 32, 3], w=[7, 7, 3, 64]),
        dict(name="resnet_pool1", op="padmax", zpad=1, k=3, stride=2, pad="valid", x=[4, 16, 16, 64]),
        dict(name="resnet_shortcut", op="conv", k=1, stride=2, pad="valid", x=[2, 8, 8, 64], w=[1, 1, 64, 128]),
        dict(name="mobilenet_stem", op="conv", k=3, stride=2, pad="same", x=[4, 32, 32, 3], w=[3, 3, 3, 32]),
        dict(name="mobilenet_dw2", op="depthwise", k=3, stride=2, pad="valid", x=[4, 17, 17, 96], w=[3, 3, 96, 1]),
        dict(name="relu6", op="relu6", k=0, stride=0, pad="", x=[4, 16, 16, 32]),
        dict(name="relu", op="relu", k=0, stride=0, pad="", x=[4, 16, 16, 32]),
        dict(name="bn_moments", op="moments", k=0, stride=0, pad="", x=[4, 16, 16, 64]),
    ]  # fmt: skip
    return cases


def _zero_pad(a, p: int):
    return tf.pad(a, [[0, 0], [p, p], [p, p], [0, 0]])


def _tf_fn(case: dict):
    s, pad = case["stride"], case["pad"].upper()
    k = case["k"]
    return {
        "conv": lambda a, w: tf.nn.conv2d(a, w, s, pad),
        "depthwise": lambda a, w: tf.nn.depthwise_conv2d(a, w, [1, s, s, 1], pad),
        "maxpool": lambda a: tf.nn.max_pool2d(a, k, s, pad),
        "padconv": lambda a, w: tf.nn.conv2d(_zero_pad(a, case.get("zpad")), w, s, pad),
        "padmax": lambda a: tf.nn.max_pool2d(_zero_pad(a, case.get("zpad")), k, s, pad),
        "relu6": tf.nn.relu6,
        "relu": tf.nn.relu,
        "moments": lambda a: (
            (a - tf.reduce_mean(a, [0, 1, 2]))
            * tf.math.rsqrt(tf.math.reduce_variance(a, [0, 1, 2]) + 1e-3)
        ),
    }[case["op"]]


def _flat(name: str, arr: np.ndarray) -> Frame:
    return Frame(FrameKind.ACTIVATION, name, np.ascontiguousarray(arr, np.float32).ravel(), "N")


def test_fast_kernels_agree_with_tensorflow_gradients(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    cases = _cases()
    frames, refs = [], {}
    for case in cases:
        x = tf.constant(rng.standard_normal(case["x"]).astype(np.float32))
        w = tf.constant(rng.standard_normal(case["w"]).astype(np.float32)) if "w" in case else None
        fn = _tf_fn(case)
        with tf.GradientTape() as tape:
            tape.watch(x)
            if w is not None:
                tape.watch(w)
            y = fn(x, w) if w is not None else fn(x)
        dy = tf.constant(rng.standard_normal(y.shape).astype(np.float32))
        grads = tape.gradient(y, [x, w] if w is not None else [x], output_gradients=dy)
        name = case["name"]
        frames += [_flat(f"{name}.x", x.numpy()), _flat(f"{name}.dy", dy.numpy())]
        refs[f"{name}.y"], refs[f"{name}.dx"] = y.numpy(), grads[0].numpy()
        if w is not None:
            frames.append(_flat(f"{name}.w", w.numpy()))
            refs[f"{name}.dw"] = grads[1].numpy()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "in.frames").write_bytes(encode(frames))
    run_node(
        [
            "tools/check_kernels.mjs",
            *(str(tmp_path / f) for f in ("cases.json", "in.frames", "out.frames")),
        ],
        timeout=120,
    )
    got = {f.name: f.array for f in decode((tmp_path / "out.frames").read_bytes())}
    assert (
        got.pop("kernels.fast").tolist() == [1.0] * N_FAST
    )  # the device's kernels are the fast ones
    errors = {}
    for key, ref in refs.items():
        out = got[key].reshape(ref.shape)
        errors[key] = float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-6))
    worst = max(errors, key=errors.get)
    print(
        f"\n{len(errors)} outputs of {len(cases)} cases: worst rel err {errors[worst]:.1e} ({worst})"
    )
    assert errors[worst] <= RTOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
