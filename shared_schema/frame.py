"""The binary tensor frame: a small header and the raw little-endian bytes of one tensor.

Layout (all integers little-endian)::

    offset size
    0      4   magic  b"SPLT"
    4      1   version (1)
    5      1   kind   (FrameKind)
    6      1   dtype  (code in DTYPES)
    7      1   layout (code in LAYOUTS)
    8      1   ndim   (<= 8)
    9      1   flags  (the codec's flag, 0 = raw; see shared_schema/codec.py)
    10     2   name length in bytes (<= 200)
    12     16  session id
    28     8   step
    36     8   payload length in bytes
    44     .   name (UTF-8), then ndim x uint32 dims, then the payload

A message is one or more frames back to back. Every frame names its session and step,
so a retried request can be recognised and answered from a store. Decoding trusts
nothing: each length is checked before it is used, and the payload length must equal
dtype size x prod(shape), computed on Python integers (no wrap-around), and a shape may
span at most ``MAX_ELEMENTS`` elements (zero dims counted as one, so numpy can always
build it). Raw payloads are not copied on decode (numpy views the buffer).

Compression (``codec.py``): a float32 ACTIVATION or GRADIENT frame may carry its tensor
encoded by a session's codec. Its header still says float32 and the logical shape; the
flags byte holds the codec's flag and the payload length is the encoded length, which
must equal what the codec needs for that shape. Such a frame decodes to the float32
array (a new array) with ``Frame.codec`` naming the codec it came in.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from . import codec as codecs
from ._exceptions import (
    BadMagic,
    FrameSizeMismatch,
    FrameSpecMismatch,
    TruncatedFrame,
    UnsupportedVersion,
)
from .manifest import TensorSpec
from .protocol import FRAME, FRAME_DTYPES, FRAME_KINDS, FRAME_LAYOUTS

MAGIC = FRAME["magic"].encode()
VERSION: int = FRAME["version"]
MEDIA_TYPE: str = FRAME["media_type"]
MAX_NDIM: int = FRAME["max_ndim"]
MAX_NAME: int = FRAME["max_name"]
MAX_ELEMENTS = 1 << 40  # far beyond any body limit, far below numpy's intp
_HEADER = struct.Struct(FRAME["header_struct"])
HEADER_SIZE = _HEADER.size  # 44
if FRAME["header_size"] != HEADER_SIZE:  # pragma: no cover - a broken protocol.json
    raise ImportError(f"protocol.json: header_struct is {HEADER_SIZE} bytes, not header_size")

DTYPES: dict[int, str] = FRAME_DTYPES
_DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_NP = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "int64": "<i8", "uint8": "u1"}
LAYOUTS: dict[int, str] = FRAME_LAYOUTS
_LAYOUT_CODES = {v: k for k, v in LAYOUTS.items()}
NO_SESSION = bytes(FRAME["session_bytes"])


# ACTIVATION: forward, a cut tensor's values; GRADIENT: backward, dL/d(cut tensor);
# TARGET: backward, auxiliary-label form c_hat = c - dL/dc; LABELS: single split, the
# labels travel up; SCALAR: metrics (loss) riding along a reply.
FrameKind = IntEnum("FrameKind", FRAME_KINDS, module=__name__)
FrameKind.__doc__ = "What a frame carries (codes from protocol.json)."


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    name: str
    array: np.ndarray
    layout: str
    session: bytes = NO_SESSION
    step: int = 0
    codec: str = codecs.DEFAULT  # how the payload travels (float32 ACTIVATION/GRADIENT only)

    @property
    def dtype(self) -> str:
        return np.dtype(self.array.dtype).name


def encode(frames: Iterable[Frame]) -> bytes:
    """Frames to one message body. Arrays are written little-endian, C order; a frame
    whose ``codec`` is not float32 is written compressed (float32 ACTIVATION/GRADIENT)."""
    parts: list[bytes | memoryview] = []
    for f in frames:
        arr = np.asarray(f.array)
        dtype_name = np.dtype(arr.dtype).name
        if dtype_name not in _DTYPE_CODES:
            raise FrameSpecMismatch(f"{f.name}: dtype {dtype_name} cannot be framed")
        arr = np.asarray(arr, dtype=_NP[dtype_name])  # little-endian; keeps 0-d scalars 0-d
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        name = f.name.encode()
        if len(name) > MAX_NAME:
            raise FrameSpecMismatch(f"tensor name longer than {MAX_NAME} bytes")
        if arr.ndim > MAX_NDIM:
            raise FrameSpecMismatch(f"{f.name}: rank {arr.ndim} exceeds {MAX_NDIM}")
        if len(f.session) != 16:
            raise FrameSpecMismatch("session id must be 16 bytes")
        codec = codecs.get(f.codec)
        payload: bytes | memoryview = arr.reshape(-1).view(np.uint8)  # no copy; empty and 0-d too
        if codec.flag:
            if not codecs.compressible(f.kind.name, dtype_name):
                raise FrameSpecMismatch(
                    f"{f.name}: a {f.kind.name} {dtype_name} frame travels raw, not as {codec.name}"
                )
            payload = codec.compress(arr, f.layout, codecs.frame_seed(f.step, int(f.kind)))
        parts.append(
            _HEADER.pack(
                MAGIC,
                VERSION,
                int(f.kind),
                _DTYPE_CODES[dtype_name],
                _LAYOUT_CODES[f.layout],
                arr.ndim,
                codec.flag,
                len(name),
                f.session,
                f.step,
                len(payload),
            )
        )
        parts.append(name)
        parts.append(struct.pack(f"<{arr.ndim}I", *arr.shape))
        parts.append(payload)
    return b"".join(parts)


def decode(
    buf: bytes | bytearray | memoryview,
    codec: str | None = None,
    max_elements: int | None = None,
) -> list[Frame]:
    """One message body to its frames; any inconsistency raises a FrameError subclass.

    ``codec``: the session's codec; then every float32 ACTIVATION/GRADIENT frame must
    come in it and every other frame raw (UnsupportedVersion otherwise: a wire feature
    the session did not negotiate). None accepts any known codec. ``max_elements``: the
    most elements a compressed frame may decode to (a few KiB of int4 must not become
    GiB of float32 before the receiver's batch limit is checked)."""
    want = codecs.get(codec) if codec is not None else None
    view = memoryview(buf).cast("B")
    frames: list[Frame] = []
    pos = 0
    if len(view) == 0:
        raise TruncatedFrame("empty message: expected at least one frame")
    while pos < len(view):
        frame, pos = _decode_one(view, pos, want, max_elements)
        frames.append(frame)
    return frames


def _decode_one(
    view: memoryview, pos: int, want: codecs.Codec | None, max_elements: int | None
) -> tuple[Frame, int]:
    if len(view) - pos < HEADER_SIZE:
        if bytes(view[pos : pos + 4]) not in (MAGIC[: len(view) - pos], MAGIC):
            raise BadMagic(f"bad magic at byte {pos}: not a spliteasy frame")
        raise TruncatedFrame(
            f"frame at byte {pos}: {len(view) - pos} bytes, header needs {HEADER_SIZE}"
        )
    (magic, version, kind, dtype, layout, ndim, flags, name_len, session, step, nbytes) = (
        _HEADER.unpack_from(view, pos)
    )
    if magic != MAGIC:
        raise BadMagic(f"bad magic {magic!r} at byte {pos}: not a spliteasy frame")
    if version != VERSION:
        raise UnsupportedVersion(f"frame version {version}; this build speaks version {VERSION}")
    codec = codecs.BY_FLAG.get(flags)
    if codec is None:
        raise UnsupportedVersion(
            f"frame flags {flags:#04x}: not a codec of version {VERSION} "
            f"({', '.join(f'{c.flag} {c.name}' for c in codecs.CODECS.values())})"
        )
    try:
        kind_e = FrameKind(kind)
    except ValueError:
        raise FrameSpecMismatch(f"unknown frame kind {kind}") from None
    if dtype not in DTYPES:
        raise FrameSpecMismatch(f"unknown dtype code {dtype}")
    if layout not in LAYOUTS:
        raise FrameSpecMismatch(f"unknown layout code {layout}")
    if ndim > MAX_NDIM or name_len > MAX_NAME:
        raise FrameSpecMismatch(f"frame header out of range (ndim={ndim}, name length={name_len})")
    pos += HEADER_SIZE
    meta = name_len + 4 * ndim
    if len(view) - pos < meta:
        raise TruncatedFrame(
            f"frame header promises {meta} bytes of name and shape; {len(view) - pos} left"
        )
    try:
        name = bytes(view[pos : pos + name_len]).decode()
    except UnicodeDecodeError:
        raise FrameSpecMismatch("tensor name is not UTF-8") from None
    pos += name_len
    shape = struct.unpack_from(f"<{ndim}I", view, pos)
    pos += 4 * ndim
    dtype_name = DTYPES[dtype]
    # Python ints: a product past 2**64 must not wrap to a size that passes the check
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise FrameSizeMismatch(f"{name}: shape {list(shape)} exceeds {MAX_ELEMENTS} elements")
    count = math.prod(shape)
    if want is not None or codec.flag:
        _check_codec(name, kind_e, dtype_name, codec, want)
    if codec.flag:
        if max_elements is not None and count > max_elements:
            raise FrameSizeMismatch(
                f"{name}: {codec.name} frame of {count} elements; this receiver decodes at "
                f"most {max_elements}"
            )
        expected = codec.payload_size(shape, LAYOUTS[layout])
        if nbytes != expected:
            raise FrameSizeMismatch(
                f"{name}: header says {nbytes} payload bytes, {codec.name} of "
                f"{dtype_name}{list(shape)} needs {expected}"
            )
        if len(view) - pos < nbytes:
            raise TruncatedFrame(f"{name}: payload truncated ({len(view) - pos} of {nbytes} bytes)")
        array = codec.decompress(view[pos : pos + nbytes], shape, LAYOUTS[layout])
        frame = Frame(kind_e, name, array, LAYOUTS[layout], bytes(session), step, codec.name)
        return frame, pos + nbytes
    expected = np.dtype(_NP[dtype_name]).itemsize * count
    if nbytes != expected:
        raise FrameSizeMismatch(
            f"{name}: header says {nbytes} payload bytes, {dtype_name}{list(shape)} needs {expected}"
        )
    if len(view) - pos < nbytes:
        raise TruncatedFrame(f"{name}: payload truncated ({len(view) - pos} of {nbytes} bytes)")
    array = np.frombuffer(view, dtype=_NP[dtype_name], count=count, offset=pos)
    array = array.reshape(shape)
    pos += nbytes
    return Frame(kind_e, name, array, LAYOUTS[layout], bytes(session), step), pos


def _check_codec(
    name: str, kind: FrameKind, dtype: str, codec: codecs.Codec, want: codecs.Codec | None
) -> None:
    """A compressed frame must be compressible; with a session codec, exactly it."""
    fits = codecs.compressible(kind.name, dtype)
    if codec.flag and not fits:
        raise UnsupportedVersion(
            f"{name}: a {kind.name} {dtype} frame travels raw (flags 0), not as {codec.name}"
        )
    if want is not None and fits and codec is not want:
        raise UnsupportedVersion(
            f"{name}: frame sent as {codec.name}; this session negotiated codec {want.name}"
        )


def check(frame: Frame, spec: TensorSpec, kind: FrameKind | None = None) -> None:
    """Raise FrameSpecMismatch unless the frame is the tensor the manifest describes."""
    if kind is not None and frame.kind != kind:
        raise FrameSpecMismatch(f"expected a {kind.name} frame, got {frame.kind.name}")
    if frame.name != spec.name:
        raise FrameSpecMismatch(f"expected tensor {spec.name!r}, got {frame.name!r}")
    if frame.dtype != spec.dtype:
        raise FrameSpecMismatch(f"{spec.name}: dtype {frame.dtype}, manifest says {spec.dtype}")
    if frame.layout != spec.layout:
        raise FrameSpecMismatch(f"{spec.name}: layout {frame.layout}, manifest says {spec.layout}")
    shape = frame.array.shape
    if len(shape) != len(spec.shape) or tuple(shape[1:]) != spec.sample_shape or shape[0] < 1:
        raise FrameSpecMismatch(
            f"{spec.name}: shape {list(shape)}, manifest says {['N', *spec.sample_shape]}"
        )


def scalar(name: str, value: float, session: bytes = NO_SESSION, step: int = 0) -> Frame:
    return Frame(
        FrameKind.SCALAR, name, np.asarray(value, dtype=np.float32), "scalar", session, step
    )
