"""Drop layout transposes that cancel.

tf2onnx wraps every NHWC op in NHWC->NCHW->NHWC transposes; with its back-to-back
optimizer off (that optimizer also folds BN into Conv, which would break training) the
pairs survive, and in torch each one is a copy. Two transposes whose permutations
compose to the identity are removed; so is an identity transpose.
"""

from __future__ import annotations

from onnx2torch.node_converters.transpose import OnnxTranspose
from torch import fx

from ..spec import TorchSpec
from . import register


def _perm(gm: fx.GraphModule, node: fx.Node) -> list[int] | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)  # type: ignore[arg-type]
    if isinstance(mod, OnnxTranspose) and mod.perm is not None:
        return list(mod.perm)
    return None


@register("fold_transposes")
def fold_transposes(gm: fx.GraphModule, spec: TorchSpec) -> None:
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            outer = _perm(gm, node)
            if outer is None:
                continue
            source = node.args[0]
            if outer == sorted(outer):  # identity
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                changed = True
                continue
            inner = _perm(gm, source) if isinstance(source, fx.Node) else None
            if inner is None or len(inner) != len(outer):
                continue
            if [inner[p] for p in outer] == list(range(len(outer))):
                node.replace_all_uses_with(source.args[0])
                gm.graph.erase_node(node)
                if not source.users:
                    gm.graph.erase_node(source)
                changed = True
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
