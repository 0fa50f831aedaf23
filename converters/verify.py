"""Prove that torch B computes what Keras B computes: forward, every gradient, BN stats.

One training-mode step on a random cut tensor with a random upstream gradient is run
through both, and compared tensor by tensor. Relative error is ``||t - k|| / ||k||``;
for a tensor whose reference is ~0 (a conv bias just before a BatchNorm has gradient
exactly 0 in exact arithmetic) the denominator is floored at 1e-6 of the largest
reference norm of its kind, so float noise is not reported as a 100% error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from shared_schema import TensorSpec

from ._exceptions import VerificationError


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
    near_zero_grads: list[str] = field(default_factory=list)
    batch: int = 0

    @property
    def max_param_grad_rel_err(self) -> float:
        return max(self.param_grad_rel_err.values(), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_param_grad_rel_err"] = self.max_param_grad_rel_err
        d["max_moving_stat_rel_err"] = max(self.moving_stat_rel_err.values(), default=0.0)
        return d


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
    import copy

    import tensorflow as tf
    import torch

    from server_torch.rebuild import keras_weights

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(batch, *cut_in.sample_shape)).astype(np.float32)
    g = rng.normal(size=(batch, *out_spec.sample_shape)).astype(np.float32)

    from .slicing import named_variables

    variables = named_variables(b_model)
    trainable_ids = {id(v) for v in b_model.trainable_weights}
    trainable_names = [n for n, v in variables.items() if id(v) in trainable_ids]
    snapshot = [v.numpy() for v in b_model.weights]
    a_var = tf.Variable(a)
    with tf.GradientTape() as tape:
        out_k = b_model(a_var, training=True)
    watched = [variables[n] for n in trainable_names]
    grads = tape.gradient(out_k, [*watched, a_var], output_gradients=tf.constant(g))
    after_k = {n: v.numpy() for n, v in variables.items()}
    for v, value in zip(b_model.weights, snapshot, strict=True):
        v.assign(value)
    infer_k = b_model(a, training=False).numpy()
    k_grads = {n: gr.numpy() for n, gr in zip(trainable_names, grads[:-1], strict=True)}
    k_input_grad = grads[-1].numpy()

    state = copy.deepcopy(module.state_dict())
    module.train()
    a_t = torch.from_numpy(to_torch_layout(a, cut_in.layout)).requires_grad_(True)
    out_t = module(a_t)
    out_t.backward(torch.from_numpy(to_torch_layout(g, out_spec.layout)))
    named = dict(module.named_parameters())
    t_grads = {}
    for var in spec.variables:
        if var.trainable:
            grad = named[var.torch].grad
            t_grads[var.keras] = var.to_keras(
                np.zeros(var.torch_shape, np.float32) if grad is None else grad.numpy()
            )
    after_t = keras_weights(module, spec)
    module.load_state_dict(state)
    module.zero_grad(set_to_none=True)
    module.eval()
    with torch.no_grad():
        infer_t = module(torch.from_numpy(to_torch_layout(a, cut_in.layout))).numpy()
    module.train()

    grad_floor = 1e-6 * max((float(np.linalg.norm(x)) for x in k_grads.values()), default=0.0)
    report = VerificationReport(
        forward_train_rel_err=rel_err(
            from_torch_layout(out_t.detach().numpy(), out_spec.layout), out_k.numpy()
        ),
        forward_infer_rel_err=rel_err(from_torch_layout(infer_t, out_spec.layout), infer_k),
        input_grad_rel_err=rel_err(
            from_torch_layout(a_t.grad.numpy(), cut_in.layout), k_input_grad
        ),
        batch=batch,
    )
    for name, ref in k_grads.items():
        report.param_grad_rel_err[name] = rel_err(t_grads[name], ref, grad_floor)
        if np.linalg.norm(ref) < grad_floor:
            report.near_zero_grads.append(name)
    trainable = set(k_grads)
    for name, ref in after_k.items():
        if name not in trainable:  # moving statistics after one training-mode forward
            report.moving_stat_rel_err[name] = rel_err(after_t[name], ref)

    checks = [
        ("forward (training mode)", report.forward_train_rel_err, forward_tol),
        ("forward (inference mode)", report.forward_infer_rel_err, forward_tol),
        (f"gradient at the input {cut_in.name}", report.input_grad_rel_err, grad_tol),
        *((f"gradient of {n}", e, grad_tol) for n, e in report.param_grad_rel_err.items()),
        *((f"moving statistic {n}", e, forward_tol) for n, e in report.moving_stat_rel_err.items()),
    ]
    bad = [(what, err, tol) for what, err, tol in checks if not err <= tol]
    if bad:
        lines = "; ".join(f"{what}: relative error {err:.3g} > {tol:g}" for what, err, tol in bad)
        raise VerificationError(f"torch B disagrees with Keras B: {lines}")
    return report
