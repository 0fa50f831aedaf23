"""Issue #8: what an attacker sent, one named regression test per case, against real uvicorn.

Every case used to end in a 5xx, a reset or a poisoned B. Here each is a 4xx with the
protocol's JSON, B (parameters, BatchNorm statistics, optimizer state) is byte-identical
afterwards, and the server keeps answering on the same keep-alive connection.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

import httpx
import numpy as np
import pytest
from test_server_helpers import (
    A_CUT,
    B_CUT,
    Device,
    double_b,
    double_manifest,
    rand,
    snapshot,
    write_bundle,
)

from server_torch.app import create_app
from shared_schema import MEDIA_TYPE, FrameKind
from shared_schema.frame import MAGIC

ACT, GRAD = FrameKind.ACTIVATION, FrameKind.GRADIENT


@pytest.fixture
def served(serve_app):
    """A double-split server (max batch 8) on a fresh B, its app and a device."""

    def start(**kwargs):
        kwargs.setdefault("max_batch", 8)
        app = create_app(
            None, module=double_b(), manifest=double_manifest(), device_dir=None, **kwargs
        )
        url = serve_app(app).url
        return url, app, Device(url)

    return start


def raw_frame(
    dims: tuple[int, ...],
    nbytes: int,
    *,
    session: bytes,
    flags: int = 0,
    name: bytes = b"a",
    payload: bytes = b"",
    dtype: int = 1,
    layout: int = 2,
) -> bytes:
    """A frame header built by hand (shared_schema.frame's layout), lying as asked."""
    head = struct.pack(
        "<4sBBBBBBH16sQQ", MAGIC, 1, int(ACT), dtype, layout, len(dims), flags, len(name),
        session, 0, nbytes,
    )  # fmt: skip
    return head + name + struct.pack(f"<{len(dims)}I", *dims) + payload


def assert_refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert r.headers.get("x-request-id")


# -- frames -----------------------------------------------------------------------------


def test_frame_dims_product_past_2_64_is_400_not_500(served):
    """(2^16)^4 = 2^64 wrapped to 0 in int64 and passed the size check."""
    url, app, dev = served()
    before = snapshot(app)
    r = dev.post("forward", raw_frame((1 << 16,) * 4, 0, session=dev.sidb))
    assert_refused(r, 400, "frame_size_mismatch")
    r = dev.post("forward", raw_frame((3, 1 << 22, 1 << 21, 1 << 21), 0, session=dev.sidb))
    assert_refused(r, 400, "frame_size_mismatch")
    assert snapshot(app) == before


def test_frame_zero_dim_with_huge_dims_is_400_not_500(served):
    """(0, 2^32-1, 2^32-1, 2^32-1): 0 bytes, but numpy's "array is too big" on reshape."""
    url, app, dev = served()
    big = (1 << 32) - 1
    r = dev.post("forward", raw_frame((0, big, big, big), 0, session=dev.sidb))
    assert_refused(r, 400, "frame_size_mismatch")
    r = dev.post("infer", raw_frame((0, big, big, big), 0, session=dev.sidb))
    assert_refused(r, 400, "frame_size_mismatch")


def test_frame_reserved_flags_byte_is_checked(served):
    url, app, dev = served()
    payload = rand((1, 8, 8, 4), 0).tobytes()
    for flags in (1, 0x80, 0xFF):
        body = raw_frame((1, 8, 8, 4), len(payload), session=dev.sidb, flags=flags, payload=payload)
        assert_refused(dev.post("forward", body), 400, "unsupported_version")
    ok = raw_frame((1, 8, 8, 4), len(payload), session=dev.sidb, payload=payload)
    assert dev.post("forward", ok).status_code == 200


def test_batch_limit_counts_samples_not_only_bytes(served):
    """--max-batch 8: an infer or forward of 9 samples is refused though its bytes fit."""
    url, app, dev = served(max_body_bytes=1 << 22)
    before = snapshot(app)
    for op in ("infer", "forward"):
        r = dev.post(op, dev.body(ACT, A_CUT, rand((9, 8, 8, 4), 0), 0))
        assert_refused(r, 413, "batch_too_large")
    assert snapshot(app) == before
    dev.ok("forward", dev.body(ACT, A_CUT, rand((8, 8, 8, 4), 0), 0))


# -- bundle files -------------------------------------------------------------------------


def test_bundle_paths_nul_overlong_and_symlink_loop_are_404(tmp_path, serve_app):
    bundle, manifest = write_bundle(tmp_path / "bundle")
    os.symlink("loop", bundle / "A" / "loop")  # a link to itself: ELOOP when followed
    os.symlink("../B.safetensors", bundle / "A" / "b-link")  # out of the device's folder
    (bundle / "A" / "sub").mkdir()
    os.symlink("..", bundle / "A" / "sub" / "up")  # a directory loop
    app = create_app(bundle, module=double_b(), manifest=manifest, device_dir=None)
    url = serve_app(app).url
    with httpx.Client(base_url=url) as http:
        for path in ("A%00", "A/model.json%00", "A/" + "x" * 5000, "x" * 60000, "A/loop",
                     "A/loop/x", "A/b-link", "A/sub/up/B.safetensors", "A/sub/up/A/model.json"):  # fmt: skip
            r = http.get(f"/v1/bundle/{path}")
            assert r.status_code in (400, 404, 414, 431), (path[:40], r.status_code, r.text[:200])
            if r.status_code == 404:
                assert r.json()["error"] == "not_found"
            assert str(tmp_path) not in r.text  # no server paths in replies
        assert http.get("/v1/bundle/A/model.json").status_code == 200


# -- JSON bodies --------------------------------------------------------------------------


def test_session_json_body_is_limited(served):
    url, app, dev = served()
    sha = app.state.manifest_sha256
    big = b'{"manifest_sha256": "' + sha.encode() + b'", "pad": "' + b"x" * (1 << 20) + b'"}'
    with httpx.Client(base_url=url) as http:
        r = http.post("/v1/sessions", content=big, headers={"Content-Type": "application/json"})
        assert_refused(r, 413, "json_too_large")

        def chunks():  # no Content-Length: the limit holds while reading
            yield b'{"manifest_sha256": "' + sha.encode() + b'", "pad": "'
            for _ in range(64):
                yield b"x" * 4096
            yield b'"}'

        r = http.post(
            "/v1/sessions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_refused(r, 413, "json_too_large")
        r = http.post(
            "/v1/sessions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert_refused(r, 422, "invalid_request")
        assert http.get("/v1/health").json()["sessions"] == 1


# -- unexpected failures --------------------------------------------------------------------


def test_unexpected_exception_is_generic_500_closing_the_connection(served, caplog):
    url, app, dev = served()
    secret = "/very/secret/server/path"

    def boom(*_a, **_k):
        raise RuntimeError(f"internal detail {secret}")

    app.state.service.session_status = boom
    with caplog.at_level(logging.ERROR, logger="spliteasy"), httpx.Client(base_url=url) as http:
        r = http.get(f"/v1/sessions/{dev.sid}", headers={"Authorization": f"Bearer {dev.token}"})
        assert r.status_code == 500
        assert r.headers["connection"] == "close"
        body = r.json()
        assert body["error"] == "internal_error" and secret not in r.text
        assert "RuntimeError" not in r.text
        rid = r.headers["x-request-id"]
        assert body["request_id"] == rid
        # the client's next request on a new connection is answered normally
        assert http.get("/v1/health").status_code == 200
    lines = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR


def test_client_disconnect_mid_body_is_one_line(served, caplog):
    url, app, dev = served()
    host, port = url.removeprefix("http://").split(":")
    with caplog.at_level(logging.DEBUG):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                f"POST /v1/sessions/{dev.sid}/forward HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {dev.token}\r\nContent-Type: {MEDIA_TYPE}\r\n"
                "Content-Length: 100000\r\n\r\n".encode()
                + b"SPLT" * 100
            )
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            "disconnected" in rec.getMessage() for rec in caplog.records
        ):
            time.sleep(0.05)
    gone = [rec for rec in caplog.records if "disconnected" in rec.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert app.state.budget.used == 0
    dev.ok("forward", dev.body(ACT, A_CUT, rand((2, 8, 8, 4), 0), 0))


# -- poisoning B --------------------------------------------------------------------------


def test_magnitudes_beyond_the_bound_are_refused(served):
    url, app, dev = served()
    before = snapshot(app)
    r = dev.post("forward", dev.body(ACT, A_CUT, np.full((2, 8, 8, 4), 3e38, np.float32), 0))
    assert_refused(r, 422, "value_out_of_range")
    dev.ok("forward", dev.body(ACT, A_CUT, rand((2, 8, 8, 4), 0), 0))
    mid = snapshot(app)
    r = dev.post("backward", dev.body(GRAD, B_CUT, np.full((2, 4, 4, 8), -3e38, np.float32), 0))
    assert_refused(r, 422, "value_out_of_range")
    assert snapshot(app) == mid and before != mid  # the forward moved BN statistics


def test_poisoning_step_is_refused_and_b_is_byte_identical(served):
    """Without a magnitude bound, 3e38 reaches B: the guard undoes the step (422)."""
    url, app, dev = served(max_abs_value=float("inf"))
    dev.ok("forward", dev.body(ACT, A_CUT, rand((4, 8, 8, 4), 1), 0))
    dev.ok(
        "backward", dev.body(GRAD, B_CUT, rand((4, 4, 4, 8), 2, 1e-2), 0)
    )  # Adam/momentum state exists
    before = snapshot(app)

    # an activation that overflows B's BatchNorm: refused at the forward
    r = dev.post("forward", dev.body(ACT, A_CUT, np.full((4, 8, 8, 4), 3e38, np.float32), 1))
    assert_refused(r, 422, "non_finite_step")
    assert snapshot(app) == before

    # a gradient that overflows B's parameter gradients: refused at the backward, and the
    # step's forward (BN statistics) is undone with it
    dev.ok("forward", dev.body(ACT, A_CUT, rand((4, 8, 8, 4), 3), 1))
    r = dev.post("backward", dev.body(GRAD, B_CUT, np.full((4, 4, 4, 8), 3e38, np.float32), 1))
    assert_refused(r, 422, "non_finite_step")
    assert snapshot(app) == before
    assert app.state.trainer.refused == 2

    # the session goes on with the same step; B still trains and stays finite
    (out,), _ = dev.ok("forward", dev.body(ACT, A_CUT, rand((4, 8, 8, 4), 3), 1))
    assert np.isfinite(out.array).all()
    dev.ok("backward", dev.body(GRAD, B_CUT, rand((4, 4, 4, 8), 4, 1e-2), 1))
    assert app.state.trainer.steps == 2
    for v in app.state.trainer.module.state_dict().values():
        assert bool(v.float().isfinite().all())


def test_large_finite_update_that_overflows_is_rolled_back(served):
    """A gradient below overflow whose update still overflows the parameters (plain SGD
    with a huge learning rate): the copy taken before the update is put back."""
    url, app, dev = served(max_abs_value=float("inf"))
    app.state.trainer.optimizer.param_groups[0]["lr"] = 1e30
    before = snapshot(app)
    dev.ok("forward", dev.body(ACT, A_CUT, rand((4, 8, 8, 4), 1), 0))
    r = dev.post("backward", dev.body(GRAD, B_CUT, np.full((4, 4, 4, 8), 1e20, np.float32), 0))
    assert_refused(r, 422, "non_finite_step")
    assert snapshot(app) == before


def test_failed_requests_are_one_structured_line_with_request_id(served, caplog):
    import json

    from server_torch.guard import JsonLines

    url, app, dev = served()
    with caplog.at_level(logging.INFO, logger="spliteasy.access"):
        r = dev.post("forward", b"not frames")
    rid = r.headers["x-request-id"]
    (rec,) = [x for x in caplog.records if rid in x.getMessage()]
    assert rec.fields["status"] == 400 and rec.fields["error"] == "bad_magic"
    assert rec.fields["route"] == "/v1/sessions/{sid}/forward"  # the template, not the path
    line = json.loads(JsonLines().format(rec))
    assert line["request_id"] == rid and line["level"] == "info" and line["error"] == "bad_magic"
