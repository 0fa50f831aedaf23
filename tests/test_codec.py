"""Wire codecs (shared_schema/codec.py; issue #10 item 3): bounds, golden bytes, negotiation,
and split training on digits that still learns with fp16 and int8 on the wire.

- each codec's round trip stays within its error bound (fp16: 2^-11 relative; bf16: 2^-8;
  affine int8: half a quantisation step of the tensor's or channel's range; int4, which
  rounds stochastically: one step, and unbiased);
- the golden compressed frames (``tests/golden/frames/codec/``, ``make golden``) are what
  this codec writes for their inputs and decode to the recorded values; the JS codec
  asserts the same files (``device_tf/js/test/codec.test.mjs``);
- a session asks for its codec: refused with 422 JSON when unknown, not offered, or lossy
  with auxiliary labels; the codec is in the session's status and in the server's
  health; frames in another codec are refused (400);
- real HTTP runs (uvicorn on 127.0.0.1, the cached digits bundle, Python TF device), one
  epoch each from the same initial weights on the same batches: fp16 and int8 train
  (the last 10 steps' mean loss well below the first 10's) and end within 1 point (fp16)
  and 2 points (int8) of float32's test accuracy, with 2x and ~4x fewer bytes a step;
- the TF.js device in Node trains with ``--codec int8`` (the session's codec, its log).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from shared_schema import Frame, FrameKind, decode, encode
from shared_schema.codec import CODECS, NAMES, UnknownCodec, get
from shared_schema.frame import FrameSizeMismatch, FrameSpecMismatch, UnsupportedVersion

GOLDEN = Path(__file__).parent / "golden" / "frames" / "codec"
TABLE = json.loads((GOLDEN / "codec.json").read_text())


# -- the codec ---------------------------------------------------------------------------


def _bound(codec: str, x: np.ndarray, layout: str) -> np.ndarray:
    """The largest error codec may make on each element of x."""
    c = get(codec)
    if codec == "float32":
        return np.zeros_like(x)
    if codec == "fp16":
        return np.abs(x) * 2.0**-11 + 2.0**-25
    if codec == "bf16":
        return np.abs(x) * 2.0**-8
    axis, _ = c.channels(x.shape, layout)
    if axis is None:
        span = np.full_like(x, x.max() - x.min())
    else:
        other = tuple(i for i in range(x.ndim) if i != axis)
        span = np.broadcast_to(
            x.max(axis=other, keepdims=True) - x.min(axis=other, keepdims=True), x.shape
        )
    half = 1.0 if c.rounding == "stochastic" else 0.5  # stochastic: within one step
    return span / c.levels * half * (1 + 1e-6) + np.abs(x) * 2.0**-23


@pytest.mark.parametrize("codec", NAMES)
@pytest.mark.parametrize(
    "shape, layout", [((4, 5, 5, 6), "NHWC"), ((3, 6, 4, 4), "NCHW"), ((7, 33), "NC")]
)
def test_round_trip_within_the_codec_bound(codec: str, shape: tuple, layout: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * np.where(rng.random(shape) < 0.1, 100, 1)).astype(np.float32)
    (got,) = decode(encode([Frame(FrameKind.GRADIENT, "g", x, layout, codec=codec)]))
    assert got.codec == codec and got.array.dtype == np.float32 and got.array.shape == x.shape
    err = np.abs(got.array.astype(np.float64) - x)
    assert (err <= _bound(codec, x, layout)).all(), float((err - _bound(codec, x, layout)).max())
    if codec == "float32":
        assert np.array_equal(got.array, x)


def test_int4_rounds_stochastically_without_bias_and_deterministically() -> None:
    """Small values between two int4 levels keep their mean (nearest rounding would send
    them all to one level: the bias that stalled training); the same step and kind give
    the same bytes, another step other ones."""
    x = np.full((64, 1000), 0.3, np.float32)
    x[:, 0], x[:, 1] = 0.0, 1.0  # scale 1/15: 0.3 sits 4.5 levels up
    frame = Frame(FrameKind.GRADIENT, "g", x, "N", step=5, codec="int4")
    (got,) = decode(encode([frame]))
    assert abs(float(got.array[:, 2:].mean()) - 0.3) < 2e-3
    np.testing.assert_allclose(np.unique(got.array[:, 2:]), [4 / 15, 5 / 15], rtol=1e-6)
    assert encode([frame]) == encode([frame])
    again = Frame(FrameKind.GRADIENT, "g", x, "N", step=6, codec="int4")
    assert encode([again]) != encode([Frame(FrameKind.GRADIENT, "g", x, "N", step=5, codec="int4")])


def test_payload_sizes_meet_the_issue_targets() -> None:
    """Bytes of a digits-sized activation message against raw float32 (headers included)."""
    x = np.full((32, 8, 8, 16), 0.25, np.float32)
    size = {
        c: len(encode([Frame(FrameKind.ACTIVATION, "a_out", x, "NHWC", codec=c)])) for c in NAMES
    }
    raw = x.nbytes
    assert size["float32"] <= 1.01 * raw
    assert size["fp16"] <= 0.51 * raw and size["bf16"] <= 0.51 * raw
    assert size["int8"] <= 0.26 * raw and size["int8-channel"] <= 0.26 * raw
    assert raw / size["int4"] >= 7.9


def test_saturation_signed_zero_and_constant_channels() -> None:
    x = np.array([[7e4, -1e9, np.inf, -0.0, 65504.0, 1e-9]], np.float32)
    (got,) = decode(encode([Frame(FrameKind.ACTIVATION, "a", x, "NC", codec="fp16")]))
    assert got.array.tolist()[0][:3] == [65504.0, -65504.0, 65504.0]  # saturated, finite
    const = np.full((2, 3), 0.5, np.float32)
    for codec in ("int8", "int8-channel", "int4"):
        (got,) = decode(encode([Frame(FrameKind.ACTIVATION, "a", const, "NC", codec=codec)]))
        assert np.array_equal(got.array, const)  # scale 0: exact
        bad = const.copy()
        bad[1, 1] = np.nan
        with pytest.raises(FrameSpecMismatch, match="NaN"):
            encode([Frame(FrameKind.ACTIVATION, "a", bad, "NC", codec=codec)])


def test_decode_enforces_the_session_codec_and_raw_kinds() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    fp16 = encode([Frame(FrameKind.ACTIVATION, "a", x, "NC", codec="fp16")])
    plain = encode([Frame(FrameKind.ACTIVATION, "a", x, "NC")])
    assert decode(fp16, "fp16")[0].codec == "fp16"
    with pytest.raises(UnsupportedVersion, match="negotiated codec float32"):
        decode(fp16, "float32")
    with pytest.raises(UnsupportedVersion, match="negotiated codec int8"):
        decode(plain, "int8")
    with pytest.raises(FrameSizeMismatch, match="at most 11"):
        decode(fp16, "fp16", max_elements=11)
    with pytest.raises(FrameSpecMismatch, match="travels raw"):
        encode([Frame(FrameKind.LABELS, "y", np.array([1], np.int32), "N", codec="int8")])
    labels = bytearray(encode([Frame(FrameKind.LABELS, "y", np.array([1], np.int32), "N")]))
    labels[9] = CODECS["int8"].flag
    with pytest.raises(UnsupportedVersion, match="travels raw"):
        decode(bytes(labels))
    short = bytearray(fp16[:-2])
    short[36:44] = (22).to_bytes(8, "little")
    with pytest.raises(FrameSizeMismatch, match="fp16"):
        decode(bytes(short))
    with pytest.raises(UnknownCodec, match="top-k"):
        encode([Frame(FrameKind.ACTIVATION, "a", x, "NC", codec="top-k")])


# -- golden bytes, shared with the JS codec ---------------------------------------------


@pytest.mark.parametrize("codec", NAMES)
def test_golden_compressed_frames(codec: str) -> None:
    rows = TABLE[codec]
    raw = (GOLDEN / f"{codec}.frames").read_bytes()
    frames = []
    for r in rows:
        dtype = "<i4" if r["dtype"] == "int32" else "<f4"
        array = np.frombuffer(bytes.fromhex(r["input_hex"]), dtype).reshape(r["shape"])
        frames.append(
            Frame(
                FrameKind[r["kind"]],
                r["name"],
                array,
                r["layout"],
                bytes.fromhex(r["session"]),
                r["step"],
                r["codec"],
            )
        )
    assert encode(frames) == raw
    for got, r in zip(decode(raw), rows, strict=True):
        assert (got.kind.name, got.name, got.layout, got.step, got.codec) == (
            r["kind"],
            r["name"],
            r["layout"],
            r["step"],
            r["codec"],
        )
        assert np.ascontiguousarray(got.array).tobytes().hex() == r["decoded_hex"], got.name


def test_golden_codec_files_are_what_the_generator_writes() -> None:
    import importlib.util

    path = GOLDEN.parents[1] / "make_frames.py"
    spec = importlib.util.spec_from_file_location("make_frames", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made = module.codec_goldens()
    assert sorted(made) == sorted(TABLE) == sorted(NAMES)
    for codec, (body, rows) in made.items():
        assert body == (GOLDEN / f"{codec}.frames").read_bytes(), codec
        assert rows == TABLE[codec], codec


# -- negotiation over real HTTP ---------------------------------------------------------


@pytest.fixture(scope="module")
def served(digits_bundle_dir: Path):
    """One real server (uvicorn on 127.0.0.1) for the negotiation tests; offers all but bf16."""
    from server_torch.app import create_app
    from server_torch.serving import ServerThread
    from shared_schema import manifest_digest

    offered = tuple(c for c in NAMES if c != "bf16")
    with ServerThread(create_app(digits_bundle_dir, codecs=offered)) as srv:
        yield srv.url, manifest_digest(digits_bundle_dir), offered


def _open(url: str, sha: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha, **body})


def test_unknown_or_unoffered_codec_is_a_422_json(served) -> None:
    url, sha, offered = served
    for codec, why in (("top-k", "unknown codec 'top-k'"), ("bf16", "codec 'bf16'")):
        r = _open(url, sha, codec=codec)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "unsupported_codec"
        assert why in body["detail"] and "offers float32, fp16" in body["detail"]
        assert body["offered"] == list(offered)
    r = _open(url, sha, codec="int8", aux_label=True)
    assert r.status_code == 422 and r.json()["error"] == "unsupported_codec"
    assert "aux_label" in r.json()["detail"]
    r = _open(url, sha, codec=7)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    health = httpx.get(f"{url}/v1/health").json()
    assert health["codecs"] == list(offered)


def test_session_codec_is_in_its_status_and_governs_its_frames(served, digits_bundle_dir) -> None:
    from shared_schema import load_manifest

    url, sha, _ = served
    created = _open(url, sha, codec="int8")
    assert created.status_code == 201 and created.json()["codec"] == "int8"
    sid, token = created.json()["session_id"], created.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    status = httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).json()
    assert status["codec"] == "int8"
    cut = load_manifest(digits_bundle_dir).cuts[0]
    a = np.random.default_rng(0).random((4, *cut.sample_shape), dtype=np.float32)
    headers = {**auth, "Content-Type": "application/x-spliteasy-frames"}

    def body(codec: str) -> bytes:
        return encode(
            [Frame(FrameKind.ACTIVATION, cut.name, a, cut.layout, bytes.fromhex(sid), 0, codec)]
        )

    refused = httpx.post(f"{url}/v1/sessions/{sid}/infer", content=body("float32"), headers=headers)
    assert refused.status_code == 400 and refused.json()["error"] == "unsupported_version"
    assert "negotiated codec int8" in refused.json()["detail"]
    ok = httpx.post(f"{url}/v1/sessions/{sid}/infer", content=body("int8"), headers=headers)
    assert ok.status_code == 200, ok.text
    (out,) = decode(ok.content, "int8")
    assert out.codec == "int8" and out.array.shape[0] == 4
    assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=auth).status_code == 204


# -- training with compressed frames ----------------------------------------------------


@pytest.fixture(scope="module")
def runs(digits_bundle_dir: Path) -> dict[str, dict]:
    """One epoch per codec, each from the bundle's initial weights on the same batches."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from codec_study import run_codec

    return {
        c: run_codec(digits_bundle_dir, c, epochs=1, batch_size=32)
        for c in ("float32", "fp16", "int8")
    }


