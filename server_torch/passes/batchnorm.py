"""Replace torch BatchNorm with ``KerasBatchNorm`` carrying the Keras layer's rule.

onnx2torch builds ``nn.BatchNorm*d`` with torch's default momentum (0.1) and unbiased
running variance; the Keras layer had its own momentum and, depending on whether Keras
took its fused path, a biased or unbiased variance. The spec names each BN module.
"""

from __future__ import annotations

from torch import fx, nn

from ..keras_compat import KerasBatchNorm
from ..spec import TorchSpec
from . import register


@register("keras_batchnorm")
def keras_batchnorm(gm: fx.GraphModule, spec: TorchSpec) -> None:
    for name, bn_spec in spec.batchnorm.items():
        old = gm.get_submodule(name)
        if not isinstance(old, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{name} is {type(old).__name__}, not a BatchNorm")
        new = KerasBatchNorm(
            old.num_features,
            momentum=bn_spec.momentum,
            epsilon=bn_spec.epsilon,
            center=bn_spec.center,
            scale=bn_spec.scale,
            unbiased_running_var=bn_spec.unbiased_running_var,
        )
        new.weight.data.copy_(old.weight.data)
        new.bias.data.copy_(old.bias.data)
        new.running_mean.copy_(old.running_mean)
        new.running_var.copy_(old.running_var)
        parent, _, leaf = name.rpartition(".")
        (gm.get_submodule(parent) if parent else gm)._modules[leaf] = new
