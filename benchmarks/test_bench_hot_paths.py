"""Benchmarks of the per-step hot paths (``make bench``; not part of ``make test``).

Speed is measured here, never asserted in tests: pytest-benchmark records the figures
(``--benchmark-json``) so runs can be compared over time.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from shared_schema import Frame, FrameKind, decode, encode  # noqa: E402

SESSION = bytes(16)


@pytest.mark.parametrize("batch", [32, 256])
def test_encode_activation(benchmark, batch):
    arr = np.random.default_rng(0).normal(size=(batch, 8, 8, 16)).astype(np.float32)
    frame = Frame(FrameKind.ACTIVATION, "a_out", arr, "NHWC", SESSION, 1)
    body = benchmark(encode, [frame])
    assert len(body) > arr.nbytes


@pytest.mark.parametrize("batch", [32, 256])
def test_decode_activation(benchmark, batch):
    arr = np.random.default_rng(0).normal(size=(batch, 8, 8, 16)).astype(np.float32)
    body = encode([Frame(FrameKind.ACTIVATION, "a_out", arr, "NHWC", SESSION, 1)])
    frames = benchmark(decode, body)
    assert frames[0].array.shape == arr.shape


@pytest.fixture(scope="module")
def digits_trainer(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from server_torch.rebuild import load_server_slice
    from server_torch.serving import configure_threads
    from server_torch.trainer import Trainer
    from shared_schema import load_manifest
    from split_helpers import SGD_CFG, digits_bundle

    configure_threads()  # the server's own default (half the cores)

    bundle, _ = digits_bundle(tmp_path_factory.mktemp("bench") / "bundle", "double", SGD_CFG)
    manifest = load_manifest(bundle)
    return Trainer(load_server_slice(bundle, manifest), manifest)


def test_server_b_step_digits_batch32(benchmark, digits_trainer):
    rng = np.random.default_rng(0)
    a = rng.random((32, 8, 8, 16), dtype=np.float32)
    g = rng.random((32, 4, 4, 32), dtype=np.float32)

    def step():
        digits_trainer.forward(a)
        return digits_trainer.backward(g)

    g_a = benchmark(step)
    assert g_a.shape == a.shape
