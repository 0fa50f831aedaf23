"""Wire compression of cut tensors: what a session's ``codec`` does to a frame's payload.

A session picks one codec when it is opened (``POST /v1/sessions {"codec": name}``);
from then on every float32 ACTIVATION and GRADIENT frame of that session, both ways,
travels encoded by it. The frame header keeps the *logical* tensor (dtype float32, its
layout and shape), so ``check`` against the manifest is unchanged; the header's flags
byte names the codec and the payload length is the encoded length. LABELS, SCALAR and
TARGET frames always travel raw (flags 0). The codecs, their flags and the channel axis
of each layout are in ``protocol.json`` (``codecs``), the one source the JS twin
(``device_tf/js/src/codec.mjs``) is tested against, byte for byte, through the golden
frames of ``tests/golden/frames/codec/``.

Payloads (all little-endian; n elements in C order, C channels):

==============  =============================================================  ========
codec           payload                                                        bytes
==============  =============================================================  ========
float32         the float32 values (exact; the default)                        4n
fp16            IEEE binary16, round to nearest even, saturated at +-65504     2n
bf16            the top 16 bits of the float32, round to nearest even          2n
int8            lo[1] f32, scale[1] f32, q[n] u8; x ~ lo + q * scale             8 + n
int8-channel    lo[C] f32, scale[C] f32, q[n] u8 (per channel)                 8C + n
int4            lo[C] f32, scale[C] f32, q[n] 4-bit, 2 a byte, low nibble      8C + ceil(n/2)
                first, per channel
==============  =============================================================  ========

The affine codecs (int8, int8-channel, int4) map each channel's [min, max] onto the
integers 0..L (L = 255 or 15): ``scale = f32((hi - lo) / L)``, ``q = floor((x - lo) /
scale + u)`` clipped to 0..L (0 when scale is 0), decoded as ``f32(lo + q * scale)``.
int8 rounds to nearest (``u = 0.5``; error <= scale / 2). int4 rounds stochastically:
``u_i = fmix32(i * 0x9E3779B1 + seed) / 2^32`` (murmur3's finaliser; ``seed`` from the
frame's step and kind, :func:`frame_seed`), so E[q] is exact and the error < scale: with
15 levels, nearest rounding sends every small gradient to the same level each step, a
bias that cost 10 points of digits accuracy in 3 epochs; unbiased rounding trains.
Every step is an IEEE double operation on float32 inputs (or a uint32 hash) followed by
one rounding to float32, so numpy and JavaScript (whose numbers are doubles) produce the
same bytes.

Why 4-bit and not top-k sparsification for the stronger scheme: a codec here has no
state. Top-k needs error feedback to train well, and that residual would be per-session,
per-direction state on both sides that has to roll back with the device's durable
snapshots and the server's checkpoints and stay consistent with the retry store (a
replayed reply must not feed the residual twice); and for activations error feedback
is not even meaningful, since each step carries other samples. 4-bit per-channel
quantisation is stateless, deterministic (its rounding noise is a hash of the step:
golden bytes, and a retried step encodes the same bytes), applies to activations and
gradients alike, and gives 7.8x fewer bytes than float32 on digits (8x minus the
per-channel scales and the frame header).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._exceptions import FrameSpecMismatch, SpliteasyError
from .protocol import CODECS as _SPEC

DEFAULT: str = _SPEC["default"]
COMPRESSIBLE_KINDS: frozenset[str] = frozenset(_SPEC["compressible_kinds"])
CHANNEL_AXIS: dict[str, int] = dict(_SPEC["channel_axis"])
FP16_MAX = 65504.0


class UnknownCodec(SpliteasyError, ValueError):
    """A codec name this build does not know."""


@dataclass(frozen=True)
class Codec:
    """One wire codec (a row of ``protocol.json``'s ``codecs.schemes``)."""

    name: str
    flag: int
    bits: int
    scales: str | None  # None (a float format), "tensor" or "channel"
    levels: int | None  # the largest quantised integer of an affine codec
    rounding: str | None = None  # affine codecs: "nearest" or "stochastic"

    @property
    def exact(self) -> bool:
        return self.bits == 32

    def channels(self, shape: Sequence[int], layout: str) -> tuple[int | None, int]:
        """The axis the scales run along and how many there are (per tensor: None, 1)."""
        axis = CHANNEL_AXIS.get(layout)
        if self.scales != "channel" or axis is None or len(shape) <= axis:
            return None, 1
        return axis, int(shape[axis])

    def payload_size(self, shape: Sequence[int], layout: str) -> int:
        """Encoded payload bytes of a float32 tensor of this shape (Python ints: no wrap)."""
        n = math.prod(int(d) for d in shape)
        if self.levels is None:
            return n * self.bits // 8
        _, c = self.channels(shape, layout)
        return 8 * c + (n if self.bits == 8 else (n + 1) // 2)

    # -- encode ---------------------------------------------------------------------------

    def compress(self, array: np.ndarray, layout: str, seed: int = 0) -> bytes:
        """The payload of a float32 array (C order) under this codec. ``seed`` (the frame's
        step and kind, ``frame_seed``) drives int4's stochastic rounding."""
        x = np.ascontiguousarray(array, dtype="<f4")
        if self.name == "float32":
            return x.tobytes()
        if self.name == "fp16":
            return np.clip(x, -FP16_MAX, FP16_MAX).astype("<f2").tobytes()
        if self.name == "bf16":
            return _bf16_bits(x).tobytes()
        lo, scale, q = self._quantise(x, layout, seed)
        if self.bits == 4:
            flat = q.reshape(-1)
            if flat.size % 2:
                flat = np.concatenate([flat, np.zeros(1, np.uint8)])
            q = flat[0::2] | (flat[1::2] << 4)
        return lo.tobytes() + scale.tobytes() + q.tobytes()

    def _quantise(
        self, x: np.ndarray, layout: str, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        levels = float(self.levels or 0)
        axis, c = self.channels(x.shape, layout)
        rows = x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(c, -1)
        if rows.shape[1] == 0:
            lo = hi = np.zeros(c, "<f4")
        else:
            # + 0 turns a -0 into +0: both runtimes then write the same scale bytes
            lo, hi = rows.min(axis=1) + np.float32(0), rows.max(axis=1) + np.float32(0)
            if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                raise FrameSpecMismatch(
                    f"a tensor with NaN or Inf cannot be sent with codec {self.name}"
                )
        scale = ((hi.astype(np.float64) - lo.astype(np.float64)) / levels).astype("<f4")
        bshape = [1] * x.ndim
        if axis is not None:
            bshape[axis] = c
        lo64 = lo.astype(np.float64).reshape(bshape) if x.ndim else lo.astype(np.float64)[0]
        s64 = scale.astype(np.float64).reshape(bshape) if x.ndim else scale.astype(np.float64)[0]
        zero = s64 == 0
        # int8: round to nearest; int4: stochastic rounding (unbiased: E[q] is exact), from
        # a hash of (seed, element index) that both runtimes compute the same
        offset = _uniform(x.size, seed).reshape(x.shape) if self.rounding == "stochastic" else 0.5
        q = np.floor((x.astype(np.float64) - lo64) / np.where(zero, 1.0, s64) + offset)
        q = np.clip(np.where(zero, 0.0, q), 0.0, levels).astype(np.uint8)
        return lo.astype("<f4"), scale, q

    # -- decode ---------------------------------------------------------------------------

    def decompress(
        self, payload: memoryview | bytes, shape: Sequence[int], layout: str
    ) -> np.ndarray:
        """The float32 array a payload of this codec encodes (a new, writable array).

        The caller has checked ``len(payload) == payload_size(shape, layout)``."""
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        if self.name == "float32":
            return np.frombuffer(payload, "<f4", count=n).reshape(shape).copy()
        if self.name == "fp16":
            return np.frombuffer(payload, "<f2", count=n).astype(np.float32).reshape(shape)
        if self.name == "bf16":
            bits = np.frombuffer(payload, "<u2", count=n).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        axis, c = self.channels(shape, layout)
        lo = np.frombuffer(payload, "<f4", count=c).astype(np.float64)
        scale = np.frombuffer(payload, "<f4", count=c, offset=4 * c).astype(np.float64)
        raw = np.frombuffer(payload, np.uint8, offset=8 * c)
        if self.bits == 4:
            q = np.empty(2 * raw.size, np.uint8)
            q[0::2], q[1::2] = raw & 0x0F, raw >> 4
            q = q[:n]
        else:
            q = raw[:n]
        q = q.reshape(shape).astype(np.float64)
        bshape = [1] * len(shape)
        if axis is not None:
            bshape[axis] = c
        if not shape:
            return np.asarray(lo[0] + q * scale[0], np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # the receiver checks finiteness
            return (lo.reshape(bshape) + q * scale.reshape(bshape)).astype(np.float32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser on uint32 arrays (wrapping arithmetic)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def frame_seed(step: int, kind: int) -> int:
    """The stochastic-rounding seed of a frame: its step (64 bits) and kind, mixed to 32."""
    hi = _fmix32(np.array([(step >> 32) & 0xFFFFFFFF], np.uint32))[0]
    mixed = np.uint32(step & 0xFFFFFFFF) ^ hi ^ np.uint32((kind * 0x27D4EB2F) & 0xFFFFFFFF)
    return int(_fmix32(np.array([mixed], np.uint32))[0])


def _uniform(n: int, seed: int) -> np.ndarray:
    """n numbers in [0, 1): fmix32(i * 0x9E3779B1 + seed) / 2^32 for i = 0 .. n-1."""
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint32)
        h = _fmix32(i * np.uint32(0x9E3779B1) + np.uint32(seed & 0xFFFFFFFF))
    return h.astype(np.float64) / 4294967296.0


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN."""
    u = x.view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return rounded.astype("<u2")


CODECS: dict[str, Codec] = {
    name: Codec(name, int(s["flag"]), int(s["bits"]), s["scales"], s["levels"], s.get("rounding"))
    for name, s in _SPEC["schemes"].items()
}
BY_FLAG: dict[int, Codec] = {c.flag: c for c in CODECS.values()}
NAMES: tuple[str, ...] = tuple(CODECS)


def get(name: str) -> Codec:
    """The codec called ``name``; :class:`UnknownCodec` names the known ones otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise UnknownCodec(f"unknown codec {name!r}; this build knows {', '.join(NAMES)}") from None


def compressible(kind_name: str, dtype: str) -> bool:
    """Whether a frame of this kind and dtype travels in its session's codec."""
    return kind_name in COMPRESSIBLE_KINDS and dtype == "float32"
