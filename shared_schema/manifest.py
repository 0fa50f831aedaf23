"""The bundle manifest: the one document the device, the converter and the server agree on.

A bundle directory holds the slices of one network cut at one or two tensors, and
``manifest.json`` says what each slice is, what crosses each cut (shape, dtype and the
layout the bytes are in on the wire), who holds the labels, and with which loss and
optimizer both sides train. Every artefact is listed with its SHA-256 so a device and
a server can prove they hold the same bundle before a single step is taken.

No framework is imported here: TensorFlow, TF.js and PyTorch code all read this.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._exceptions import ManifestError
from .protocol import LAYOUT_RANK, SLICE_SIDE, SPLIT_MODES

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

DType = Literal["float32", "float16", "int32", "int64", "uint8"]
# Layout of the bytes on the wire. Device runtimes are TensorFlow, so image tensors
# travel NHWC and sequences (Conv1D feature maps, embedded tokens) NWC; torch B computes
# on NCHW / NCW.
Layout = Literal["NHWC", "NCHW", "NC", "N", "NWC"]
SliceName = Literal["A", "B", "C"]
Side = Literal["device", "server"]
ArtifactFormat = Literal[
    "savedmodel",
    "keras_weights",
    "keras_config",
    "onnx",
    "torch_safetensors",
    "torch_spec",
    "tfjs_layers",
    "tflite",
    "report",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A tensor that crosses a boundary; the batch dimension is ``None``."""

    name: str = Field(min_length=1, max_length=200)
    shape: list[int | None]
    dtype: DType = "float32"
    layout: Layout

    @model_validator(mode="after")
    def _check(self) -> TensorSpec:
        if not self.shape or self.shape[0] is not None:
            raise ValueError(
                f"{self.name}: the first dimension must be the free batch dimension (null)"
            )
        if any(d is None or d <= 0 for d in self.shape[1:]):
            raise ValueError(
                f"{self.name}: every dimension but the batch must be a positive integer"
            )
        rank = LAYOUT_RANK[self.layout]
        if len(self.shape) != rank:
            raise ValueError(
                f"{self.name}: layout {self.layout} needs rank {rank}, shape is {self.shape}"
            )
        return self

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape[1:])  # type: ignore[arg-type]

    @property
    def bytes_per_sample(self) -> int:
        size = {"float32": 4, "float16": 2, "int32": 4, "int64": 8, "uint8": 1}[self.dtype]
        for d in self.sample_shape:
            size *= d
        return size


class Artifact(_Strict):
    path: str
    format: ArtifactFormat
    runtime: Literal["tf", "tfjs", "tflite", "torch", "onnx", "any"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class SliceSpec(_Strict):
    name: SliceName
    side: Side
    inputs: list[str] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)
    first_layer: str
    last_layer: str
    num_params: int = Field(ge=0)
    artifacts: list[Artifact] = Field(default_factory=list)

    def artifact(self, fmt: ArtifactFormat) -> Artifact:
        for art in self.artifacts:
            if art.format == fmt:
                return art
        raise ManifestError(f"slice {self.name} has no {fmt} artefact")


class SGDSpec(_Strict):
    name: Literal["sgd"] = "sgd"
    learning_rate: float = Field(gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False


class AdamSpec(_Strict):
    """Adam in the Keras convention on every side: ``epsilon`` is Keras' "epsilon hat",
    added to sqrt(v_t) after the bias correction is folded into the step size."""

    name: Literal["adam"] = "adam"
    learning_rate: float = Field(gt=0)
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.999, ge=0, lt=1)
    epsilon: float = Field(default=1e-7, gt=0)


OptimizerSpec = Annotated[SGDSpec | AdamSpec, Field(discriminator="name")]


LossName = Literal[
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
    "mean_squared_error",
    "mean_absolute_error",
]
# The losses that read the model's output as scores (logits or probabilities): the only
# ones ``from_logits`` applies to.
SCORE_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
)


