"""Models that are not image classifiers train split exactly as unsplit (issue 9, item 4).

Each built-in model here converts through the bundle cache (one conversion per
configuration) and trains 5 steps split -- A and C in TF on the Python device, B in
torch behind the real uvicorn on 127.0.0.1 -- and unsplit in tf_keras from the same
initial weights on the same batches; losses and every variable must agree within 1e-4.

- ``tabular-mlp``: 2-D (NC) cut tensors, Dense layers on every side.
"""

from __future__ import annotations

import numpy as np
import pytest

from split_helpers import (
    SGD_CFG,
    assert_matches_unsplit,
    digits_bundle,
    fixed_batches,
    split_run,
)

TOL = 1e-4


def tabular_batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """The digits batches, each image flattened to 64 features (a table of numbers)."""
    return [(x.reshape(len(x), -1), y) for x, y in fixed_batches()]


@pytest.mark.parametrize("split", ["double", "single"])
def test_tabular_mlp_split_equals_unsplit(serve_app, split):
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, split, SGD_CFG, ("tf",), "tabular-mlp")
    manifest = load_manifest(bundle)
    assert [c.layout for c in manifest.cuts] == ["NC"] * len(manifest.cuts)
    batches = tabular_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit(f"tabular-mlp/{split}", losses, weights, reference, ref_losses, TOL)


def token_batches(n: int = 5, batch_size: int = 32, seed: int = 0):
    """Learnable token sequences: class k's sequences are sprinkled with ids from its own
    band of the vocabulary among uniform noise ids (int32, shape (batch, 16))."""
    from converters.models import TEXT_LENGTH, TEXT_VOCAB

    rng = np.random.default_rng(seed)
    classes, band = 10, 4
    out = []
    for _ in range(n):
        y = rng.integers(0, classes, batch_size).astype(np.int32)
        x = rng.integers(classes * band, TEXT_VOCAB, (batch_size, TEXT_LENGTH))
        marks = rng.random((batch_size, TEXT_LENGTH)) < 0.4
        ids = y[:, None] * band + rng.integers(0, band, (batch_size, TEXT_LENGTH))
        out.append((np.where(marks, ids, x).astype(np.int32), y))
    return out


@pytest.mark.parametrize("split", ["double", "single"])
def test_text_cnn_split_equals_unsplit(serve_app, split):
    """Embedding on int32 ids in A; Conv1D, Max/AveragePooling1D and global pooling in B
    (the cut a_out is NWC on the wire); Dense in C."""
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, split, SGD_CFG, ("tf",), "text-cnn")
    manifest = load_manifest(bundle)
    assert manifest.input.dtype == "int32"
    assert manifest.cuts[0].layout == "NWC" and manifest.cuts[0].shape == [None, 16, 8]
    batches = token_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(bundle, TFRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit(f"text-cnn/{split}", losses, weights, reference, ref_losses, TOL)
