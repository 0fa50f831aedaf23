"""Writes tests/golden/frames/*.frames and frames.json (what each file holds).

Run once (``make golden``) when the wire format changes on purpose; the Python and the
JS codec tests then decode every file, compare it with frames.json and re-encode it
byte for byte. The values are fixed, not random, so regenerating changes no byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared_schema import Frame, FrameKind, encode

HERE = Path(__file__).resolve().parent / "frames"
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


if __name__ == "__main__":
    main()