@pytest.mark.parametrize("codec, margin", [("fp16", 0.01), ("int8", 0.02)])
def test_http_training_with_a_codec_learns_like_float32(runs, codec: str, margin: float) -> None:
    ref, got = runs["float32"], runs[codec]
    print(
        f"\n{codec}: accuracy {got['test_accuracy']:.4f} (float32 {ref['test_accuracy']:.4f}), "
        f"{got['bytes_per_step']:.0f} bytes/step (float32 {ref['bytes_per_step']:.0f}), "
        f"loss {got['first_steps_loss']:.3f} -> {got['last_steps_loss']:.3f}"
    )
    assert got["session_codec"] == codec
    assert got["last_steps_loss"] < 0.6 * got["first_steps_loss"]  # it trains
    assert got["test_accuracy"] >= ref["test_accuracy"] - margin
    assert got["test_accuracy"] > 0.85
    ratio = got["bytes_per_step"] / ref["bytes_per_step"]
    assert ratio <= {"fp16": 0.51, "int8": 0.26}[codec], ratio


@pytest.mark.js
def test_node_device_trains_with_int8(digits_bundles, serve_app, tmp_path: Path) -> None:
    from js_fixtures import run_node, write_batches

    from server_torch.app import create_app
    from split_helpers import ALL_RUNTIMES, SGD_CFG, fixed_batches

    bundle, _ = digits_bundles("double", SGD_CFG, ALL_RUNTIMES)
    app = create_app(bundle)
    srv = serve_app(app)
    data = write_batches(tmp_path / "data.frames", fixed_batches(8, 32))
    log = tmp_path / "log.json"
    args = ["train.mjs", "--server", srv.url, "--bundle", str(bundle), "--data", str(data)]
    args += ["--batch-size", "32", "--steps", "8", "--codec", "int8", "--log-json", str(log)]
    run_node(args)
    doc = json.loads(log.read_text())
    records = doc["records"]
    assert len(records) == 8 and {r["codec"] for r in records} == {"int8"}
    assert doc["summary"]["codec"] == "int8"
    assert records[-1]["loss"] < records[0]["loss"]
    from shared_schema import load_manifest

    m = load_manifest(bundle)
    raw = 32 * (m.cuts[0].bytes_per_sample + m.cuts[1].bytes_per_sample)  # float32 payloads
    # int8 both ways (the server answered in the session's codec): a quarter plus scales
    # and frame headers
    assert records[0]["bytes_up"] < 0.27 * raw and records[0]["bytes_down"] < 0.27 * raw
