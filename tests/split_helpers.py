"""Helpers shared by tests that need real bundles and real split runs (not fixtures)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SGD_CFG = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}
ADAM_CFG = {"name": "adam", "learning_rate": 0.001}


def optimizer_spec(cfg: dict):
    from shared_schema import AdamSpec, SGDSpec

    return SGDSpec(**cfg) if cfg["name"] == "sgd" else AdamSpec(**cfg)


def digits_bundle(out: Path, split: str, opt_cfg: dict, runtimes=("tf",)):
    """(bundle_dir, unsplit reference model with the very same initial weights)."""
    from converters.bundle import write_bundle
    from converters.models import DIGITS_CUTS, digits_cnn
    from device_tf.reference import clone_with_weights

    model = digits_cnn()
    reference = clone_with_weights(model)
    cuts = list(DIGITS_CUTS) if split == "double" else [DIGITS_CUTS[0]]
    write_bundle(
        model,
        cuts,
        out,
        model_name="digits-cnn",
        optimizer=optimizer_spec(opt_cfg),
        runtimes=runtimes,
    )
    return out, reference


def fixed_batches(n: int = 5, batch_size: int = 32, seed: int = 0):
    from device_tf.data import batches, load_digits_split

    x, y, _, _ = load_digits_split(seed=seed)
    return list(batches(x, y, batch_size, epoch=0, seed=seed))[:n]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
