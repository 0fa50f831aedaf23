"""The trainer on its own: layout handling without copies, dtypes, optimizers, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_server_helpers import (
    double_b,
    double_manifest,
    nhwc_to_torch,
    rand,
    single_b,
    single_manifest,
)

from server_torch.errors import LabelOutOfRange, NonFinite, StepConflict
from server_torch.keras_compat import KerasAdam, KerasSGD
from server_torch.trainer import Trainer
from shared_schema import AdamSpec, FrameSpecMismatch, SGDSpec, TensorSpec


def _state(tr: Trainer) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in tr.module.state_dict().items()}


def test_incoming_activation_is_viewed_not_copied():
    tr = Trainer(double_b(), double_manifest())
    a = rand((3, 8, 8, 4), 0)
    b = tr.forward(a)
    leaf = tr._pending.leaf
    assert leaf.data_ptr() == a.ctypes.data  # B reads the wire buffer itself
    assert b.shape == (3, 4, 4, 8) and b.flags.c_contiguous and b.dtype == np.float32
    g_a = tr.backward(rand((3, 4, 4, 8), 1))
    assert g_a.shape == a.shape and g_a.flags.c_contiguous and g_a.dtype == np.float32


def test_optimizers_follow_the_manifest():
    tr = Trainer(
        double_b(), double_manifest(SGDSpec(learning_rate=0.5, momentum=0.8, nesterov=True))
    )
    assert isinstance(tr.optimizer, KerasSGD)
    assert tr.optimizer.defaults == {"lr": 0.5, "momentum": 0.8, "nesterov": True}
    spec = AdamSpec(learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-5)
    tr = Trainer(single_b(), single_manifest(optimizer=spec))
    assert isinstance(tr.optimizer, KerasAdam)
    assert tr.optimizer.defaults == {"lr": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5}
    # every trainable parameter is optimised
    assert sum(len(g["params"]) for g in tr.optimizer.param_groups) == len(
        list(tr.module.parameters())
    )


def test_rejections_happen_before_b_is_touched():
    tr = Trainer(double_b(), double_manifest())
    state = _state(tr)
    bad = rand((2, 8, 8, 4), 0)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(NonFinite):
        tr.forward(bad)
    with pytest.raises(FrameSpecMismatch):
        tr.forward(rand((2, 4, 8, 8), 0))  # NCHW bytes where NHWC is expected
    with pytest.raises(StepConflict):
        tr.backward(rand((2, 4, 4, 8), 0))
    assert _state(tr) == state and tr.steps == 0
    tr.forward(rand((2, 8, 8, 4), 0))
    state = _state(tr)
    with pytest.raises(FrameSpecMismatch):
        tr.backward(rand((3, 4, 4, 8), 0))
    assert _state(tr) == state and tr.pending_batch == 2

    st = Trainer(single_b(), single_manifest())
    state = _state(st)
    with pytest.raises(LabelOutOfRange):
        st.step_single(rand((2, 8, 8, 4), 0), np.array([0, 10], dtype=np.int32))
    with pytest.raises(FrameSpecMismatch):
        st.step_single(rand((2, 8, 8, 4), 0), np.array([[0, 1]], dtype=np.int32))
    assert _state(st) == state


def test_float16_on_the_wire_float32_inside():
    m = double_manifest()
    half = m.model_copy(
        update={"cuts": [TensorSpec(**{**c.model_dump(), "dtype": "float16"}) for c in m.cuts]}
    )
    tr = Trainer(double_b(), half)
    a = rand((2, 8, 8, 4), 0).astype(np.float16)
    b = tr.forward(a)
    assert b.dtype == np.float16
    assert tr.backward(rand((2, 4, 4, 8), 1).astype(np.float16)).dtype == np.float16
    ref = double_b()
    with torch.no_grad():
        expect = ref(nhwc_to_torch(a.astype(np.float32))).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(b.astype(np.float32), expect, rtol=2e-3, atol=2e-3)


def test_infer_uses_running_statistics_and_restores_training_mode():
    tr = Trainer(double_b(), double_manifest())
    for i in range(3):
        tr.forward(rand((8, 8, 8, 4), i, scale=3.0))
        tr.backward(rand((8, 4, 4, 8), 10 + i, scale=0.01))
    a = rand((4, 8, 8, 4), 99)
    out = tr.infer(a)
    assert tr.module.training
    with torch.no_grad():
        expect = tr.module.eval()(nhwc_to_torch(a)).permute(0, 2, 3, 1).numpy()
    tr.module.train()
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


def test_single_split_learns_a_fixed_batch():
    tr = Trainer(single_b(seed=1), single_manifest())
    a = rand((32, 8, 8, 4), 0)
    y = np.random.default_rng(0).integers(0, 10, 32).astype(np.int32)
    losses = [tr.step_single(a, y)[1] for _ in range(30)]
    assert losses[-1] < 0.25 * losses[0], losses
    assert tr.steps == 30
