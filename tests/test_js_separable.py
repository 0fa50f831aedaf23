"""SeparableConv2D, which ``convert --runtimes tfjs`` accepts, loads and trains in TF.js.

Keras writes a SeparableConv2D's config with Conv's ``kernel_initializer``,
``kernel_regularizer`` and ``kernel_constraint`` beside the ``depthwise_*`` and
``pointwise_*`` fields it really uses; TF.js' SeparableConv2D refuses the model
("Fields kernelInitializer, kernelRegularizer and kernelConstraint are invalid").
``export_tfjs`` drops them; here a tiny slice A with a SeparableConv2D is exported, loaded
in node and stepped twice with a given upstream gradient, and its output and updated
variables must equal tf_keras' within 1e-4.
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
import tf_keras as keras  # noqa: E402

from converters.export.tfjs import export_tfjs  # noqa: E402
from device_tf.keras_util import named_variables  # noqa: E402

RTOL = 1e-4


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-2))


@pytest.mark.js
def test_separable_conv2d_slice_loads_and_steps_in_tfjs(tmp_path: Path) -> None:
    from shared_schema.frame import Frame, FrameKind, decode, encode

    keras.utils.set_random_seed(5)
    L = keras.layers
    inp = L.Input((8, 8, 3), name="image")
    h = L.SeparableConv2D(
        4,
        3,
        padding="same",
        depth_multiplier=2,
        depthwise_regularizer=keras.regularizers.L2(1e-3),
        name="a_sep",
    )(inp)
    a_model = keras.Model(inp, L.ReLU(name="a_out")(h), name="A")
    export_tfjs(a_model, tmp_path / "A")
    layer_cfg = json.loads((tmp_path / "A" / "model.json").read_text())["modelTopology"]
    sep = next(
        lyr
        for lyr in layer_cfg["model_config"]["config"]["layers"]
        if lyr["class_name"] == "SeparableConv2D"
    )
    assert not {"kernel_initializer", "kernel_regularizer", "kernel_constraint"} & set(
        sep["config"]
    )

    rng = np.random.default_rng(0)
    x = rng.random((4, 8, 8, 3), dtype=np.float32)
    g_a = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    (tmp_path / "inputs.frames").write_bytes(
        encode(
            [
                Frame(FrameKind.ACTIVATION, "x", x, "NHWC"),
                Frame(FrameKind.GRADIENT, "g_a", g_a, "NHWC"),
            ]
        )
    )
    cfg = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
    steps = 2
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "a": str(tmp_path / "A"),
                "inputs": str(tmp_path / "inputs.frames"),
                "steps": steps,
                "optimizer": cfg,
                "numClasses": 10,
                "out": str(tmp_path / "out.frames"),
            }
        )
    )
    run_node(["tools/slice_step.mjs", str(tmp_path / "cfg.json")], timeout=300)
    js = {f.name: f.array for f in decode((tmp_path / "out.frames").read_bytes())}

    opt = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    for s in range(steps):
        with tf.GradientTape() as tape:
            out = a_model(x, training=True)
            penalty = tf.add_n([tf.zeros([]), *a_model.losses])
        grads = tape.gradient(
            [out, penalty], a_model.trainable_weights, output_gradients=[tf.constant(g_a), None]
        )
        opt.apply_gradients(zip(grads, a_model.trainable_weights, strict=True))
        got = js[f"a.{s}"].reshape(out.shape)
        assert _rel(got, out.numpy()) < RTOL, f"A's output at step {s}"
    variables = named_variables(a_model)
    assert variables, "A has no variables"
    for name, ref in variables.items():
        got = js[f"A:{name}"]
        assert _rel(got, ref.numpy().reshape(-1)) < RTOL, f"A's {name} after {steps} steps"
