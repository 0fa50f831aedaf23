"""The contract both sides obey: the bundle manifest and the binary tensor frame."""

from ._exceptions import (
    BadMagic,
    FrameError,
    FrameSizeMismatch,
    FrameSpecMismatch,
    ManifestError,
    SpliteasyError,
    TruncatedFrame,
    UnsupportedVersion,
)
from .frame import MEDIA_TYPE, Frame, FrameKind, check, decode, encode, scalar
from .manifest import (
    MANIFEST_FILE,
    AdamSpec,
    Artifact,
    LossSpec,
    Manifest,
    SGDSpec,
    SliceSpec,
    TensorSpec,
    json_schema,
    load_manifest,
    manifest_digest,
    sha256_tree,
)

SCHEMA_FILE = "manifest.schema.json"

__all__ = [
    "MANIFEST_FILE",
    "MEDIA_TYPE",
    "SCHEMA_FILE",
    "AdamSpec",
    "Artifact",
    "BadMagic",
    "Frame",
    "FrameError",
    "FrameKind",
    "FrameSizeMismatch",
    "FrameSpecMismatch",
    "LossSpec",
    "Manifest",
    "ManifestError",
    "SGDSpec",
    "SliceSpec",
    "SpliteasyError",
    "TensorSpec",
    "TruncatedFrame",
    "UnsupportedVersion",
    "check",
    "decode",
    "encode",
    "json_schema",
    "load_manifest",
    "manifest_digest",
    "scalar",
    "sha256_tree",
]
