"""Passes that make onnx2torch's inference graph a trainable B with Keras' semantics.

Each pass is a function ``(graph_module, spec) -> None`` registered under a name; they
run in ``ORDER`` both when the converter verifies B and when the server rebuilds it, so
the module that was verified is the module that trains. Registering a name twice is an
error, as in onnx2torch's own converter registry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from ..spec import TorchSpec

Pass = Callable[[fx.GraphModule, TorchSpec], None]
PASSES: dict[str, Pass] = {}
ORDER = ["fold_transposes", "keras_batchnorm", "trainable_parameters"]


def register(name: str) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        PASSES[name] = fn
        return fn

    return deco


def apply_all(gm: fx.GraphModule, spec: TorchSpec) -> fx.GraphModule:
    for name in ORDER:
        PASSES[name](gm, spec)
    gm.graph.lint()
    gm.recompile()
    return gm


from . import batchnorm, parameters, transpose  # noqa: E402,F401  (registers the passes)
