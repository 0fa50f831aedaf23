"""Split training equals unsplit training on ResNet50 and DenseNet121 (issue 3).

A double split at 32 px trains 3 SGD steps (momentum 0.9, lr 0.01) and the same network
trains unsplit in tf_keras from the same initial weights on the same batches.

Two tests per network, because float32 cannot carry a 1e-4 comparison on these nets:

- **Exactly, in float64.** The bundle's A and C run in the real device runtime
  (``TFRuntime``) as float64 twins, B runs in the server's own ``Trainer`` (float64,
  the bundle's torch module, the Keras-exact optimizer, B's BatchNorm rule), and the
  unsplit reference is a float64 twin of the whole network; every twin starts from the
  model's own variables (asserted) and takes float32 Keras' fused moving-variance rule.
  After the first step every moving statistic of A, B and C, and after the last every
  variable, must agree within 1e-4 relative, ``||w_split - w_unsplit|| / ||w_unsplit||``;
  they agree to ~1e-12. This is the issue's criterion, on the mathematics of the split.
- **Over real HTTP, in float32.** A and C in TF on the Python device, B in torch behind
  the real uvicorn on 127.0.0.1, against unsplit tf_keras. Here the 3-step result is
  chaotic at float32 resolution: a ReLU's derivative jumps at 0, and in these nets some
  pre-activation always lies within rounding of 0, so two float32 computations of the
  same gradient differ by ~1e-2 (in float64, moving ResNet50's input by 1e-7 relative
  moves the exact gradient by a median 4e-3), and three SGD steps at lr 0.01 amplify
  it. Unsplit Keras disagrees with *itself* that much when its input moves by one ulp.
  So the check is: the first step's loss agrees within 1e-5 (the forward pass is
  continuous), and after 3 steps split training is no further from unsplit training
  than unsplit training with the input moved by one ulp is (within a factor 3).
"""

from __future__ import annotations

import numpy as np
import pytest
from zoo_helpers import CUT_PAIRS, SGD_CFG, built, bundle, params

from split_helpers import split_run

TOL = 1e-4
# Moving statistics after one float64 step: a wrong variance rule (biased where Keras'
# fused kernel is unbiased) moves a moving variance by only (1 - momentum) / (N*H*W - 1),
# ~4e-5 on these nets, inside TOL; float64 agreement is ~1e-8, so 1e-6 tells them apart.
STAT_TOL = 1e-6
STEPS = 3
BATCH = 16
NOISE_FACTOR = 3.0

CASES = [("resnet50", CUT_PAIRS["resnet50"][0]), ("densenet121", CUT_PAIRS["densenet121"][0])]
IDS = [name for name, _ in CASES]


