"""The JS frame codec is byte-compatible with shared_schema/frame.py, both ways.

Python encodes -> node decodes (same fields, same values) and re-encodes to the very same
bytes; node encodes -> Python decodes; a corrupt message is refused by both with the same
error class. The node unit tests (``device_tf/js/test``) run here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import JS_DIR, run_node

import shared_schema
from shared_schema.frame import Frame, FrameKind, decode, encode, scalar

pytestmark = pytest.mark.js

SESSION = bytes(range(16))


def _frames() -> list[Frame]:
    rng = np.random.default_rng(0)
    return [
        Frame(
            FrameKind.ACTIVATION,
            "a_out",
            rng.standard_normal((2, 3, 3, 4), dtype=np.float32),
            "NHWC",
            SESSION,
            2**40 + 3,
        ),
        Frame(
            FrameKind.GRADIENT,
            "dense/ü",
            rng.standard_normal((3, 5)).astype(np.float32),
            "NC",
            SESSION,
            7,
        ),
        Frame(FrameKind.LABELS, "labels", np.array([3, 1, 4], dtype=np.int32), "N", SESSION, 7),
        Frame(FrameKind.TARGET, "i64", np.array([-(2**40), 5], dtype=np.int64), "N", SESSION, 7),
        Frame(FrameKind.ACTIVATION, "u8", np.arange(6, dtype=np.uint8).reshape(1, 6), "NC"),
        Frame(FrameKind.ACTIVATION, "f16", np.array([[0.5, -2.0]], dtype=np.float16), "NC"),
        Frame(FrameKind.ACTIVATION, "empty", np.zeros((0, 4), dtype=np.float32), "NC"),
        scalar("loss", 0.25, SESSION, 7),
    ]


def _values(arr: np.ndarray) -> list:
    if arr.dtype == np.float16:
        return arr.view(np.uint16).ravel().tolist()  # JS keeps float16 as raw bits
    if arr.dtype == np.int64:
        return [str(v) for v in arr.ravel().tolist()]
    return arr.ravel().tolist()


def test_node_unit_suite() -> None:
    files = sorted(str(p.relative_to(JS_DIR)) for p in (JS_DIR / "test").glob("*.test.mjs"))
    assert files
    proc = run_node(["--test", *files])
    assert "# fail 0" in proc.stdout


def test_python_frames_decode_in_node_and_reencode_identically(tmp_path: Path) -> None:
    frames = _frames()
    body = encode(frames)
    src, dst = tmp_path / "py.frames", tmp_path / "js.frames"
    src.write_bytes(body)
    got = json.loads(run_node(["tools/codec_cli.mjs", "decode", str(src), str(dst)]).stdout)
    assert len(got["frames"]) == len(frames)
    for f, j in zip(frames, got["frames"], strict=True):
        assert j["kind"] == int(f.kind)
        assert j["name"] == f.name
        assert j["dtype"] == f.dtype
        assert j["shape"] == list(f.array.shape)
        assert j["layout"] == f.layout
        assert j["session"] == f.session.hex()
        assert j["step"] == f.step
        assert j["data"] == _values(f.array)
    assert dst.read_bytes() == body


def test_node_frames_decode_in_python(tmp_path: Path) -> None:
    frames = _frames()
    spec = [
        {
            "kind": int(f.kind),
            "name": f.name,
            "dtype": f.dtype,
            "shape": list(f.array.shape),
            "layout": f.layout,
            "session": f.session.hex(),
            "step": f.step,
            "data": _values(f.array),
        }
        for f in frames
    ]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "js.frames"
    run_node(["tools/codec_cli.mjs", "encode", str(tmp_path / "spec.json"), str(out)])
    body = out.read_bytes()
    assert body == encode(frames)
    for f, g in zip(frames, decode(body), strict=True):
        assert (g.kind, g.name, g.layout, g.session, g.step) == (
            f.kind,
            f.name,
            f.layout,
            f.session,
            f.step,
        )
        np.testing.assert_array_equal(g.array, f.array)


def _corruptions() -> dict[str, bytes]:
    good = encode(_frames()[:2])
    first = len(encode(_frames()[:1]))

    def patch(offset: int, value: bytes) -> bytes:
        b = bytearray(good)
        b[offset : offset + len(value)] = value
        return bytes(b)

    return {
        "empty": b"",
        "json": b'{"error": "not frames"}',
        "short-garbage": b"\x01\x02",
        "header-cut": good[:20],
        "payload-cut": good[:-1],
        "version": patch(4, b"\x09"),
        "kind": patch(5, b"\x63"),
        "dtype": patch(6, b"\x63"),
        "layout": patch(7, b"\x63"),
        "ndim": patch(8, b"\x09"),
        "size": patch(36, (12).to_bytes(8, "little")),
        "name-utf8": patch(44, b"\xff"),
        "second-frame-magic": patch(first, b"XXXX"),
        "trailing-magic": good + b"SPL",
    }


@pytest.mark.parametrize("case", list(_corruptions()))
def test_corrupt_message_same_error_class(case: str, tmp_path: Path) -> None:
    body = _corruptions()[case]
    with pytest.raises(shared_schema.FrameError) as py_err:
        decode(body)
    src = tmp_path / "bad.frames"
    src.write_bytes(body)
    got = json.loads(
        run_node(["tools/codec_cli.mjs", "decode", str(src), str(tmp_path / "o")]).stdout
    )
    assert got.get("error") == type(py_err.value).__name__, (got, py_err.value)
