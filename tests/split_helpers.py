"""Helpers shared by tests that need real bundles and real split runs (not fixtures)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import bundle_cache
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SGD_CFG = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9}
ADAM_CFG = {"name": "adam", "learning_rate": 0.001}
# The end-to-end tests share one bundle per (model, split, optimizer) with every device
# runtime's artefacts, instead of one conversion per runtime.
ALL_RUNTIMES = ("tf", "tfjs", "tflite")


def optimizer_spec(cfg: dict):
    from shared_schema import AdamSpec, SGDSpec

    return SGDSpec(**cfg) if cfg["name"] == "sgd" else AdamSpec(**cfg)


def digits_model(model: str = "digits-cnn"):
    """A built-in test model (``converters.models``), freshly built from its seed."""
    from converters.models import load_model

    built, _ = load_model(model)
    return built


def digits_cuts(split: str, model: str = "digits-cnn") -> list[str]:
    from converters.models import builtin_cuts

    cuts = list(builtin_cuts(model))
    return cuts if split == "double" else cuts[:1]


def digits_bundle(
    out: Path | None,
    split: str,
    opt_cfg: dict,
    runtimes: Sequence[str] = ("tf",),
    model: str = "digits-cnn",
):
    """(bundle_dir, unsplit reference model with the very same initial weights).

    The conversion comes from the on-disk cache (``bundle_cache``): one per
    (model, split, optimizer, runtimes) and converter source. With ``out`` the bundle is
    a private copy at ``out`` that the test may change; with ``out=None`` it is the
    cached bundle itself, read-only.
    """
    from device_tf.reference import clone_with_weights

    keras_model = digits_model(model)
    reference = clone_with_weights(keras_model)
    cached = bundle_cache.converted(
        keras_model,
        digits_cuts(split, model),
        model_name=model,
        optimizer=optimizer_spec(opt_cfg),
        runtimes=tuple(runtimes),
    )
    if out is None:
        return cached, reference
    return bundle_cache.copy_bundle(cached, Path(out)), reference


def fixed_batches(n: int = 5, batch_size: int = 32, seed: int = 0):
    from device_tf.data import batches, load_digits_split

    x, y, _, _ = load_digits_split(seed=seed)
    return list(batches(x, y, batch_size, epoch=0, seed=seed))[:n]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def split_run(bundle: Path, runtime, batches, serve_app, aux_label: bool = False):
    """Train ``batches`` with ``runtime`` against the real server (uvicorn on 127.0.0.1).

    Returns (losses, every variable of A, B and C by ``layer/var`` name).
    """
    from device_tf.loop import SplitTrainer
    from device_tf.transport import HttpTransport
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest, manifest_digest

    manifest = load_manifest(bundle)
    app = create_app(bundle)
    srv = serve_app(app)
    transport = HttpTransport(srv.url)
    try:
        with SplitTrainer(
            runtime, transport, manifest, manifest_digest(bundle), aux_label=aux_label
        ) as trainer:
            losses = [trainer.step(x, y).loss for x, y in batches]
    finally:
        transport.close()
    weights: dict[str, np.ndarray] = {}
    for held in runtime.weights().values():
        weights.update(held)
    weights.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    return losses, weights


def assert_matches_unsplit(
    label: str, losses, weights, reference, ref_losses, tol: float = 1e-4
) -> float:
    """Losses step by step and every variable within ``tol`` relative; returns the worst."""
    from device_tf.keras_util import named_variables

    loss_errs = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    assert set(weights) == set(expected), set(weights) ^ set(expected)
    errors = {name: rel(weights[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    print(
        f"\n{label}: largest ||w_split - w_unsplit||/||w_unsplit|| = {errors[worst]:.2e} ({worst}); "
        f"loss rel errors {[f'{e:.1e}' for e in loss_errs]}"
    )
    assert max(loss_errs) <= tol, (losses, ref_losses)
    assert errors[worst] <= tol, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert losses[-1] < losses[0], "training must move (the comparison is not vacuous)"
    # Every BatchNormalization's moving statistics moved (from 0 and 1): the comparison
    # above covered them in motion, on whichever side of the split they live.
    for name, value in expected.items():
        if name.endswith("/moving_mean"):
            assert np.linalg.norm(value) > 100 * tol, name
        elif name.endswith("/moving_variance"):
            assert rel(value, np.ones_like(value)) > 100 * tol, name
    return errors[worst]