def random_batches(sample_shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random images: real digits resized to 32 px are mostly flat background, whose
    equal activations sit on ReLU kinks and max-pool ties together, the worst case of the
    float32 chaos above; random images are the typical case."""
    rng = np.random.default_rng(0)
    return [
        (
            rng.normal(size=(BATCH, *sample_shape)).astype(np.float32),
            rng.integers(0, 10, size=BATCH).astype(np.int32),
        )
        for _ in range(STEPS)
    ]


def unsplit_run(model, batches, manifest) -> tuple[list[float], dict[str, np.ndarray]]:
    """``device_tf.reference.train_unsplit`` (plain Keras compile + train_on_batch), run
    eagerly: the same Keras train step (the same losses to the last bit on these nets)
    without tracing a 400-layer training graph first (10-20 s of the test)."""
    from device_tf.keras_util import keras_loss, keras_optimizer, named_variables

    model.compile(
        optimizer=keras_optimizer(manifest.optimizer),
        loss=keras_loss(manifest.loss),
        run_eagerly=True,
    )
    losses = [float(model.train_on_batch(x, y)) for x, y in batches]
    return losses, {k: v.numpy() for k, v in named_variables(model).items()}


def relative_errors(got: dict, want: dict, floor: float = 1e-30) -> dict[str, float]:
    assert set(got) == set(want), set(got) ^ set(want)
    return {
        k: float(np.linalg.norm(got[k] - w) / max(np.linalg.norm(w), floor))
        for k, w in want.items()
    }


# -- float64: the split's mathematics, every variable within 1e-4 ------------------------


def _fused_rule_bn():
    """tf_keras BatchNormalization computing in float64 with the moving-variance rule of
    float32 Keras' fused kernel.

    TF has no float64 fused BatchNorm, so a float64 twin takes the non-fused path, whose
    moving variance accumulates the *biased* batch variance; the fused float32 path that
    Keras (and so B, on the server) uses for 4-D inputs accumulates the *unbiased* one,
    n/(n-1) times larger (n = N*H*W). Normalisation itself uses the biased variance on
    both paths. This layer applies the fused rule where the float32 original was fused
    (``fused_rule``), so the float64 reference trains as float32 Keras does, and the real
    server ``Trainer`` runs B with B's own rule.
    """
    import tensorflow as tf
    import tf_keras as keras

    class FusedRuleBatchNormalization(keras.layers.BatchNormalization):
        fused_rule = False
        _count = None

        def call(self, inputs, training=None, mask=None):
            self._count = None
            if self.fused_rule and inputs.shape.rank == 4:
                self._count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), inputs.dtype)
            return super().call(inputs, training=training, mask=mask)

        def _assign_moving_average(self, variable, value, momentum, inputs_size):
            if self._count is not None and variable is self.moving_variance:
                value = value * self._count / (self._count - 1)
            return super()._assign_moving_average(variable, value, momentum, inputs_size)

    return FusedRuleBatchNormalization


def float64_twin(model):
    """The same Keras graph computing in float64 (fused-rule BatchNorm where the original
    is fused), starting from the model's own variables -- asserted, name by name."""
    import copy

    import tf_keras as keras

    from device_tf.keras_util import named_variables

    bn_class = _fused_rule_bn()
    config = copy.deepcopy(model.get_config())
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float64"
        if layer["class_name"] == "BatchNormalization":  # built-ins ignore custom_objects
            layer["class_name"] = bn_class.__name__
            layer.pop("module", None)
            layer.pop("registered_name", None)
    custom = {type(layer).__name__: type(layer) for layer in model.layers}
    custom[bn_class.__name__] = bn_class
    twin = keras.Model.from_config(config, custom_objects=custom)
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    bns = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    for layer in bns:
        twin_layer = twin.get_layer(layer.name)
        assert isinstance(twin_layer, bn_class), layer.name
        twin_layer.fused_rule = bool(layer.fused)
    original = {k: v.numpy() for k, v in named_variables(model).items()}
    copied = {k: v.numpy() for k, v in named_variables(twin).items()}
    assert list(copied) == list(original)
    for name, value in original.items():
        assert copied[name].dtype == np.float64, name
        np.testing.assert_array_equal(copied[name], value.astype(np.float64), err_msg=name)
    return twin


def float64_server(path, manifest):
    """The server's own ``Trainer`` on the bundle's B, in float64.

    Keras holds hyper-parameters as float32 variables and multiplies with them there;
    float64 torch would use 0.01 where Keras uses 0.0099999998 (three unstable steps
    turn that 2e-8 into ~4e-6 on ResNet50), so the Trainer gets them rounded as Keras
    holds them."""
    import torch

    from server_torch.rebuild import load_server_slice
    from server_torch.trainer import Trainer

    opt = manifest.optimizer
    as_f32 = {k: float(np.float32(v)) for k, v in opt.model_dump().items() if type(v) is float}
    keras_like = manifest.model_copy(update={"optimizer": opt.model_copy(update=as_f32)})
    trainer = Trainer(load_server_slice(path), keras_like, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in trainer.module.parameters())
    return trainer


def unsplit_steps(model, batches, manifest) -> tuple[list[float], list[dict[str, np.ndarray]]]:
    """``unsplit_run`` keeping every variable after every step."""
    from device_tf.keras_util import keras_loss, keras_optimizer, named_variables

    model.compile(
        optimizer=keras_optimizer(manifest.optimizer),
        loss=keras_loss(manifest.loss),
        run_eagerly=True,
    )
    losses, after = [], []
    for x, y in batches:
        losses.append(float(model.train_on_batch(x, y)))
        after.append({k: v.numpy() for k, v in named_variables(model).items()})
    return losses, after


@pytest.mark.slow
@pytest.mark.parametrize("name,cuts", params(CASES, IDS))
def test_split_training_equals_unsplit_in_float64(name, cuts):
    """A and C in the device runtime (``TFRuntime``) and B in the server's ``Trainer``, all
    in float64, against the whole network's float64 twin: after the first step every
    BatchNormalization moving statistic (A's, B's and C's), and after the last every
    variable, within 1e-4 relative."""
    import tf_keras as keras

    from device_tf.keras_util import named_variables
    from device_tf.tf_runtime import TFRuntime
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest

    model, _ = built(name)
    path = bundle(name, cuts)
    manifest = load_manifest(path)
    assert manifest.optimizer.model_dump() == {**SGD_CFG, "nesterov": False}
    batches = [(x.astype(np.float64), y) for x, y in random_batches(manifest.input.sample_shape)]

    initial = {k: v.numpy() for k, v in named_variables(model).items()}

    def twin(slice_name: str):
        saved = path / manifest.slice(slice_name).artifact("savedmodel").path
        loaded = keras.models.load_model(saved, compile=False)
        for k, v in named_variables(loaded).items():  # the bundle's slice is the model's
            np.testing.assert_array_equal(v.numpy(), initial[k], err_msg=k)
        return float64_twin(loaded)

    device = TFRuntime(twin("A"), twin("C"), manifest)
    server = float64_server(path, manifest)
    spec = TorchSpec.load(path / "B")
    losses, after = [], []
    for x, y in batches:  # the order of SplitTrainer.step: two round trips
        b = server.forward(device.a_forward(x))
        assert b.dtype == np.float64
        loss, g_b = device.c_train(b, y)
        device.a_backward(server.backward(g_b))
        losses.append(loss)
        held = {**device.weights()["A"], **device.weights()["C"]}
        after.append({**held, **keras_weights(server.module, spec)})
    assert server.steps == STEPS

    ref_losses, ref_after = unsplit_steps(float64_twin(model), batches, manifest)
    weights, expected = after[-1], ref_after[-1]
    moved = {k: float(np.linalg.norm(expected[k] - initial[k])) for k in expected}
    # ResNet's convolution biases sit right before a BatchNorm, which subtracts the batch
    # mean: their exact gradient is zero and they hold rounding noise (~1e-17) on both
    # sides. They are measured against a floor of 1e-4 of the median distance a tensor moved.
    floor = TOL * float(np.median([m for m in moved.values() if m > 0]))

    # After one step, per tensor: every moving statistic, on whichever side it lives.
    stats = [k for k in expected if k.endswith(("/moving_mean", "/moving_variance"))]
    assert stats
    first = relative_errors(
        {k: after[0][k] for k in stats}, {k: ref_after[0][k] for k in stats}, floor
    )
    worst_stat = max(first, key=first.get)
    assert first[worst_stat] <= STAT_TOL, sorted(first.items(), key=lambda kv: -kv[1])[:5]
    for k in stats:  # they moved in that step: the comparison is not of initial values
        assert not np.array_equal(ref_after[0][k], initial[k]), k

    errors = relative_errors(weights, expected, floor)
    near_zero = [k for k, w in expected.items() if np.linalg.norm(w) < floor]
    worst = max(errors, key=errors.get)
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    print(
        f"\n{name} {'|'.join(cuts)} float64, {STEPS} SGD steps: {len(errors)} tensors, largest "
        f"||w_split - w_unsplit||/||w_unsplit|| = {errors[worst]:.1e} ({worst}); after step 1, "
        f"{len(stats)} moving statistics within {first[worst_stat]:.1e} ({worst_stat}); "
        f"{len(near_zero)} exactly-zero-gradient tensors against a floor of {floor:.1e}; "
        f"largest loss rel error {loss_err:.1e}"
    )
    assert loss_err <= TOL, (losses, ref_losses)
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert all(k.endswith("_conv/bias") for k in near_zero), near_zero
    # Not vacuous: every slice's variables moved far beyond the tolerance.
    held = {s: set(w) for s, w in device.weights().items()}
    held["B"] = {v.keras for v in spec.variables}
    for slice_name, names in held.items():
        most = max(moved[k] / max(np.linalg.norm(initial[k]), 1e-30) for k in names)
        assert most > 100 * TOL, slice_name


# -- float32 over HTTP: within the float32 noise of unsplit Keras itself ----------------


@pytest.mark.slow
@pytest.mark.parametrize("name,cuts", params(CASES, IDS))
def test_split_training_over_http_is_within_float32_noise(serve_app, name, cuts):
    from device_tf.reference import clone_with_weights
    from device_tf.tf_runtime import TFRuntime
    from shared_schema import load_manifest

    model, _ = built(name)
    path = bundle(name, cuts)
    manifest = load_manifest(path)
    batches = random_batches(manifest.input.sample_shape)
    rng = np.random.default_rng(1)
    one_ulp = [
        ((x * (1 + 2.0**-23 * rng.choice([-1.0, 1.0], size=x.shape))).astype(np.float32), y)
        for x, y in batches
    ]

    losses, weights = split_run(path, TFRuntime.from_bundle(path), batches, serve_app)
    ref_losses, expected = unsplit_run(clone_with_weights(model), batches, manifest)
    _, moved_input = unsplit_run(clone_with_weights(model), one_ulp, manifest)

    def distance(w: dict) -> float:
        return float(np.sqrt(sum(np.linalg.norm(w[k] - v) ** 2 for k, v in expected.items())))

    split_err, noise = distance(weights), distance(moved_input)
    errors = relative_errors(weights, expected)
    first_loss_err = abs(losses[0] - ref_losses[0]) / abs(ref_losses[0])
    print(
        f"\n{name} {'|'.join(cuts)} float32 over HTTP, {STEPS} SGD steps: "
        f"||W_split - W_unsplit|| = {split_err:.3g}, unsplit with the input moved by one ulp: "
        f"{noise:.3g}; median tensor rel error {np.median(list(errors.values())):.1e}; "
        f"first-step loss rel error {first_loss_err:.1e}"
    )
    assert first_loss_err <= 1e-5, (losses, ref_losses)
    assert 0 < split_err <= NOISE_FACTOR * noise, (split_err, noise)
