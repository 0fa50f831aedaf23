"""The HTTP protocol (docs/protocol.md) against real uvicorn on 127.0.0.1 and real torch.

B is a small hand-made torch module injected into create_app; every number the server
returns is compared with torch autograd run independently on a copy of B.
"""

from __future__ import annotations

import hashlib
import struct
import threading

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_server_helpers import (
    A_CUT,
    B_CUT,
    LABELS,
    Device,
    clone,
    double_b,
    double_manifest,
    nhwc_to_torch,
    rand,
    session_state,
    single_b,
    single_manifest,
    snapshot,
    write_bundle,
)

from server_torch.app import create_app
from shared_schema import MEDIA_TYPE, FrameKind, decode, encode, scalar

ACT, GRAD, TARGET, LAB = (
    FrameKind.ACTIVATION,
    FrameKind.GRADIENT,
    FrameKind.TARGET,
    FrameKind.LABELS,
)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def double(serve_app):
    """A double-split server on a fresh B, the pristine copy of B, and the app."""
    module = double_b()
    ref = clone(module)
    app = create_app(None, module=module, manifest=double_manifest(), device_dir=None)
    srv = serve_app(app)
    return srv.url, app, ref


def _close(x: np.ndarray, y: np.ndarray | torch.Tensor) -> None:
    y = y.detach().numpy() if torch.is_tensor(y) else y
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


# -- health, manifest, sessions ---------------------------------------------------------


def test_health_manifest_and_sessions(double):
    url, app, _ = double
    health = httpx.get(f"{url}/v1/health").json()
    assert health["status"] == "ok" and health["split_mode"] == "double"
    assert health["model"] == "tiny-cnn" and health["sessions"] == 0
    raw = httpx.get(f"{url}/v1/manifest")
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    assert hashlib.sha256(raw.content).hexdigest() == health["manifest_sha256"]
    assert raw.json()["cuts"][0]["name"] == "a"

    r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": "0" * 64})
    assert r.status_code == 409 and r.json()["error"] == "manifest_mismatch"
    r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": "xyz"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = httpx.post(
        f"{url}/v1/sessions", json={"manifest_sha256": health["manifest_sha256"], "x": 1}
    )
    assert r.status_code == 422 and set(r.json()) == {"error", "detail"}

    dev = Device(url)
    assert len(dev.sid) == 32 and dev.token
    assert httpx.get(f"{url}/v1/health").json()["sessions"] == 1
    other = Device(url, aux_label=True)
    assert other.sid != dev.sid and other.token != dev.token
    # deleting needs the token; afterwards the session is gone
    r = httpx.delete(f"{url}/v1/sessions/{dev.sid}", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = httpx.delete(
        f"{url}/v1/sessions/{dev.sid}", headers={"Authorization": f"Bearer {dev.token}"}
    )
    assert r.status_code == 204
    r = dev.post("forward", dev.body(ACT, A_CUT, rand((2, 8, 8, 4), 0), 0))
    assert r.status_code == 404 and r.json()["error"] == "unknown_session"
    assert httpx.get(f"{url}/v1/health").json()["sessions"] == 1
    # a route that does not exist answers in the same JSON shape
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/v1/sessions/{sid}/forward" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_session_limit(serve_app):
    app = create_app(
        None, module=double_b(), manifest=double_manifest(), max_sessions=2, device_dir=None
    )
    url = serve_app(app).url
    Device(url), Device(url)
    sha = app.state.manifest_sha256
    r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha})
    assert r.status_code == 503 and r.json()["error"] == "too_many_sessions"


# -- double split: a step, retries ---------------------------------------------------------