class LossSpec(_Strict):
    """The loss every side that holds the labels trains with, as tf_keras defines it
    (reduction: the mean over the batch). Labels (``Manifest.labels``): int32 class
    indices (N) for the sparse cross-entropy, float32 rows shaped like the output (N, K)
    for the others (one-hot, binary / multi-label targets in [0, 1], regression targets).
    ``from_logits`` is False for the regression losses (it does not apply)."""

    name: LossName = "sparse_categorical_crossentropy"
    from_logits: bool = True

    @model_validator(mode="before")
    @classmethod
    def _regression_default(cls, data):
        if isinstance(data, dict) and data.get("name") not in (None, *SCORE_LOSSES):
            data = {"from_logits": False, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> LossSpec:
        if self.name not in SCORE_LOSSES and self.from_logits:
            raise ValueError(f"{self.name}: from_logits does not apply (set it false)")
        return self

    def labels_spec(self, output: TensorSpec, name: str = "labels") -> TensorSpec:
        """The labels tensor this loss takes for a model whose output is ``output``."""
        if self.name == "sparse_categorical_crossentropy":
            return TensorSpec(name=name, shape=[None], dtype="int32", layout="N")
        return TensorSpec(
            name=name, shape=list(output.shape), dtype="float32", layout=output.layout
        )


class Manifest(_Strict):
    """What a bundle is. Split modes:

    - ``double``: slices A (device), B (server), C (device); labels stay on the device.
    - ``single``: slices A (device), B (server, everything after the cut); labels go up.
    """

    format_version: Literal[1] = FORMAT_VERSION
    model: str
    spliteasy_version: str
    split_mode: Literal["double", "single"]
    label_holder: Side
    input: TensorSpec
    labels: TensorSpec
    output: TensorSpec
    cuts: list[TensorSpec] = Field(min_length=1, max_length=2)
    slices: list[SliceSpec] = Field(min_length=2, max_length=3)
    loss: LossSpec
    optimizer: OptimizerSpec
    num_classes: int = Field(ge=1)  # the output's width: classes, or targets per sample
    artifacts: list[Artifact] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        names = [s.name for s in self.slices]
        mode = SPLIT_MODES[self.split_mode]
        expected, holder, ncuts = mode["slices"], mode["label_holder"], mode["cuts"]
        if names != expected:
            raise ValueError(f"{self.split_mode} split needs slices {expected}, got {names}")
        if len(self.cuts) != ncuts:
            raise ValueError(
                f"{self.split_mode} split needs {ncuts} cut tensor(s), got {len(self.cuts)}"
            )
        if self.labels != self.loss.labels_spec(self.output, self.labels.name):
            raise ValueError(
                f"labels {self.labels.model_dump()} do not fit loss {self.loss.name} with "
                f"output shape {self.output.shape}"
            )
        if self.label_holder != holder:
            raise ValueError(f"{self.split_mode} split keeps the labels on the {holder}")
        for s in self.slices:
            if s.side != SLICE_SIDE[s.name]:
                raise ValueError(
                    f"slice {s.name} runs on the {SLICE_SIDE[s.name]}, not the {s.side}"
                )
        return self

    def slice(self, name: SliceName) -> SliceSpec:
        for s in self.slices:
            if s.name == name:
                return s
        raise ManifestError(f"the bundle has no slice {name} ({self.split_mode} split)")

    def tensor(self, name: str) -> TensorSpec:
        for t in [self.input, self.labels, self.output, *self.cuts]:
            if t.name == name:
                return t
        raise ManifestError(f"the manifest names no tensor {name!r}")

    @property
    def server_input(self) -> TensorSpec:
        return self.cuts[0]

    @property
    def server_output(self) -> TensorSpec:
        """What B returns: the second cut (double split) or the logits (single)."""
        return self.cuts[1] if self.split_mode == "double" else self.output

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> tuple[str, int]:
    """Hash of a file, or of a directory as the sorted (relative path, file hash) list."""
    if path.is_file():
        return sha256_file(path), path.stat().st_size
    digest, total = hashlib.sha256(), 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode())
        digest.update(sha256_file(f).encode())
        total += f.stat().st_size
    return digest.hexdigest(), total


def load_manifest(bundle: Path | str, verify: bool = True) -> Manifest:
    """Read and validate ``manifest.json``; with ``verify`` every artefact's hash is checked."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{bundle} is not a spliteasy bundle: no {MANIFEST_FILE}")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ManifestError(f"{path}: invalid manifest: {exc}") from exc
    if verify:
        arts = [a for s in manifest.slices for a in s.artifacts] + list(manifest.artifacts)
        for art in arts:
            target = bundle / art.path
            if not target.exists():
                raise ManifestError(f"{path}: artefact {art.path} is missing")
            digest, _ = sha256_tree(target)
            if digest != art.sha256:
                raise ManifestError(f"{path}: artefact {art.path} does not match its sha256")
    return manifest


def manifest_digest(bundle: Path | str) -> str:
    """The bundle's identity: the hash of its manifest file (which hashes every artefact)."""
    return sha256_file(Path(bundle) / MANIFEST_FILE)


def json_schema() -> dict:
    return Manifest.model_json_schema()
