"""Make exactly Keras' trainable variables torch Parameters.

onnx2torch stores some weights (e.g. MatMul operands, loose initializers) as buffers,
which an optimizer never sees; and a constant that Keras does not train must not
become trainable in torch. The spec lists both; this pass re-registers each tensor
under the same name, so ``get_attr`` nodes and ``state_dict`` keys are unchanged.
"""

from __future__ import annotations

from torch import fx, nn

from ..spec import TorchSpec
from . import register


def _owner(gm: fx.GraphModule, qualified: str) -> tuple[nn.Module, str]:
    parent, _, leaf = qualified.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), leaf


@register("trainable_parameters")
def trainable_parameters(gm: fx.GraphModule, spec: TorchSpec) -> None:
    for var in spec.variables:
        mod, leaf = _owner(gm, var.torch)
        tensor = getattr(mod, leaf).detach()
        if var.trainable and leaf not in mod._parameters:
            mod._buffers.pop(leaf, None)
            mod.register_parameter(leaf, nn.Parameter(tensor.clone()))
        elif not var.trainable and leaf in mod._parameters:
            mod._parameters.pop(leaf)
            mod.register_buffer(leaf, tensor.clone())
    for name in spec.frozen:
        mod, leaf = _owner(gm, name)
        if leaf in mod._parameters:
            tensor = mod._parameters.pop(leaf).detach()
            mod.register_buffer(leaf, tensor.clone())
