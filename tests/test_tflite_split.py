"""The TFLite device trains the real split against the real torch server like unsplit Keras.

``spliteasy convert``'s bundle writer emits A/C as ``.tflite`` training models; the
device runs them in the TFLite interpreter (Flex delegate) through the same step loop
and HTTP transport as the TF device, B trains in torch behind real uvicorn on
127.0.0.1. After 5 steps from the same initial weights on the same batches, losses and
every variable of A, B and C agree with unsplit tf_keras within 1e-4 relative.
"""

from __future__ import annotations

import pytest

from split_helpers import ADAM_CFG, SGD_CFG, digits_bundle, fixed_batches, rel

TOL = 1e-4


@pytest.mark.parametrize(
    ("split", "opt_cfg"),
    [("double", SGD_CFG), ("double", ADAM_CFG), ("single", ADAM_CFG)],
    ids=["double-sgd_momentum", "double-adam", "single-adam"],
)
def test_tflite_split_equals_unsplit(tmp_path, serve_app, split, opt_cfg):
    from device_tf.keras_util import named_variables
    from device_tf.loop import SplitTrainer
    from device_tf.reference import train_unsplit
    from device_tf.tflite_runtime import TFLiteRuntime
    from device_tf.transport import HttpTransport
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest, manifest_digest

    bundle, reference = digits_bundle(tmp_path / "bundle", split, opt_cfg, runtimes=("tflite",))
    manifest = load_manifest(bundle)  # verifies every hash, the .tflite files included
    device_slices = ["A", "C"] if split == "double" else ["A"]
    for name in device_slices:
        art = manifest.slice(name).artifact("tflite")
        assert (art.path, art.runtime) == (f"{name}/model.tflite", "tflite")
        assert art.bytes == (bundle / art.path).stat().st_size

    batches = fixed_batches()
    ref_losses = train_unsplit(reference, batches, manifest.optimizer, manifest.loss)

    app = create_app(bundle)
    srv = serve_app(app)
    runtime = TFLiteRuntime.from_bundle(bundle)
    transport = HttpTransport(srv.url)
    with SplitTrainer(runtime, transport, manifest, manifest_digest(bundle)) as trainer:
        losses = [trainer.step(x, y).loss for x, y in batches]
    transport.close()

    loss_errs = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    got = {}
    for held in runtime.weights().values():
        got.update(held)
    got.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    assert set(got) == set(expected), set(got) ^ set(expected)
    errors = {name: rel(got[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    print(
        f"\ntflite {split}/{opt_cfg['name']}: largest weight rel err {errors[worst]:.2e} "
        f"({worst}); loss rel errors {[f'{e:.1e}' for e in loss_errs]}"
    )
    assert max(loss_errs) <= TOL, (losses, ref_losses)
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert losses[-1] < losses[0]


def test_bundle_without_tflite_is_refused_with_a_message(tmp_path):
    from device_tf.tflite_runtime import TFLiteRuntime, TFLiteRuntimeError

    bundle, _ = digits_bundle(tmp_path / "bundle", "double", SGD_CFG, runtimes=("tf",))
    with pytest.raises(TFLiteRuntimeError, match="no TFLite model for slice A.*tflite"):
        TFLiteRuntime.from_bundle(bundle)
