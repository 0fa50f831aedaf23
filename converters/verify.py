"""Prove that torch B computes what Keras B computes: forward, every gradient, BN stats.

One training-mode step on a random cut tensor with a random upstream gradient is run
through torch B and through a float64 twin of Keras B (same graph, same weights): the
reference is the exact mathematics of the Keras graph, not one framework's rounding.
That matters: on deep nets with BatchNorm over tiny feature maps (ResNet50 at 32 px),
Keras' own float32 gradients are ~2e-3 off exact while torch's are ~1e-5.

The forward output is checked with torch B in float32, exactly as the server runs it.
Gradients are checked with a float64 copy of torch B: a gradient is not a continuous
function of the input (a ReLU's derivative jumps at 0), and in a deep B some
pre-activation lands within float32 rounding of 0, so float32 torch and exact Keras
take different sides of the kink and that whole gradient path moves by ~1e-2
(InceptionV3 mixed2..mixed5 at 75 px: one element in 5760). In float64 both sides agree
to ~1e-14 unless the graphs differ, which is what conversion must rule out. The
float32 gradient errors are reported beside (``float32``), and so is Keras' own.

Moving means are checked in float64 as well; moving variances against Keras float32,
because TF has no float64 fused BatchNorm, so the float64 twin takes the non-fused
path, whose variance rule (biased) is not B's. Relative error is ``||t - k|| / ||k||``.
A tensor whose exact value is zero (the gradient of a conv bias just before a
BatchNorm, or a BN's batch mean after a bias-free 1x1 conv of BatchNorm output) is
measured against a floor of 1e-4 of the largest norm of its kind instead (listed in
``zero_grads``): its float noise is not a disagreement.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np

from shared_schema import TensorSpec

from ._exceptions import VerificationError

ZERO_GRAD_FLOOR = 1e-4


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2)) if layout == "NHWC" else array


def from_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1)) if layout == "NHWC" else array


def rel_err(value: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    denom = max(float(np.linalg.norm(ref)), floor, 1e-30)
    return float(np.linalg.norm(value.astype(np.float64) - ref.astype(np.float64)) / denom)


@dataclass
class VerificationReport:
    forward_train_rel_err: float
    forward_infer_rel_err: float
    input_grad_rel_err: float
    param_grad_rel_err: dict[str, float] = field(default_factory=dict)
    moving_stat_rel_err: dict[str, float] = field(default_factory=dict)
    zero_grads: list[str] = field(default_factory=list)
    reference: str = "keras-float64"
    gradients_checked_in: str = "float64"  # the torch B whose gradients were compared
    float32: dict[str, float] = field(default_factory=dict)  # torch float32 vs the reference
    keras_float32_max_grad_rel_err: float | None = None
    # Keras' own float32 training forward against the float64 reference: the rounding
    # drift float32 itself has on this B (torch float32's is in ``float32``)
    keras_float32_forward_rel_err: float | None = None
    forward_checked_in: str = "float64"  # the torch B whose training forward was compared
    batch: int = 0

    @property
    def max_param_grad_rel_err(self) -> float:
        return max(self.param_grad_rel_err.values(), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_param_grad_rel_err"] = self.max_param_grad_rel_err
        d["max_moving_stat_rel_err"] = max(self.moving_stat_rel_err.values(), default=0.0)
        return d


@dataclass
class _Step:
    out: np.ndarray
    infer: np.ndarray | None  # None when the step was asked not to run inference
    input_grad: np.ndarray
    grads: dict[str, np.ndarray]
    after: dict[str, np.ndarray]


def _float64_twin(b_model):
    """The same Keras graph and weights computing in float64, or None if it cannot be built."""
    import tf_keras as keras

    config = copy.deepcopy(b_model.get_config())
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float64"
    try:
        custom = {type(layer).__name__: type(layer) for layer in b_model.layers}
        twin = keras.Model.from_config(config, custom_objects=custom)
        twin.set_weights([w.astype(np.float64) for w in b_model.get_weights()])
    except Exception:  # a custom layer that cannot compute in float64: fall back to float32
        return None
    return twin


def _keras_step(model, a: np.ndarray, g: np.ndarray, infer: bool = True) -> _Step:
    """One training-mode forward/backward; the model's variables are restored afterwards.
    Then, if ``infer``, an inference-mode forward."""
    import tensorflow as tf

    from shared_schema.naming import named_variables

    variables = named_variables(model)
    trainable_ids = {id(v) for v in model.trainable_weights}
    names = [n for n, v in variables.items() if id(v) in trainable_ids]
    snapshot = model.get_weights()
    dtype = model.weights[0].dtype.as_numpy_dtype if model.weights else np.float32
    a_t = tf.constant(a.astype(dtype))  # a constant, watched: a Variable breaks Add's in-place +=
    with tf.GradientTape() as tape:
        tape.watch(a_t)
        out = model(a_t, training=True)
    *grads, input_grad = tape.gradient(
        out, [*(variables[n] for n in names), a_t], output_gradients=tf.constant(g.astype(dtype))
    )
    after = {n: v.numpy().astype(np.float64) for n, v in variables.items()}
    model.set_weights(snapshot)
    inferred = model(a.astype(dtype), training=False).numpy() if infer else None
    return _Step(
        out.numpy().astype(np.float64),
        inferred.astype(np.float64) if infer else None,
        input_grad.numpy().astype(np.float64),
        {n: gr.numpy().astype(np.float64) for n, gr in zip(names, grads, strict=True)},
        after,
    )


def _torch_step(
    module,
    spec,
    a: np.ndarray,
    g: np.ndarray,
    cut_in: TensorSpec,
    out_spec: TensorSpec,
    throwaway: bool = False,
) -> _Step:
    """One training-mode forward/backward, the module's state restored afterwards, then an
    inference-mode forward. A ``throwaway`` module (a copy used once) is neither restored
    nor run for inference: only the training step's results are read from it."""
    import torch

    from server_torch.rebuild import keras_weights

    state = None if throwaway else copy.deepcopy(module.state_dict())
    module.train()
    a_t = torch.from_numpy(to_torch_layout(a, cut_in.layout)).requires_grad_(True)
    out_t = module(a_t)
    out_t.backward(torch.from_numpy(to_torch_layout(g, out_spec.layout)))
    named = dict(module.named_parameters())
    grads = {}
    for var in spec.variables:
        if var.trainable:
            grad = named[var.torch].grad
            value = np.zeros(var.torch_shape, np.float32) if grad is None else grad.numpy()
            grads[var.keras] = var.to_keras(value)
    after = keras_weights(module, spec)
    infer = None
    if not throwaway:
        module.load_state_dict(state)
        module.zero_grad(set_to_none=True)
        module.eval()
        with torch.no_grad():
            infer = module(torch.from_numpy(to_torch_layout(a, cut_in.layout))).numpy()
        module.train()
    return _Step(
        from_torch_layout(out_t.detach().numpy(), out_spec.layout),
        None if infer is None else from_torch_layout(infer, out_spec.layout),
        from_torch_layout(a_t.grad.numpy(), cut_in.layout),
        grads,
        after,
    )


