"""Split training equals unsplit training on ResNet50 and DenseNet121 (issue 3).

A double split at 32 px trains 3 SGD steps (momentum 0.9, lr 0.01) and the same network
trains unsplit in tf_keras from the same initial weights on the same batches.

Two tests per network, because float32 cannot carry a 1e-4 comparison on these nets:

- **Exactly, in float64.** The bundle's A and C run in the real device runtime
  (``TFRuntime``) as float64 twins, B is the bundle's torch module in float64 with the
  server's Keras-exact optimizer, and the unsplit reference is a float64 twin of the
  whole network. Every variable of A, B and C (weights and BatchNorm moving statistics)
  must agree within 1e-4 relative, ``||w_split - w_unsplit|| / ||w_unsplit||``; they
  agree to ~1e-12. This is the issue's criterion, on the mathematics of the split.
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


class Float64ServerB:
    """B as the server trains it (``server_torch.trainer.Trainer``), in float64.

    The Trainer is float32 by design (the wire is float32), so its few lines are
    repeated here around the bundle's own module and the server's optimizer. Float64
    Keras has no fused BatchNorm, so the twins take the non-fused running-variance rule
    (biased); B's copy takes it too. B's own fused rule is checked in float32, by the
    converter (against Keras' moving variance) and by the HTTP test.
    """

    def __init__(self, path, manifest):
        import torch

        from server_torch.keras_compat import KerasBatchNorm
        from server_torch.rebuild import load_server_slice
        from server_torch.trainer import build_optimizer

        self.module = load_server_slice(path).to(torch.float64).train()
        for mod in self.module.modules():
            if isinstance(mod, KerasBatchNorm):
                mod.unbiased_running_var = False
        params = [p for p in self.module.parameters() if p.requires_grad]
        # Keras holds hyper-parameters as float32 variables; float32 torch rounds them the
        # same way when it multiplies, float64 torch would use 0.01 where Keras uses
        # 0.0099999998 (three unstable steps turn that 2e-8 into ~4e-6 on ResNet50).
        opt = manifest.optimizer
        as_f32 = {k: float(np.float32(v)) for k, v in opt.model_dump().items() if type(v) is float}
        self.optimizer = build_optimizer(opt.model_copy(update=as_f32), params)
        self.layout_in = manifest.server_input.layout
        self.layout_out = manifest.server_output.layout

    def forward(self, a: np.ndarray) -> np.ndarray:
        import torch

        from converters.verify import from_torch_layout, to_torch_layout

        self.leaf = torch.from_numpy(to_torch_layout(a, self.layout_in)).requires_grad_(True)
        self.out = self.module(self.leaf)
        return from_torch_layout(self.out.detach().numpy(), self.layout_out)

    def backward(self, g: np.ndarray) -> np.ndarray:
        import torch

        from converters.verify import from_torch_layout, to_torch_layout

        self.out.backward(torch.from_numpy(to_torch_layout(g, self.layout_out)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return from_torch_layout(self.leaf.grad.numpy(), self.layout_in)


@pytest.mark.slow
@pytest.mark.parametrize("name,cuts", params(CASES, IDS))
def test_split_training_equals_unsplit_in_float64(name, cuts):
    import tf_keras as keras

    from converters.verify import _float64_twin
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

    def twin(slice_name: str):
        saved = path / manifest.slice(slice_name).artifact("savedmodel").path
        return _float64_twin(keras.models.load_model(saved, compile=False))

    device = TFRuntime(twin("A"), twin("C"), manifest)
    server = Float64ServerB(path, manifest)
    losses = []
    for x, y in batches:  # the order of SplitTrainer.step: two round trips
        b = server.forward(device.a_forward(x))
        loss, g_b = device.c_train(b, y)
        device.a_backward(server.backward(g_b))
        losses.append(loss)
    weights = {**device.weights()["A"], **device.weights()["C"]}
    weights.update(keras_weights(server.module, TorchSpec.load(path / "B")))

    ref_losses, expected = unsplit_run(_float64_twin(model), batches, manifest)
    initial = {k: v.numpy() for k, v in named_variables(model).items()}
    moved = {k: float(np.linalg.norm(expected[k] - initial[k])) for k in expected}
    # ResNet's convolution biases sit right before a BatchNorm, which subtracts the batch
    # mean: their exact gradient is zero and they hold rounding noise (~1e-17) on both
    # sides. They are measured against a floor of 1e-4 of the median distance a tensor moved.
    floor = TOL * float(np.median([m for m in moved.values() if m > 0]))
    errors = relative_errors(weights, expected, floor)
    near_zero = [k for k, w in expected.items() if np.linalg.norm(w) < floor]
    worst = max(errors, key=errors.get)
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    print(
        f"\n{name} {'|'.join(cuts)} float64, {STEPS} SGD steps: {len(errors)} tensors, largest "
        f"||w_split - w_unsplit||/||w_unsplit|| = {errors[worst]:.1e} ({worst}); "
        f"{len(near_zero)} exactly-zero-gradient tensors against a floor of {floor:.1e}; "
        f"largest loss rel error {loss_err:.1e}"
    )
    assert loss_err <= TOL, (losses, ref_losses)
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert all(k.endswith("_conv/bias") for k in near_zero), near_zero
    # Not vacuous: every slice's variables moved far beyond the tolerance.
    held = {s: set(w) for s, w in device.weights().items()}
    held["B"] = {v.keras for v in TorchSpec.load(path / "B").variables}
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