def test_forward_backward_matches_autograd_and_retries_are_not_applied_twice(double):
    url, app, ref = double
    dev = Device(url)
    before = snapshot(app)
    params0 = {k: v.detach().clone() for k, v in ref.named_parameters()}

    a = rand((5, 8, 8, 4), 1)
    fwd = dev.body(ACT, A_CUT, a, 0)
    (b_frame,), r = dev.ok("forward", fwd)
    assert b_frame.kind == ACT and b_frame.name == "b" and b_frame.layout == "NHWC"
    assert b_frame.session == dev.sidb and b_frame.step == 0
    assert (
        float(r.headers["X-Spliteasy-Server-Ms"]) >= 0 and r.headers["X-Spliteasy-Replayed"] == "0"
    )

    # independent autograd on a copy of B, plain NCHW tensors
    x = nhwc_to_torch(a).requires_grad_(True)
    out = ref(x)
    _close(b_frame.array, out.permute(0, 2, 3, 1))

    # the retry of the forward: same bytes, B untouched (BN statistics not moved twice)
    mid = snapshot(app)
    assert mid != before  # the forward itself moved BN's running statistics
    r2 = dev.post("forward", fwd)
    assert (
        r2.status_code == 200
        and r2.content == r.content
        and r2.headers["X-Spliteasy-Replayed"] == "1"
    )
    assert snapshot(app) == mid

    g = rand((5, 4, 4, 8), 2, scale=0.1)
    bwd = dev.body(GRAD, B_CUT, g, 0)
    (ga_frame,), r = dev.ok("backward", bwd)
    assert ga_frame.kind == GRAD and ga_frame.name == "a" and ga_frame.step == 0
    out.backward(nhwc_to_torch(g))
    _close(ga_frame.array, x.grad.permute(0, 2, 3, 1))

    # Keras SGD with momentum 0.9 from zero velocity: w1 = w0 - lr * grad
    trained = dict(app.state.trainer.module.named_parameters())
    for k, p0 in params0.items():
        grad = dict(ref.named_parameters())[k].grad
        _close(trained[k].detach().numpy(), p0 - 0.1 * grad)
        assert not torch.equal(trained[k].detach(), p0)
    # the running statistics are Keras' own: a tf_keras BatchNormalization (momentum 0.99,
    # epsilon 1e-3, fused 4-D path) stepped in training mode on the same conv output
    keras_bn = _keras_bn_after_one_step(ref[0](x).detach(), momentum=0.99, epsilon=1e-3)
    state = app.state.trainer.module.state_dict()
    _close(state["1.running_mean"].numpy(), keras_bn["moving_mean"])
    _close(state["1.running_var"].numpy(), keras_bn["moving_variance"])
    assert not np.allclose(keras_bn["moving_variance"], 1.0)  # it moved: not vacuous

    after = snapshot(app)
    r2 = dev.post("backward", bwd)
    assert (
        r2.status_code == 200
        and r2.content == r.content
        and r2.headers["X-Spliteasy-Replayed"] == "1"
    )
    assert snapshot(app) == after
    # a late retry of the forward is still answered from the store
    r3 = dev.post("forward", fwd)
    assert r3.status_code == 200 and r3.headers["X-Spliteasy-Replayed"] == "1"
    assert snapshot(app) == after
    assert httpx.get(f"{url}/v1/health").json()["steps"] == 1

    # the next step proceeds; a retry with a different body is a conflict
    dev.ok("forward", dev.body(ACT, A_CUT, rand((5, 8, 8, 4), 3), 1))
    r = dev.post("backward", dev.body(GRAD, B_CUT, rand((5, 4, 4, 8), 4), 0))
    assert r.status_code == 409 and r.json()["error"] == "step_conflict"
    dev.ok("backward", dev.body(GRAD, B_CUT, rand((5, 4, 4, 8), 4), 1))
    assert session_state(app, dev.sid)[:2] == (2, "forward")


def _keras_bn_after_one_step(h_nchw: torch.Tensor, momentum: float, epsilon: float) -> dict:
    """tf_keras' BatchNormalization moving statistics after one training call on ``h``."""
    import tf_keras as keras

    h = h_nchw.permute(0, 2, 3, 1).numpy()
    layer = keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon)
    layer(h, training=True)
    return {
        "moving_mean": layer.moving_mean.numpy(),
        "moving_variance": layer.moving_variance.numpy(),
    }