def _torch_step_float64(module, spec, a, g, cut_in: TensorSpec, out_spec: TensorSpec):
    """The same step through a float64 copy of torch B, or None if it cannot compute in it.
    Its gradients and moving statistics are compared, its inference output is not."""
    try:
        double = copy.deepcopy(module).double()
        return _torch_step(
            double, spec, a.astype(np.float64), g.astype(np.float64), cut_in, out_spec, True
        )
    except Exception:  # an op without a float64 kernel: gradients are checked in float32
        return None


# A copy of a float32 value is exact; this only allows for a value stored in another
# dtype or computed once at load time.
LOADED_TOL = 1e-6


def _check_structure(b_model, module, spec) -> None:
    """Before any step: every Keras variable of B is in torch B, with the value Keras
    holds, in a module the graph actually calls. A step's errors name every tensor the
    fault touches downstream; these name the culprit (a weight changed or laid out
    wrongly, a layer dropped from the graph) first, and alone."""
    from shared_schema.naming import named_variables

    state = module.state_dict()
    missing = [v.keras for v in spec.variables if v.torch not in state]
    if missing:
        raise VerificationError(f"torch B has no tensor for Keras variable(s) {', '.join(missing)}")
    keras_values = {n: v.numpy() for n, v in named_variables(b_model).items()}
    unknown = sorted(set(keras_values) - {v.keras for v in spec.variables})
    if unknown:
        raise VerificationError(f"Keras variable(s) {', '.join(unknown)} not carried into torch B")
    bad = []
    for var in spec.variables:
        err = rel_err(
            var.to_keras(state[var.torch].detach().cpu().numpy()), keras_values[var.keras]
        )
        if not err <= LOADED_TOL:
            bad.append(f"{var.keras}: relative error {err:.3g} > {LOADED_TOL:g}")
    if bad:
        raise VerificationError(
            f"torch B's variables as loaded differ from Keras B's: {'; '.join(bad)}"
        )
    graph = getattr(module, "graph", None)  # a torch.fx.GraphModule, as export_server_slice builds
    if graph is None:
        return
    called = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}

    def reached(torch_name: str) -> bool:
        parts = torch_name.split(".")
        return any(".".join(parts[:i]) in called for i in range(1, len(parts) + 1))

    orphans = [v.keras for v in spec.variables if not reached(v.torch)]
    if orphans:
        raise VerificationError(
            f"torch B's graph never uses Keras variable(s) {', '.join(orphans)} "
            "(their layer was dropped from the graph)"
        )


