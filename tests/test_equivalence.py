"""Split training equals unsplit training (issue 2's central claim), over real HTTP.

A and C train in TF on the Python device, B in torch behind the real uvicorn on
127.0.0.1; the same model trains unsplit in tf_keras from the same initial weights on
the same batches. The model is ``digits-bn``, with BatchNormalization in A, B and C, so
the device's BN training and moving statistics are checked along with the server's.
After 5 steps every variable of A, B and C (trainable weights and BatchNorm moving
statistics) must agree within 1e-4 relative, and so must the losses step by step --
for both split modes, both optimizers, and both the gradient and the auxiliary-label
form of the protocol (every combination: none is skipped).
"""

from __future__ import annotations

import pytest

from split_helpers import (
    ADAM_CFG,
    ALL_RUNTIMES,
    SGD_CFG,
    assert_matches_unsplit,
    digits_bundle,
    fixed_batches,
    optimizer_spec,
    split_run,
)

TOL = 1e-4
MODEL = "digits-bn"


@pytest.mark.parametrize("split", ["double", "single"])
@pytest.mark.parametrize("opt_cfg", [SGD_CFG, ADAM_CFG], ids=["sgd_momentum", "adam"])
@pytest.mark.parametrize("aux_label", [False, True], ids=["gradient", "aux_label"])
def test_split_equals_unsplit(serve_app, split, opt_cfg, aux_label):
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, split, opt_cfg, ALL_RUNTIMES, MODEL)
    manifest = load_manifest(bundle)
    # Both sides train with the optimizer the bundle carries: the one asked for, every
    # hyper-parameter included (the unsplit reference below is built from the manifest).
    assert manifest.optimizer == optimizer_spec(opt_cfg)
    assert manifest.split_mode == split and manifest.model == MODEL
    batches = fixed_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)
    losses, weights = split_run(
        bundle, TFRuntime.from_bundle(bundle), batches, serve_app, aux_label
    )
    assert_matches_unsplit(
        f"{split}/{opt_cfg['name']}/aux={aux_label}", losses, weights, reference, ref_losses, TOL
    )
