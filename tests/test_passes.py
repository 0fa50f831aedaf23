"""Each pass that makes onnx2torch's graph a trainable, Keras-exact B, on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # a broken torch install fails here, never skips

import split_helpers  # noqa: F401


def _raw_graph(build):
    """onnx2torch's raw graph of a small Keras model, exported like B is."""
    import tf_keras as keras
    from onnx2torch import convert

    keras.utils.set_random_seed(0)
    model = build(keras)
    from converters.export.onnx_torch import _tf2onnx
    from shared_schema import TensorSpec

    shape = [None, *model.input_shape[1:]]
    cut = TensorSpec(
        name=model.layers[0].name, shape=shape, layout="NHWC" if len(shape) == 4 else "NC"
    )
    out_shape = [None, *model.output_shape[1:]]
    out = TensorSpec(name="out", shape=out_shape, layout="NHWC" if len(out_shape) == 4 else "NC")
    return model, convert(_tf2onnx(model, cut, out))


def _conv_bn(keras):
    inp = keras.Input((6, 6, 3), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inp)
    h = keras.layers.BatchNormalization(momentum=0.7, epsilon=1e-2, name="bn")(h)
    return keras.Model(inp, keras.layers.ReLU(name="out")(h))


def test_fold_transposes_removes_every_cancelling_pair():
    from onnx2torch.node_converters.transpose import OnnxTranspose

    from server_torch.passes import PASSES
    from server_torch.spec import TorchSpec

    model, gm = _raw_graph(_conv_bn)
    count = lambda: sum(isinstance(m, OnnxTranspose) for m in gm.modules())  # noqa: E731
    x = torch.randn(2, 3, 6, 6)
    gm.eval()
    before = gm(x)
    assert count() > 0
    PASSES["fold_transposes"](gm, TorchSpec())
    gm.recompile()
    assert count() == 0
    assert torch.allclose(gm(x), before)


def test_keras_batchnorm_pass_installs_the_keras_rule():
    from server_torch.keras_compat import KerasBatchNorm
    from server_torch.passes import PASSES
    from server_torch.spec import BatchNormSpec, TorchSpec

    _, gm = _raw_graph(_conv_bn)
    (name,) = [n for n, m in gm.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert gm.get_submodule(name).momentum == pytest.approx(0.1)  # onnx2torch's default
    spec = TorchSpec(
        batchnorm={
            name: BatchNormSpec(
                keras_layer="bn", momentum=0.7, epsilon=1e-2, unbiased_running_var=True
            )
        }
    )
    PASSES["keras_batchnorm"](gm, spec)
    bn = gm.get_submodule(name)
    assert isinstance(bn, KerasBatchNorm) and bn.momentum == 0.7 and bn.epsilon == 1e-2


def test_trainable_parameters_pass_promotes_and_freezes():
    from server_torch.passes import PASSES
    from server_torch.spec import TorchSpec, VariableSpec

    def dense(keras):
        inp = keras.Input((5,), name="x")
        return keras.Model(inp, keras.layers.Dense(3, name="out")(inp))

    _, gm = _raw_graph(dense)
    buffers = [n for n, b in gm.named_buffers() if b.dtype.is_floating_point and b.ndim == 2]
    assert buffers, "onnx2torch keeps the MatMul weight as a buffer"
    weight = buffers[0]
    spec = TorchSpec(
        variables=[
            VariableSpec(
                keras="out/kernel",
                keras_shape=[5, 3],
                torch=weight,
                torch_shape=[5, 3],
                axes=[0, 1],
                trainable=True,
            )
        ]
    )
    PASSES["trainable_parameters"](gm, spec)
    assert weight in dict(gm.named_parameters())
    frozen = TorchSpec(variables=[spec.variables[0].model_copy(update={"trainable": False})])
    PASSES["trainable_parameters"](gm, frozen)
    assert weight not in dict(gm.named_parameters()) and weight in dict(gm.named_buffers())


def test_variable_layout_round_trip():
    from server_torch.spec import VariableSpec

    v = VariableSpec(
        keras="k",
        keras_shape=[3, 3, 2, 4],
        torch="t",
        torch_shape=[4, 2, 3, 3],
        axes=[3, 2, 0, 1],
        trainable=True,
    )
    k = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)
    assert np.array_equal(v.to_keras(v.to_torch(k)), k)
