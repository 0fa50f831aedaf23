"""Writes tests/golden/frames/*.frames and frames.json (what each file holds).

Run once (``make golden``) when the wire format changes on purpose; the Python and the
JS codec tests then decode every file, compare it with frames.json and re-encode it
byte for byte. The values are fixed, not random, so regenerating changes no byte.

``frames/codec/<codec>.frames`` (and ``codec.json``): one message per wire codec
(``shared_schema/codec.py``), the same float32 tensors encoded by each -- the bytes both
runtimes must write for those inputs, and the float32 values both must decode them to.
The inputs hold the cases where rounding could differ: binary16 and bfloat16 ties,
subnormals, values past 65504, signed zeros, a constant channel, an odd element count
(int4's last nibble), an empty batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared_schema import Frame, FrameKind, decode, encode
from shared_schema.codec import NAMES as CODECS

HERE = Path(__file__).resolve().parent / "frames"
CODEC_DIR = HERE / "codec"
SESSION = bytes.fromhex("00112233445566778899aabbccddeeff")


def golden_messages() -> dict[str, list[Frame]]:
    """The golden messages by file stem: every kind, dtype and layout at least once."""
    ramp = np.arange(2 * 3 * 3 * 2, dtype=np.float32) / 7 - 1
    return {
        "forward_activation_nhwc": [
            Frame(FrameKind.ACTIVATION, "a_out", ramp.reshape(2, 3, 3, 2), "NHWC", SESSION, 41)
        ],
        "backward_gradient_and_loss": [
            Frame(FrameKind.GRADIENT, "b_out", (ramp[:6] * 1e-3).reshape(2, 3), "NC", SESSION, 7),
            Frame(
                FrameKind.SCALAR, "loss", np.asarray(2.3025851, np.float32), "scalar", SESSION, 7
            ),
        ],
        "single_split_labels": [
            Frame(FrameKind.ACTIVATION, "a_out", ramp[:8].reshape(2, 4), "NC", SESSION, 2**40),
            Frame(FrameKind.LABELS, "labels", np.asarray([3, 9], np.int32), "N", SESSION, 2**40),
        ],
        "aux_target_float16_nchw": [
            Frame(
                FrameKind.TARGET, "c_hat", ramp[:12].astype(np.float16).reshape(1, 3, 2, 2), "NCHW"
            )
        ],
        "int64_uint8_empty": [
            Frame(FrameKind.LABELS, "ids", np.asarray([-1, 2**62], np.int64), "N"),
            Frame(FrameKind.ACTIVATION, "pixels", np.arange(6, dtype=np.uint8).reshape(2, 3), "NC"),
            Frame(FrameKind.ACTIVATION, "nothing", np.zeros((0, 3), np.float32), "NC"),
            Frame(FrameKind.SCALAR, "größe", np.asarray(0.5, np.float32), "scalar"),
        ],
    }


def codec_inputs() -> list[Frame]:
    """The float32 tensors every codec's golden message carries (and a raw LABELS frame)."""
    act = (np.arange(2 * 3 * 3 * 4, dtype=np.float32) / 9 - 2).reshape(2, 3, 3, 4)
    specials = [
        65504.0,
        70000.0,
        -1e5,
        2.0**-24,
        2.0**-25,
        3 * 2.0**-26,
        1 + 2.0**-11,
        1 + 3 * 2.0**-11,
        -0.0,
        1e-8,
        1 + 2.0**-8,
        1 + 3 * 2.0**-8,
        -(1 + 2.0**-11),
        0.1,
        -2.5e-6,
        3.0e4,
    ]
    act[0, :, :, 1].flat[:9] = specials[:9]
    act[1, :, :, 1].flat[:7] = specials[9:]
    act[:, :, :, 3] = 0.5  # a constant channel: its scale is 0
    act[1, 2, 2, 0] = -0.0
    grad = (np.sin(np.arange(12, dtype=np.float32) * 1.3) * 1e-3).reshape(1, 3, 2, 2)
    odd = (np.cos(np.arange(15, dtype=np.float32)) * 7.0).reshape(3, 5)
    return [
        Frame(FrameKind.ACTIVATION, "a_out", act.astype(np.float32), "NHWC", SESSION, 9),
        Frame(FrameKind.GRADIENT, "g_nchw", grad.astype(np.float32), "NCHW", SESSION, 9),
        Frame(FrameKind.GRADIENT, "g_odd", odd.astype(np.float32), "NC", SESSION, 9),
        Frame(FrameKind.ACTIVATION, "empty", np.zeros((0, 4), np.float32), "NC", SESSION, 9),
        Frame(FrameKind.LABELS, "labels", np.asarray([3, 9], np.int32), "N", SESSION, 9),
    ]


def with_codec(frame: Frame, codec: str) -> Frame:
    if frame.kind not in (FrameKind.ACTIVATION, FrameKind.GRADIENT):
        return frame
    return Frame(
        frame.kind, frame.name, frame.array, frame.layout, frame.session, frame.step, codec
    )


def _hex(array: np.ndarray) -> str:
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes().hex()


def codec_goldens() -> dict[str, tuple[bytes, list[dict[str, object]]]]:
    """Per codec: the encoded message and, per frame, its input and decoded values."""
    out = {}
    for codec in CODECS:
        frames = [with_codec(f, codec) for f in codec_inputs()]
        body = encode(frames)
        rows = []
        for f, g in zip(frames, decode(body), strict=True):
            rows.append(
                {
                    **{k: v for k, v in describe(f).items() if k != "payload_hex"},
                    "codec": g.codec,
                    "input_hex": _hex(np.asarray(f.array)),
                    "decoded_hex": _hex(np.asarray(g.array)),
                }
            )
        out[codec] = (body, rows)
    return out


def describe(frame: Frame) -> dict[str, object]:
    """A frame as JSON both codecs can compare with (payload as little-endian hex)."""
    array = np.asarray(frame.array)  # not ascontiguousarray: it makes 0-d scalars 1-d
    return {
        "kind": frame.kind.name,
        "name": frame.name,
        "dtype": frame.dtype,
        "shape": list(array.shape),
        "layout": frame.layout,
        "session": frame.session.hex(),
        "step": frame.step,
        "payload_hex": array.astype(array.dtype.newbyteorder("<")).tobytes(order="C").hex(),
    }


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    index = {}
    for stem, frames in golden_messages().items():
        (HERE / f"{stem}.frames").write_bytes(encode(frames))
        index[stem] = [describe(f) for f in frames]
    (HERE / "frames.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(index)} golden messages to {HERE}")
    CODEC_DIR.mkdir(exist_ok=True)
    table = {}
    for codec, (body, rows) in codec_goldens().items():
        (CODEC_DIR / f"{codec}.frames").write_bytes(body)
        table[codec] = rows
    (CODEC_DIR / "codec.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table)} codec golden messages to {CODEC_DIR}")


if __name__ == "__main__":
    main()
