"""The wire contract's one source (shared_schema/protocol.json) and the golden frames.

The JS twin of these checks is device_tf/js/test/protocol.test.mjs: both codecs decode
the same golden files and re-encode them byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from shared_schema import FrameKind, decode, encode
from shared_schema import frame as frame_module
from shared_schema.protocol import ERROR_STATUS, PROTOCOL, RETRY_AFTER

GOLDEN = Path(__file__).resolve().parent / "golden" / "frames"
INDEX = json.loads((GOLDEN / "frames.json").read_text())


def test_frame_constants_come_from_protocol_json() -> None:
    spec = PROTOCOL["frame"]
    assert spec["magic"].encode() == frame_module.MAGIC
    assert spec["version"] == frame_module.VERSION
    assert spec["media_type"] == frame_module.MEDIA_TYPE
    assert frame_module.HEADER_SIZE == spec["header_size"] == 44
    assert {k.name: k.value for k in FrameKind} == spec["kinds"]
    assert {str(k): v for k, v in frame_module.DTYPES.items()} == spec["dtypes"]
    assert {str(k): v for k, v in frame_module.LAYOUTS.items()} == spec["layouts"]


def test_every_server_error_code_is_in_the_table() -> None:
    """A code missing from protocol.json would silently keep a hand-written status; every
    ServerError subclass of the server (app, ws and parallel modules included) counts."""
    errors = pytest.importorskip("server_torch.errors")
    pytest.importorskip("server_torch.app")  # imports the modules that add their own errors

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    classes = subclasses(errors.ServerError)
    assert len(classes) > 20
    for cls in classes:
        assert cls.code in ERROR_STATUS, cls
        assert cls.status == ERROR_STATUS[cls.code], cls
        if cls.code in RETRY_AFTER:
            assert cls.headers["Retry-After"] == str(RETRY_AFTER[cls.code])


@pytest.mark.parametrize("stem", sorted(INDEX))
def test_golden_frames_decode_and_reencode_byte_for_byte(stem: str) -> None:
    raw = (GOLDEN / f"{stem}.frames").read_bytes()
    frames = decode(raw)
    assert encode(frames) == raw
    assert len(frames) == len(INDEX[stem])
    for got, want in zip(frames, INDEX[stem], strict=True):
        array = np.asarray(got.array)
        assert got.kind.name == want["kind"]
        assert got.name == want["name"]
        assert got.dtype == want["dtype"]
        assert list(array.shape) == want["shape"]
        assert got.layout == want["layout"]
        assert got.session.hex() == want["session"]
        assert got.step == want["step"]
        assert array.tobytes().hex() == want["payload_hex"]


def test_golden_files_are_what_the_generator_writes() -> None:
    """The files match ``make golden``'s source (no hand-edited or stale file)."""
    path = GOLDEN.parent / "make_frames.py"
    spec = importlib.util.spec_from_file_location("make_frames", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    messages = module.golden_messages()
    assert sorted(messages) == sorted(INDEX)
    for stem, frames in messages.items():
        assert encode(frames) == (GOLDEN / f"{stem}.frames").read_bytes(), stem
        assert [module.describe(f) for f in frames] == INDEX[stem], stem