def _corrupt(body: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(body)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_malformed_requests_are_rejected_without_touching_b(double):
    url, app, _ = double
    dev = Device(url)
    other = Device(url)
    # one complete step first, so the optimizer has state that must not move either
    dev.ok("forward", dev.body(ACT, A_CUT, rand((3, 8, 8, 4), 0), 0))
    dev.ok("backward", dev.body(GRAD, B_CUT, rand((3, 4, 4, 8), 1), 0))

    a = rand((3, 8, 8, 4), 2)
    good = dev.body(ACT, A_CUT, a, 1)
    nan = a.copy()
    nan[0, 1, 2, 3] = np.nan
    inf = a.copy()
    inf[2, 0, 0, 0] = np.inf
    forward_cases = {
        "bad magic": (b"XXXX" + good[4:], 400, "bad_magic"),
        "truncated": (good[:-10], 400, "truncated_frame"),
        "header only": (good[:20], 400, "truncated_frame"),
        "empty": (b"", 400, "truncated_frame"),
        "byte count": (_corrupt(good, 36, "<Q", a.nbytes - 4), 400, "frame_size_mismatch"),
        "trailing bytes": (good + b"\x00" * 7, 400, "bad_magic"),
        "version": (_corrupt(good, 4, "<B", 2), 400, "unsupported_version"),
        "shape": (dev.body(ACT, A_CUT, rand((3, 8, 8, 5), 2), 1), 422, "frame_spec_mismatch"),
        "rank": (dev.body(ACT, A_CUT, rand((3, 8, 8), 2), 1), 422, "frame_spec_mismatch"),
        "dtype": (dev.body(ACT, A_CUT, a.astype(np.float16), 1), 422, "frame_spec_mismatch"),
        "name": (dev.body(ACT, A_CUT, a, 1, name="z"), 422, "frame_spec_mismatch"),
        "layout": (dev.body(ACT, A_CUT, a, 1, layout="NCHW"), 422, "frame_spec_mismatch"),
        "kind": (dev.body(GRAD, A_CUT, a, 1), 422, "frame_spec_mismatch"),
        "NaN": (dev.body(ACT, A_CUT, nan, 1), 422, "non_finite"),
        "Inf": (dev.body(ACT, A_CUT, inf, 1), 422, "non_finite"),
        "step ahead": (dev.body(ACT, A_CUT, a, 5), 409, "step_conflict"),
        "two frames": (good + good, 400, "bad_request"),
        "frame of another session": (
            dev.body(ACT, A_CUT, a, 1, session=other.sidb),
            400,
            "bad_request",
        ),
    }
    state0, sess0 = snapshot(app), session_state(app, dev.sid)

    def rejected(r: httpx.Response, status: int, code: str, what: str) -> None:
        assert r.status_code == status, (what, r.status_code, r.text)
        body = r.json()
        extra = {"next_step", "expect", "durable_step"} if code == "step_conflict" else set()
        assert set(body) == {"error", "detail"} | extra and body["error"] == code, (what, body)
        assert body["detail"], what
        assert snapshot(app) == state0, what
        assert session_state(app, dev.sid) == sess0, what

    for what, (body, status, code) in forward_cases.items():
        rejected(dev.post("forward", body), status, code, what)
    rejected(dev.post("forward", good, token="wrong"), 403, "forbidden", "token")
    rejected(dev.post("forward", good, token=None), 401, "unauthorized", "no token")
    rejected(dev.post("forward", good, sid="0" * 32), 404, "unknown_session", "session")
    rejected(dev.post("forward", good, sid="not-hex"), 404, "unknown_session", "session id")
    rejected(
        dev.post("forward", good, content_type="application/octet-stream"),
        415,
        "unsupported_media_type",
        "type",
    )
    rejected(dev.post("forward", good, content_type=""), 415, "unsupported_media_type", "no type")
    big = dev.body(ACT, A_CUT, rand((app.state.max_body_bytes // a[0].nbytes + 1, 8, 8, 4), 5), 1)
    rejected(dev.post("forward", big), 413, "body_too_large", "too large")
    rejected(
        dev.post("backward", dev.body(GRAD, B_CUT, rand((3, 4, 4, 8), 1), 1)),
        409,
        "step_conflict",
        "backward first",
    )
    rejected(dev.post("step", good), 404, "wrong_split_mode", "single-split route")

    # with a forward pending, bad backwards are rejected and leave the pending step intact
    dev.ok("forward", good)
    state0, sess0 = snapshot(app), session_state(app, dev.sid)
    g = rand((3, 4, 4, 8), 6, scale=0.1)
    g_nan = g.copy()
    g_nan[1, 1, 1, 1] = np.nan
    backward_cases = {
        "batch differs from the forward": (
            dev.body(GRAD, B_CUT, g[:2], 1),
            422,
            "frame_spec_mismatch",
        ),
        "TARGET without aux_label": (dev.body(TARGET, B_CUT, g, 1), 422, "frame_spec_mismatch"),
        "cut of the forward": (dev.body(GRAD, A_CUT, a, 1), 422, "frame_spec_mismatch"),
        "NaN": (dev.body(GRAD, B_CUT, g_nan, 1), 422, "non_finite"),
        "wrong step": (dev.body(GRAD, B_CUT, g, 2), 409, "step_conflict"),
        "truncated": (dev.body(GRAD, B_CUT, g, 1)[:-1], 400, "truncated_frame"),
    }
    for what, (body, status, code) in backward_cases.items():
        rejected(dev.post("backward", body), status, code, what)
    rejected(
        dev.post("forward", dev.body(ACT, A_CUT, a + 1, 1)), 409, "step_conflict", "another forward"
    )
    rejected(
        dev.post("backward", dev.body(GRAD, B_CUT, g, 1), token="x"), 403, "forbidden", "token"
    )
    # and the session is still exactly where it was: the real backward goes through
    dev.ok("backward", dev.body(GRAD, B_CUT, g, 1))
    assert session_state(app, dev.sid)[:2] == (2, "forward")


def test_infer_changes_nothing(double):
    url, app, ref = double
    dev = Device(url)
    dev.ok("forward", dev.body(ACT, A_CUT, rand((4, 8, 8, 4), 0), 0))
    dev.ok("backward", dev.body(GRAD, B_CUT, rand((4, 4, 4, 8), 1, 0.1), 0))
    state = snapshot(app)
    a = rand((6, 8, 8, 4), 2)
    (out,), r = dev.ok("infer", dev.body(ACT, A_CUT, a, 123))
    assert out.name == "b" and out.step == 123 and out.array.shape == (6, 4, 4, 8)
    assert snapshot(app) == state and app.state.trainer.module.training
    trained = clone(app.state.trainer.module).eval()
    with torch.no_grad():
        _close(out.array, trained(nhwc_to_torch(a)).permute(0, 2, 3, 1))
    # inference mode really is different from training mode here (BN running statistics)
    with torch.no_grad():
        assert not np.allclose(
            out.array, trained.train()(nhwc_to_torch(a)).permute(0, 2, 3, 1).numpy()
        )
    # infer in the middle of a step leaves the pending forward usable
    dev.ok("forward", dev.body(ACT, A_CUT, a, 1))
    dev.ok("infer", dev.body(ACT, A_CUT, a, 0))
    dev.ok("backward", dev.body(GRAD, B_CUT, rand((6, 4, 4, 8), 3, 0.1), 1))


# -- aux-label form ----------------------------------------------------------------------------


def test_aux_label_gives_the_same_update_as_the_gradient(serve_app):
    module = double_b(seed=7)
    plain_app = create_app(None, module=module, manifest=double_manifest(), device_dir=None)
    aux_app = create_app(None, module=clone(module), manifest=double_manifest(), device_dir=None)
    plain = Device(serve_app(plain_app).url)
    aux = Device(serve_app(aux_app).url, aux_label=True)
    for step in range(3):
        a = rand((4, 8, 8, 4), 10 + step)
        (b1,), _ = plain.ok("forward", plain.body(ACT, A_CUT, a, step))
        (b2,), _ = aux.ok("forward", aux.body(ACT, A_CUT, a, step))
        if step == 0:  # same B, same input; later steps differ by float32 rounding of c - c_hat
            np.testing.assert_array_equal(b1.array, b2.array)
        np.testing.assert_allclose(b1.array, b2.array, rtol=1e-4, atol=1e-5)
        g = rand(b1.array.shape, 20 + step, scale=0.05)
        (ga,), _ = plain.ok("backward", plain.body(GRAD, B_CUT, g, step))
        (a_hat,), _ = aux.ok("backward", aux.body(TARGET, B_CUT, b2.array - g, step))
        assert a_hat.kind == TARGET and ga.kind == GRAD
        np.testing.assert_allclose(a - a_hat.array, ga.array, rtol=1e-3, atol=1e-6)
        r = aux.post("backward", aux.body(GRAD, B_CUT, g, step + 1))
        assert r.status_code == 409 or r.status_code == 422
    p1 = dict(plain_app.state.trainer.module.named_parameters())
    for k, p2 in aux_app.state.trainer.module.named_parameters():
        np.testing.assert_allclose(
            p1[k].detach().numpy(), p2.detach().numpy(), rtol=1e-4, atol=1e-6
        )


# -- several devices take turns on B ---------------------------------------------------------


def test_devices_take_turns_on_b_in_arrival_order(double):
    url, app, ref = double
    d1, d2, d3 = Device(url), Device(url), Device(url)
    a1, a2, a3 = rand((2, 8, 8, 4), 1), rand((2, 8, 8, 4), 2), rand((2, 8, 8, 4), 3)
    g = rand((2, 4, 4, 8), 4, 0.5)
    d1.ok("forward", d1.body(ACT, A_CUT, a1, 0))

    def later(dev: Device, a: np.ndarray, step: int = 0) -> tuple[threading.Thread, dict]:
        got: dict = {}
        body = dev.body(ACT, A_CUT, a, step)
        t = threading.Thread(target=lambda: got.update(r=dev.post("forward", body)), daemon=True)
        t.start()
        t.join(0.3)
        assert t.is_alive(), "a forward must wait while another device holds B"
        return t, got

    t2, got2 = later(d2, a2)
    t3, got3 = later(d3, a3)
    d1.ok("backward", d1.body(GRAD, B_CUT, g, 0))
    t2.join(30)
    assert got2["r"].status_code == 200
    t3.join(0.3)
    assert t3.is_alive(), "d3 queued after d2, so it waits for d2's backward"
    # d1 comes back for its next step: it queues behind d3
    t1, got1 = later(d1, a1 + 1, step=1)
    d2.ok("backward", d2.body(GRAD, B_CUT, g, 0))
    t3.join(30)
    assert got3["r"].status_code == 200 and t1.is_alive()
    d3.ok("backward", d3.body(GRAD, B_CUT, g, 0))
    t1.join(30)
    assert got1["r"].status_code == 200
    d1.ok("backward", d1.body(GRAD, B_CUT, g, 1))
    assert httpx.get(f"{url}/v1/health").json()["steps"] == 4

    # d2 was served by B after d1's update: compare with plain torch
    x = nhwc_to_torch(a1).requires_grad_(True)
    ref(x).backward(nhwc_to_torch(g))
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
        expect = ref(nhwc_to_torch(a2)).permute(0, 2, 3, 1).numpy()
    _close(decode(bytearray(got2["r"].content))[0].array, expect)


def test_a_vanished_device_loses_its_turn(serve_app):
    app = create_app(
        None, module=double_b(), manifest=double_manifest(), lease_timeout=0.2, device_dir=None
    )
    url = serve_app(app).url
    d1, d2 = Device(url), Device(url)
    a = rand((2, 8, 8, 4), 1)
    g = rand((2, 4, 4, 8), 2, 0.1)
    d1.ok("forward", d1.body(ACT, A_CUT, a, 0))
    d2.ok("forward", d2.body(ACT, A_CUT, a, 0))  # waits out d1's lease, then takes B
    state = snapshot(app)
    r = d1.post("backward", d1.body(GRAD, B_CUT, g, 0))
    assert r.status_code == 409 and r.json()["error"] == "stale_forward"
    assert snapshot(app) == state
    d2.ok("backward", d2.body(GRAD, B_CUT, g, 0))
    d1.ok("forward", d1.body(ACT, A_CUT, a, 0))  # d1 redoes its step 0
    d1.ok("backward", d1.body(GRAD, B_CUT, g, 0))
    assert httpx.get(f"{url}/v1/health").json()["steps"] == 2


# -- single split ------------------------------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
def test_single_split_step_matches_torch(serve_app, from_logits):
    module = single_b(probabilities=not from_logits)
    ref = clone(module)
    app = create_app(None, module=module, manifest=single_manifest(from_logits), device_dir=None)
    dev = Device(serve_app(app).url)
    a = rand((6, 8, 8, 4), 1)
    y = np.array([0, 3, 9, 3, 1, 7], dtype=np.int32)
    body = encode([dev.frame(ACT, A_CUT, a, 0), dev.frame(LAB, LABELS, y, 0)])
    frames, r = dev.ok("step", body)
    ga, loss = frames
    assert (
        ga.kind == GRAD and ga.name == "a" and loss.kind == FrameKind.SCALAR and loss.name == "loss"
    )

    x = nhwc_to_torch(a).requires_grad_(True)
    out = ref(x)
    yt = torch.tensor(y, dtype=torch.long)
    if from_logits:
        ref_loss = F.cross_entropy(out, yt)
    else:  # Keras: normalise, clip to [1e-7, 1 - 1e-7], mean negative log-likelihood
        p = (out / out.sum(-1, keepdim=True)).clamp(1e-7, 1 - 1e-7)
        ref_loss = -torch.log(p[torch.arange(6), yt]).mean()
    ref_loss.backward()
    assert float(loss.array) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    _close(ga.array, x.grad.permute(0, 2, 3, 1))

    # retry: same bytes, no second update; labels frame first is accepted too
    state = snapshot(app)
    r2 = dev.post("step", body)
    assert r2.content == r.content and r2.headers["X-Spliteasy-Replayed"] == "1"
    assert snapshot(app) == state
    swapped = encode([dev.frame(LAB, LABELS, y, 1), dev.frame(ACT, A_CUT, a, 1)])
    dev.ok("step", swapped)
    assert snapshot(app) != state


def test_single_split_rejects_bad_labels_and_double_routes(serve_app):
    app = create_app(None, module=single_b(), manifest=single_manifest(), device_dir=None)
    dev = Device(serve_app(app).url)
    a = rand((4, 8, 8, 4), 1)
    y = np.array([0, 1, 2, 3], dtype=np.int32)
    state, sess = snapshot(app), session_state(app, dev.sid)
    cases = {
        "label too big": ([dev.frame(ACT, A_CUT, a, 0), dev.frame(LAB, LABELS, y + 7, 0)], 422, "label_out_of_range"),
        "negative label": ([dev.frame(ACT, A_CUT, a, 0), dev.frame(LAB, LABELS, y - 1, 0)], 422, "label_out_of_range"),
        "label count": ([dev.frame(ACT, A_CUT, a, 0), dev.frame(LAB, LABELS, y[:3], 0)], 422, "frame_spec_mismatch"),
        "int64 labels": ([dev.frame(ACT, A_CUT, a, 0), dev.frame(LAB, LABELS, y.astype(np.int64), 0)], 422, "frame_spec_mismatch"),
        "no labels": ([dev.frame(ACT, A_CUT, a, 0)], 400, "bad_request"),
        "steps differ": ([dev.frame(ACT, A_CUT, a, 0), dev.frame(LAB, LABELS, y, 1)], 400, "bad_request"),
        "scalar instead of labels": ([dev.frame(ACT, A_CUT, a, 0), scalar("y", 1.0, dev.sidb, 0)], 422, "frame_spec_mismatch"),
        "wrong step": ([dev.frame(ACT, A_CUT, a, 3), dev.frame(LAB, LABELS, y, 3)], 409, "step_conflict"),
    }  # fmt: skip
    for what, (frames, status, code) in cases.items():
        r = dev.post("step", encode(frames))
        assert (r.status_code, r.json()["error"]) == (status, code), (what, r.text)
        assert snapshot(app) == state and session_state(app, dev.sid) == sess, what
    r = dev.post("forward", dev.body(ACT, A_CUT, a, 0))
    assert r.status_code == 404 and r.json()["error"] == "wrong_split_mode"
    (out,), _ = dev.ok("infer", dev.body(ACT, A_CUT, a, 0))
    assert out.name == "logits" and out.layout == "NC" and out.array.shape == (4, 10)


def test_single_split_aux_label_replies_a_target(serve_app):
    module = single_b(seed=3)
    apps = [
        create_app(None, module=m, manifest=single_manifest(), device_dir=None)
        for m in (module, clone(module))
    ]
    plain, aux = Device(serve_app(apps[0]).url), Device(serve_app(apps[1]).url, aux_label=True)
    a = rand((4, 8, 8, 4), 1)
    y = np.array([1, 2, 3, 4], dtype=np.int32)
    (ga, l1), _ = plain.ok(
        "step", encode([plain.frame(ACT, A_CUT, a, 0), plain.frame(LAB, LABELS, y, 0)])
    )
    (a_hat, l2), _ = aux.ok(
        "step", encode([aux.frame(ACT, A_CUT, a, 0), aux.frame(LAB, LABELS, y, 0)])
    )
    assert a_hat.kind == TARGET and float(l1.array) == float(l2.array)
    np.testing.assert_allclose(a - a_hat.array, ga.array, rtol=1e-3, atol=1e-7)


# -- bundle files and the device page ------------------------------------------------------------


def test_bundle_files_and_device_page(serve_app, tmp_path):
    bundle, manifest = write_bundle(tmp_path / "bundle")
    web = tmp_path / "js"
    (web / "web").mkdir(parents=True)
    (web / "web" / "index.html").write_text("<html>device</html>")
    (web / "src").mkdir()
    (web / "src" / "loop.mjs").write_text("export const x = 1;")
    app = create_app(bundle, module=double_b(), manifest=manifest, device_dir=web)
    url = serve_app(app).url
    raw = httpx.get(f"{url}/v1/manifest").content
    assert raw == (bundle / "manifest.json").read_bytes()
    assert app.state.manifest_sha256 == hashlib.sha256(raw).hexdigest()

    r = httpx.get(f"{url}/v1/bundle/A/model.json")
    assert r.status_code == 200 and r.json() == {"format": "layers-model"}
    assert httpx.get(f"{url}/v1/bundle/A/group1-shard1of1.bin").content == b"\x00\x01\x02\x03"
    for path, status in [
        ("B.safetensors", 404),  # B's weights stay on the server
        ("notes.txt", 404),  # not an artefact
        ("manifest.json", 404),  # served at /v1/manifest
        ("A/missing.json", 404),
        ("A", 404),
        ("%2E%2E/bundle/A/model.json", 400),
        ("A/%2E%2E/B.safetensors", 400),
        ("%2Fetc%2Fpasswd", 400),
    ]:
        r = httpx.get(f"{url}/v1/bundle/{path}")
        assert r.status_code == status, (path, r.text)
        assert "error" in r.json()

    r = httpx.get(f"{url}/device", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/device/web/"
    r = httpx.get(f"{url}/device", follow_redirects=True)
    assert r.status_code == 200 and "device" in r.text
    r = httpx.get(f"{url}/device/src/loop.mjs")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]


def test_body_limit_holds_without_content_length(serve_app):
    app = create_app(
        None, module=double_b(), manifest=double_manifest(), max_body_bytes=4096, device_dir=None
    )
    dev = Device(serve_app(app).url)
    state = snapshot(app)
    body = dev.body(ACT, A_CUT, rand((4, 8, 8, 4), 0), 0)  # 4 KiB of payload + header
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    r = dev.http.post(
        f"/v1/sessions/{dev.sid}/forward",
        content=iter(chunks),  # chunked transfer: the server counts as it reads
        headers={"Content-Type": MEDIA_TYPE, "Authorization": f"Bearer {dev.token}"},
    )
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    assert snapshot(app) == state
    dev.ok("forward", dev.body(ACT, A_CUT, rand((2, 8, 8, 4), 0), 0))


def test_content_type_with_parameters_is_accepted(double):
    url, app, _ = double
    dev = Device(url)
    r = dev.post(
        "forward", dev.body(ACT, A_CUT, rand((1, 8, 8, 4), 0), 0), content_type=f"{MEDIA_TYPE}; v=1"
    )
    assert r.status_code == 200
