"""The TFLite device trains the real split against the real torch server like unsplit Keras.

``spliteasy convert``'s bundle writer emits A/C as ``.tflite`` training models; the
device runs them in the TFLite interpreter (Flex delegate) through the same step loop
and HTTP transport as the TF device, B trains in torch behind real uvicorn on
127.0.0.1. The model is ``digits-bn``, with BatchNormalization in A, B and C. After 5
steps from the same initial weights on the same batches, losses and every variable of
A, B and C (BN moving statistics included) agree with unsplit tf_keras within 1e-4
relative.
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
    split_run,
)

TOL = 1e-4
MODEL = "digits-bn"  # BatchNormalization in A, B and C


@pytest.mark.parametrize(
    ("split", "opt_cfg"),
    [("double", SGD_CFG), ("double", ADAM_CFG), ("single", ADAM_CFG)],
    ids=["double-sgd_momentum", "double-adam", "single-adam"],
)
def test_tflite_split_equals_unsplit(tmp_path, serve_app, split, opt_cfg):
    from device_tf.reference import train_unsplit
    from device_tf.tflite_runtime import TFLiteRuntime
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, split, opt_cfg, ALL_RUNTIMES, MODEL)
    manifest = load_manifest(bundle)  # verifies every hash, the .tflite files included
    device_slices = ["A", "C"] if split == "double" else ["A"]
    for name in device_slices:
        art = manifest.slice(name).artifact("tflite")
        assert (art.path, art.runtime) == (f"{name}/model.tflite", "tflite")
        assert art.bytes == (bundle / art.path).stat().st_size

    batches = fixed_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)

    losses, weights = split_run(bundle, TFLiteRuntime.from_bundle(bundle), batches, serve_app)
    assert_matches_unsplit(
        f"tflite {split}/{opt_cfg['name']}", losses, weights, reference, ref_losses, TOL
    )


def test_bundle_without_tflite_is_refused_with_a_message(digits_bundle_dir):
    from device_tf.tflite_runtime import TFLiteRuntime, TFLiteRuntimeError

    bundle = digits_bundle_dir  # converted with runtime tf only
    with pytest.raises(TFLiteRuntimeError, match="no TFLite model for slice A.*tflite"):
        TFLiteRuntime.from_bundle(bundle)
