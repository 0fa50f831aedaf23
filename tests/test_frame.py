"""The binary frame codec: round trips, and every kind of malformed frame rejected."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from shared_schema import (
    BadMagic,
    Frame,
    FrameError,
    FrameKind,
    FrameSizeMismatch,
    FrameSpecMismatch,
    TensorSpec,
    TruncatedFrame,
    UnsupportedVersion,
    check,
    decode,
    encode,
    scalar,
)
from shared_schema.frame import HEADER_SIZE

SESSION = bytes(range(16))
CUT = TensorSpec(name="a_out", shape=[None, 8, 8, 16], layout="NHWC")


def activation(batch: int = 3, step: int = 7) -> Frame:
    arr = np.random.default_rng(0).normal(size=(batch, 8, 8, 16)).astype(np.float32)
    return Frame(FrameKind.ACTIVATION, "a_out", arr, "NHWC", SESSION, step)


def test_round_trip_keeps_every_field_and_bit():
    labels = Frame(FrameKind.LABELS, "labels", np.array([3, 1, 4], np.int32), "N", SESSION, 7)
    frames = [activation(), labels, scalar("loss", 0.25, SESSION, 7)]
    out = decode(encode(frames))
    assert len(out) == 3
    for a, b in zip(frames, out, strict=True):
        assert (a.kind, a.name, a.layout, a.session, a.step) == (
            b.kind,
            b.name,
            b.layout,
            b.session,
            b.step,
        )
        assert a.array.dtype == b.array.dtype and a.array.shape == b.array.shape
        assert np.array_equal(a.array, b.array)
    check(out[0], CUT, FrameKind.ACTIVATION)


def test_payload_is_raw_little_endian_float32_after_a_small_header():
    f = activation(batch=1)
    body = encode([f])
    name_and_dims = len("a_out") + 4 * 4
    assert len(body) == HEADER_SIZE + name_and_dims + f.array.size * 4
    payload = body[HEADER_SIZE + name_and_dims :]
    assert payload == f.array.astype("<f4").tobytes()


def test_decoding_does_not_copy_the_payload():
    body = bytearray(encode([activation()]))
    arr = decode(body)[0].array
    body[-4:] = struct.pack("<f", 123.5)
    assert arr.reshape(-1)[-1] == 123.5


def test_big_endian_input_is_written_little_endian():
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    out = decode(encode([Frame(FrameKind.GRADIENT, "g", arr, "NC")]))[0]
    assert np.array_equal(out.array, arr.astype(np.float32))


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda b: b[:10], TruncatedFrame),
        (lambda b: b[:-1], TruncatedFrame),
        (lambda b: b[: HEADER_SIZE + 3], TruncatedFrame),
        (lambda b: b"XXXX" + b[4:], BadMagic),
        (lambda b: b[:4] + bytes([9]) + b[5:], UnsupportedVersion),
        (
            lambda b: b[:36] + struct.pack("<Q", struct.unpack_from("<Q", b, 36)[0] - 4) + b[44:],
            FrameSizeMismatch,
        ),
        (lambda b: b[:5] + bytes([42]) + b[6:], FrameSpecMismatch),  # unknown kind
        (lambda b: b[:6] + bytes([99]) + b[7:], FrameSpecMismatch),  # unknown dtype
        (lambda b: b[:8] + bytes([200]) + b[9:], FrameSpecMismatch),  # absurd rank
        (lambda b: b + b"junk", BadMagic),  # trailing bytes are not a frame
        (lambda b: b"", TruncatedFrame),
    ],
    ids=[
        "short-header",
        "short-payload",
        "short-shape",
        "magic",
        "version",
        "byte-count",
        "kind",
        "dtype",
        "rank",
        "trailing",
        "empty",
    ],
)
def test_malformed_frames_are_rejected_with_their_error(mutate, error):
    with pytest.raises(error):
        decode(mutate(encode([activation()])))


@pytest.mark.parametrize(
    "frame, message",
    [
        (
            Frame(FrameKind.ACTIVATION, "a_out", np.zeros((2, 8, 8, 15), np.float32), "NHWC"),
            "shape",
        ),
        (
            Frame(FrameKind.ACTIVATION, "a_out", np.zeros((2, 8, 8, 16), np.float16), "NHWC"),
            "dtype",
        ),
        (
            Frame(FrameKind.ACTIVATION, "a_out", np.zeros((2, 16, 8, 8), np.float32), "NCHW"),
            "layout",
        ),
        (
            Frame(FrameKind.ACTIVATION, "b_out", np.zeros((2, 8, 8, 16), np.float32), "NHWC"),
            "expected tensor",
        ),
        (
            Frame(FrameKind.GRADIENT, "a_out", np.zeros((2, 8, 8, 16), np.float32), "NHWC"),
            "ACTIVATION",
        ),
        (
            Frame(FrameKind.ACTIVATION, "a_out", np.zeros((0, 8, 8, 16), np.float32), "NHWC"),
            "shape",
        ),
    ],
)
def test_frames_that_disagree_with_the_manifest_are_rejected(frame, message):
    decoded = decode(encode([frame]))[0]
    with pytest.raises(FrameSpecMismatch, match=message):
        check(decoded, CUT, FrameKind.ACTIVATION)


def test_random_bytes_never_crash_the_decoder():
    rng = np.random.default_rng(1)
    good = encode([activation(batch=1)])
    for _ in range(300):
        body = bytearray(good)
        for pos in rng.integers(0, len(body), size=3):
            body[pos] = rng.integers(0, 256)
        cut = int(rng.integers(0, len(body) + 1))
        try:
            decode(bytes(body[:cut]))
        except FrameError:  # anything else (IndexError, numpy's ValueError...) fails the test
            pass
