"""Torch modules and optimizers that follow Keras' formulas exactly.

Split training is only equal to unsplit training if B, on the server, steps exactly as
the same layers would in Keras. Three places differ between the frameworks, and each
is resolved here by writing Keras' formula in torch rather than by converting numbers:

- BatchNormalization: Keras keeps ``moving = m * moving + (1 - m) * batch`` (torch's
  momentum is the complement); Keras' fused kernel (4-D inputs) feeds the *unbiased*
  batch variance to the moving average while the non-fused path (2-D inputs) feeds the
  biased one; torch always uses unbiased. ``KerasBatchNorm`` takes the Keras momentum
  and says which variance it accumulates.
- Adam: Keras adds epsilon ("epsilon hat") to sqrt(v) with the bias correction folded
  into the step size; torch adds it to the bias-corrected sqrt(v_hat). ``KerasAdam``.
- SGD with momentum: Keras accumulates ``v = m v - lr g``; ``KerasSGD`` does the same.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class KerasBatchNorm(nn.Module):
    """Batch normalisation over axis 1 (NCHW or NC) with Keras' running-statistics rule."""

    def __init__(
        self,
        num_features: int,
        momentum: float,
        epsilon: float,
        center: bool = True,
        scale: bool = True,
        unbiased_running_var: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.unbiased_running_var = unbiased_running_var
        ones, zeros = torch.ones(num_features), torch.zeros(num_features)
        if scale:
            self.weight = nn.Parameter(ones.clone())
        else:
            self.register_buffer("weight", ones.clone())
        if center:
            self.bias = nn.Parameter(zeros.clone())
        else:
            self.register_buffer("bias", zeros.clone())
        self.register_buffer("running_mean", zeros.clone())
        self.register_buffer("running_var", ones.clone())

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, keras_momentum={self.momentum}, epsilon={self.epsilon}, "
            f"unbiased_running_var={self.unbiased_running_var}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.ndim)]
        view = [1, self.num_features] + [1] * (x.ndim - 2)
        if self.training:
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            with torch.no_grad():
                n = x.numel() // self.num_features
                acc_var = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
                self.running_mean.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
                self.running_var.mul_(self.momentum).add_(acc_var, alpha=1.0 - self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        inv = torch.rsqrt(var + self.epsilon) * self.weight
        return (x - mean.view(view)) * inv.view(view) + self.bias.view(view)


class KerasSGD(torch.optim.Optimizer):
    """SGD with Keras' momentum rule: v <- m v - lr g; w <- w + v (Nesterov: w + m v - lr g)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, m, nesterov = group["lr"], group["momentum"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if m == 0:
                    p.add_(p.grad, alpha=-lr)
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(m).add_(p.grad, alpha=-lr)
                if nesterov:
                    p.add_(v, alpha=m).add_(p.grad, alpha=-lr)
                else:
                    p.add_(v)


class KerasAdam(torch.optim.Optimizer):
    """Adam as Keras computes it:

    alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
    w <- w - alpha * m / (sqrt(v) + epsilon)
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
    ) -> None:
        super().__init__(params, {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, b1, b2, eps = group["lr"], group["beta_1"], group["beta_2"], group["epsilon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                alpha = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
                g = p.grad
                state["m"].add_(g - state["m"], alpha=1 - b1)
                state["v"].add_(g * g - state["v"], alpha=1 - b2)
                p.sub_(state["m"] * alpha / (state["v"].sqrt() + eps))
