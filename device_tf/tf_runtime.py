"""The Python TensorFlow device runtime: A and C as tf_keras models from the bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared_schema import Manifest, load_manifest

from ._exceptions import DeviceError, StateError
from .keras_util import keras_loss, keras_optimizer, named_variables
from .runtime import DeviceRuntime, RuntimeState, state_mismatch

RANDOM_LAYERS = ("Dropout", "SpatialDropout", "GaussianNoise", "GaussianDropout", "AlphaDropout")


def _check_recomputable(model) -> None:
    """``--recompute-a`` recomputes A's forward in the backward pass; a layer that draws
    random numbers in training would draw others the second time (gradients of another
    mask than the forward used), so such an A is refused instead of trained inexactly."""
    for layer in model.submodules:
        name = type(layer).__name__
        if any(name.startswith(r) for r in RANDOM_LAYERS):
            raise DeviceError(
                f"--recompute-a: slice A holds {name} layer {layer.name!r}, whose random "
                "draws would differ in the recomputation; train without --recompute-a"
            )


class TFRuntime(DeviceRuntime):
    """A (and C) trained eagerly with GradientTape and the manifest's Keras optimizer.

    A and C get their own optimizer instances; each steps once per training step, so
    Adam's step count and every slot match one optimizer over the unsplit model.
    ``state``/``load_state`` carry the variables, the optimizer slots and ``iterations``.
    """

    name = "tf"

    def __init__(self, a_model, c_model, manifest: Manifest, *, recompute_a: bool = False) -> None:
        self.a = a_model
        self.c = c_model
        self.manifest = manifest
        self.opt_a = keras_optimizer(manifest.optimizer)
        self.opt_c = keras_optimizer(manifest.optimizer) if c_model is not None else None
        self.loss_fn = keras_loss(manifest.loss)
        self._pending = None
        self.recompute_a = recompute_a
        if recompute_a:
            _check_recomputable(a_model)

    @classmethod
    def from_bundle(
        cls, bundle: Path | str, manifest: Manifest | None = None, *, recompute_a: bool = False
    ) -> TFRuntime:
        import tf_keras as keras

        bundle = Path(bundle)
        manifest = manifest or load_manifest(bundle)
        load = lambda name: keras.models.load_model(  # noqa: E731
            bundle / manifest.slice(name).artifact("savedmodel").path, compile=False
        )
        c = load("C") if manifest.split_mode == "double" else None
        return cls(load("A"), c, manifest, recompute_a=recompute_a)

    def a_forward(self, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            if self.recompute_a:
                # Only x and a are kept across the round trip; A's inner activations are
                # recomputed inside tape.gradient (in a_backward).
                a = tf.recompute_grad(lambda t: self.a(t, training=True))(x)
            else:
                a = self.a(x, training=True)
        self._pending = (tape, a)
        return a.numpy()

    def a_backward(self, upstream_grad: np.ndarray) -> None:
        if self._pending is None:
            raise RuntimeError("a_backward without a_forward")
        tape, a = self._pending
        self._pending = None
        variables = self.a.trainable_variables
        if self.recompute_a:
            # The recomputation runs A's training forward again, which would move the
            # BatchNorm moving statistics a second time: keep the values the first forward
            # left and put them back, so the step stays exactly the plain one.
            kept = [(v, v.read_value()) for v in self.a.non_trainable_variables]
            grads = tape.gradient(a, variables, output_gradients=upstream_grad)
            for v, value in kept:
                v.assign(value)
        else:
            grads = tape.gradient(a, variables, output_gradients=upstream_grad)
        self.opt_a.apply_gradients(zip(grads, variables, strict=True))

    def c_train(self, cut_activations: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        import tensorflow as tf

        b = tf.convert_to_tensor(cut_activations)
        with tf.GradientTape() as tape:
            tape.watch(b)
            loss = self.loss_fn(labels, self.c(b, training=True))
        variables = self.c.trainable_variables
        *grads, grad_b = tape.gradient(loss, [*variables, b])
        self.opt_c.apply_gradients(zip(grads, variables, strict=True))
        return float(loss), grad_b.numpy()

    def a_infer(self, x: np.ndarray) -> np.ndarray:
        return self.a(x, training=False).numpy()

    def c_infer(self, cut_activations: np.ndarray) -> np.ndarray:
        return self.c(cut_activations, training=False).numpy()

    def weights(self) -> dict[str, dict[str, np.ndarray]]:
        out = {"A": {k: v.numpy() for k, v in named_variables(self.a).items()}}
        if self.c is not None:
            out["C"] = {k: v.numpy() for k, v in named_variables(self.c).items()}
        return out

    # -- training state ------------------------------------------------------------------
    def _held(self) -> list[tuple[str, object, object]]:
        out = [("A", self.a, self.opt_a)]
        if self.c is not None:
            out.append(("C", self.c, self.opt_c))
        return out

    def _state_variables(self) -> tuple[dict[str, object], dict[str, object]]:
        """(model variables, optimizer variables) by state name; builds the optimizers'
        slots (zeros) if no step has run yet, so a state can be loaded before the first."""
        slices: dict[str, object] = {}
        optimizer: dict[str, object] = {}
        sgd = self.manifest.optimizer.name == "sgd"
        for role, model, opt in self._held():
            named = named_variables(model)
            slices.update({f"{role}/{k}": v for k, v in named.items()})
            trainable = list(model.trainable_variables)
            opt.build(trainable)  # a no-op once built
            by_ref = {v.ref(): k for k, v in named.items()}
            slots = [v for v in opt.variables if v is not opt.iterations]
            per, rest = divmod(len(slots), max(len(trainable), 1))
            if rest:
                raise StateError(
                    f"slice {role}: {len(slots)} optimizer slots for {len(trainable)} variables"
                )
            optimizer[f"{role}/iterations"] = opt.iterations
            for i, var in enumerate(trainable):
                for slot in slots[i * per : (i + 1) * per]:
                    kind = slot.name.split("/")[0]  # tf_keras names slots "<m|v>/<variable>"
                    if tuple(slot.shape) != tuple(var.shape):
                        raise StateError(f"slice {role}: slot {slot.name} does not fit {var.name}")
                    key = "momentum" if sgd else kind
                    optimizer[f"{role}/{by_ref[var.ref()]}/{key}"] = slot
        return slices, optimizer

    def state(self) -> RuntimeState:
        slices, optimizer = self._state_variables()
        return RuntimeState(
            {k: v.numpy() for k, v in slices.items()},
            {k: v.numpy() for k, v in optimizer.items()},
        )

    def load_state(self, state: RuntimeState) -> None:
        slices, optimizer = self._state_variables()
        pairs = []
        for what, have, given in (
            ("variables", slices, state.slices),
            ("optimizer state", optimizer, state.optimizer),
        ):
            why = state_mismatch({n: tuple(v.shape) for n, v in have.items()}, given)
            if why is not None:
                raise StateError(f"the saved {what} do not fit this bundle's slices ({why})")
            for name, var in have.items():
                value = np.asarray(given[name])
                pairs.append((var, value.astype(var.dtype.as_numpy_dtype)))
        for var, value in pairs:  # everything checked: now assign
            var.assign(value)
        self._pending = None