def verify_server_slice(
    b_model,
    module,
    spec,
    cut_in: TensorSpec,
    out_spec: TensorSpec,
    forward_tol: float = 1e-4,
    grad_tol: float = 1e-4,
    batch: int = 4,
    seed: int = 0,
) -> VerificationReport:
    _check_structure(b_model, module, spec)
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, *cut_in.sample_shape)).astype(np.float32)
    g = rng.normal(size=(batch, *out_spec.sample_shape)).astype(np.float32)

    twin = _float64_twin(b_model)
    # Keras float32's inference output is compared only when it is the reference.
    keras32 = _keras_step(b_model, a, g, infer=twin is None)
    ref = _keras_step(twin, a, g) if twin is not None else keras32
    try:
        got = _torch_step(module, spec, a, g, cut_in, out_spec)
    except Exception as exc:  # a converter bug surfaces here as a torch shape error
        raise VerificationError(
            f"torch B fails on a batch of {batch}: {type(exc).__name__}: {exc}"
        ) from exc
    if got.out.shape != ref.out.shape:
        raise VerificationError(
            f"torch B's output has shape {list(got.out.shape[1:])}, Keras B's "
            f"{list(ref.out.shape[1:])}"
        )
    exact = _torch_step_float64(module, spec, a, g, cut_in, out_spec) if twin is not None else None
    grads_from = exact if exact is not None else got

    floor = ZERO_GRAD_FLOOR * max(
        (float(np.linalg.norm(x)) for x in ref.grads.values()), default=0.0
    )
    # The training forward is checked in float64 too (structure: what conversion can get
    # wrong); torch's float32 forward is held against Keras' own float32 drift below.
    forward_from = exact if exact is not None else got
    report = VerificationReport(
        forward_train_rel_err=rel_err(forward_from.out, ref.out),
        forward_checked_in="float64" if exact is not None else "float32",
        forward_infer_rel_err=rel_err(got.infer, ref.infer),
        input_grad_rel_err=rel_err(grads_from.input_grad, ref.input_grad),
        reference="keras-float64" if twin is not None else "keras-float32",
        gradients_checked_in="float64" if exact is not None else "float32",
        batch=batch,
    )
    for name, value in ref.grads.items():
        report.param_grad_rel_err[name] = rel_err(grads_from.grads[name], value, floor)
        if np.linalg.norm(value) < floor:
            report.zero_grads.append(name)
    report.float32 = {
        "input_grad_rel_err": rel_err(got.input_grad, ref.input_grad),
        "max_param_grad_rel_err": max(
            (rel_err(got.grads[n], v, floor) for n, v in ref.grads.items()), default=0.0
        ),
    }
    if exact is not None:
        report.float32["forward_train_rel_err"] = rel_err(got.out, ref.out)
        report.keras_float32_forward_rel_err = rel_err(keras32.out, ref.out)
    if twin is not None:
        report.keras_float32_max_grad_rel_err = max(
            (rel_err(keras32.grads[n], v, floor) for n, v in ref.grads.items()), default=0.0
        )
    # Moving variances against Keras float32: TF has no float64 fused BatchNorm, so the
    # float64 twin takes the non-fused path, whose variance rule (biased) is not B's.
    # Moving means follow one rule on both paths: float64, where a structurally zero
    # batch mean is 1e-19 noise, measured against a floor.
    stats = [n for n in keras32.after if n not in keras32.grads]
    means_from = (exact, ref) if exact is not None else (got, keras32)
    stat_floor = ZERO_GRAD_FLOOR * max(
        (float(np.linalg.norm(means_from[1].after[n])) for n in stats), default=0.0
    )
    for name in stats:
        if name.endswith("/moving_mean"):
            value = means_from[1].after[name]
            report.moving_stat_rel_err[name] = rel_err(means_from[0].after[name], value, stat_floor)
            if np.linalg.norm(value) < stat_floor:
                report.zero_grads.append(name)
        else:
            report.moving_stat_rel_err[name] = rel_err(got.after[name], keras32.after[name])

    checks = [
        (
            f"forward (training mode, {report.forward_checked_in})",
            report.forward_train_rel_err,
            forward_tol,
        ),
        ("forward (inference mode)", report.forward_infer_rel_err, forward_tol),
        (f"gradient at the input {cut_in.name}", report.input_grad_rel_err, grad_tol),
        *((f"gradient of {n}", e, grad_tol) for n, e in report.param_grad_rel_err.items()),
        *((f"moving statistic {n}", e, forward_tol) for n, e in report.moving_stat_rel_err.items()),
    ]
    bad = [(what, err, tol) for what, err, tol in checks if not err <= tol]
    if bad:
        bad.sort(key=lambda item: -item[1] / item[2])
        lines = "; ".join(
            f"{what}: relative error {err:.3g} > {tol:g}" for what, err, tol in bad[:8]
        )
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        exact_ref = "float64" in (report.reference + report.gradients_checked_in)
        kind = (
            "a conversion error: the torch graph computes another function (compared with "
            "the float64 Keras twin, where float32 rounding cannot explain it)"
            if exact_ref
            else "compared in float32 only (no float64 twin of Keras B could be built)"
        )
        raise VerificationError(f"torch B disagrees with Keras B: {lines}{more} -- {kind}")
    drift = report.float32.get("forward_train_rel_err")
    if drift is not None and report.keras_float32_forward_rel_err is not None:
        allowed = max(forward_tol, FLOAT32_DRIFT_FACTOR * report.keras_float32_forward_rel_err)
        if not drift <= allowed:
            raise VerificationError(
                "torch B is exact in float64 but its float32 forward (training mode) drifts "
                f"{drift:.3g} from exact, beyond {allowed:.3g} = max({forward_tol:g}, "
                f"{FLOAT32_DRIFT_FACTOR:g} x Keras' own float32 drift "
                f"{report.keras_float32_forward_rel_err:.3g})"
            )
    return report


# torch's float32 forward may drift from exact up to this many times Keras' own float32
# drift on the same B (or the forward tolerance, whichever is larger): deep Bs with
# BatchNorm in training mode drift ~1e-3 in either framework, which is rounding, not a
# conversion error (that one shows in float64).
FLOAT32_DRIFT_FACTOR = 4.0
