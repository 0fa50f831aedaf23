"""``B/torch_spec.json``: how to turn the bundle's ONNX graph into the trainable torch B.

onnx2torch gives an inference graph: BatchNorm with torch's momentum, some trainable
weights as buffers, and pairs of layout transposes. The converter records here, once,
what the Keras model says (each BN's momentum/epsilon/variance rule, which tensors are
trainable, and where every Keras variable lives in torch and in which axis order); the
server replays it with the same passes. Plain JSON: rebuilding B needs no pickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SPEC_FILE = "torch_spec.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchNormSpec(_Strict):
    keras_layer: str
    momentum: float = Field(ge=0, le=1)
    epsilon: float = Field(gt=0)
    center: bool = True
    scale: bool = True
    unbiased_running_var: bool


class VariableSpec(_Strict):
    """torch_value = keras_value.transpose(axes).reshape(torch_shape)."""

    keras: str
    keras_shape: list[int]
    torch: str
    torch_shape: list[int]
    axes: list[int]
    trainable: bool

    def to_torch(self, keras_value: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(keras_value.transpose(self.axes).reshape(self.torch_shape))

    def to_keras(self, torch_value: np.ndarray) -> np.ndarray:
        transposed = [self.keras_shape[a] for a in self.axes]
        return np.ascontiguousarray(
            torch_value.reshape(transposed).transpose(np.argsort(self.axes))
        )


class TorchSpec(_Strict):
    format_version: int = 1
    onnx: str = "model.onnx"
    weights: str = "weights.safetensors"
    batchnorm: dict[str, BatchNormSpec] = Field(default_factory=dict)
    variables: list[VariableSpec] = Field(default_factory=list)
    frozen: list[str] = Field(
        default_factory=list,
        description="torch Parameters that are constants in Keras (made buffers)",
    )

    def save(self, directory: Path) -> Path:
        path = directory / SPEC_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> TorchSpec:
        return cls.model_validate_json((directory / SPEC_FILE).read_text())
