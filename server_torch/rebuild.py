"""Rebuild the trainable torch B from a bundle: ONNX graph + torch spec + safetensors.

This is the one path from bundle to module, used by the server and by the converter's
verification alike, so what was verified is what trains. No pickle is involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import fx

from shared_schema import Manifest

from .passes import apply_all
from .spec import TorchSpec


def build_module(onnx_model, spec: TorchSpec) -> fx.GraphModule:
    """onnx2torch, then the spec's passes. ``onnx_model`` is a ModelProto or a path."""
    import onnx
    from onnx2torch import convert

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    gm = convert(onnx_model)
    apply_all(gm, spec)
    gm.train()
    return gm


def load_server_slice(bundle_dir: Path | str, manifest: Manifest | None = None) -> fx.GraphModule:
    """B, trainable, with the bundle's weights; input and output in torch layout (NCHW/NC)."""
    b_dir = Path(bundle_dir) / "B"
    spec = TorchSpec.load(b_dir)
    gm = build_module(b_dir / spec.onnx, spec)
    state = load_file(str(b_dir / spec.weights))
    gm.load_state_dict(state, strict=True)
    return gm


def keras_weights(gm: torch.nn.Module, spec: TorchSpec) -> dict[str, np.ndarray]:
    """B's current variables by Keras name, in Keras layout, for comparisons and export."""
    state = gm.state_dict()
    return {
        v.keras: v.to_keras(state[v.torch].detach().cpu().numpy().copy()) for v in spec.variables
    }
