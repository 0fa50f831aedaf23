"""The WebSocket binding (issue #11): the same training as HTTP, bit for bit, and a socket
dropped mid-step reconnects without applying anything twice.

The Python device trains digits-bn (BatchNorm in A, B and C) on the cached bundle over
``/v1/sessions/{sid}/ws``; the HTTP run of the same batches from the same initial
weights must end with identical bytes in every variable of A, B and C.
"""

from __future__ import annotations

import numpy as np
import pytest

from split_helpers import ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches

MODEL = "digits-bn"


def _run(bundle, serve_app, kind: str, split: str, fault=None, n: int = 4):
    """(losses, weights by name, transport, server app) of ``n`` steps over ``kind``."""
    from device_tf.loop import SplitTrainer
    from device_tf.tf_runtime import TFRuntime
    from device_tf.ws_transport import make_transport
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest, manifest_digest

    manifest = load_manifest(bundle)
    app = create_app(bundle)
    app.state.ws_fault = fault
    srv = serve_app(app)
    runtime = TFRuntime.from_bundle(bundle)
    transport = make_transport(kind, srv.url, reconnect_timeout=20, notify=lambda _m: None)
    try:
        with SplitTrainer(runtime, transport, manifest, manifest_digest(bundle)) as trainer:
            losses = [trainer.step(x, y).loss for x, y in fixed_batches(n)]
    finally:
        transport.close()
    weights: dict[str, np.ndarray] = {}
    for held in runtime.weights().values():
        weights.update(held)
    weights.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    return losses, weights, transport, app


@pytest.mark.parametrize("split", ["double", "single"])
def test_ws_and_http_train_bit_identically(serve_app, split):
    bundle, _ = digits_bundle(None, split, SGD_CFG, ALL_RUNTIMES, MODEL)
    http_losses, http_w, _, _ = _run(bundle, serve_app, "http", split)
    ws_losses, ws_w, ws, app = _run(bundle, serve_app, "ws", split)
    assert ws.connections == 1  # one socket for the whole run
    assert app.state.trainer.steps == 4
    assert ws_losses == http_losses
    assert set(ws_w) == set(http_w)
    differ = [k for k in http_w if not np.array_equal(ws_w[k], http_w[k])]
    assert not differ, differ
    print(f"\n{split}: {len(http_w)} variables bit-identical; losses {ws_losses}")


def test_ws_dropped_mid_step_reconnects_exactly_once(serve_app):
    """The server closes the socket after B applied a message and before its reply (two
    backwards and a forward, on different steps): the device reconnects, resends, the
    retry store answers, and B's steps equal the steps sent; the weights equal a run
    without faults."""
    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    dropped: list[tuple[str, int]] = []
    seen = {"forward": 0, "backward": 0}

    def fault(op: str, rid: int) -> bool:
        seen[op] += 1
        if (op, seen[op]) in {("backward", 1), ("forward", 3), ("backward", 4)}:
            dropped.append((op, rid))
            return True
        return False

    losses, w, ws, app = _run(bundle, serve_app, "ws", "double", fault=fault)
    assert len(dropped) == 3 and ws.connections == 4
    assert app.state.trainer.steps == 4  # nothing applied twice
    ref_losses, ref_w, _, _ = _run(bundle, serve_app, "ws", "double")
    assert losses == ref_losses
    assert all(np.array_equal(w[k], ref_w[k]) for k in ref_w)


def test_ws_handshake_needs_the_token(serve_app):
    """No token / a wrong one / an unknown session: refused on the handshake with the
    protocol's JSON error, before any message."""
    import httpx
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from server_torch.app import create_app

    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    app = create_app(bundle)
    srv = serve_app(app)
    digest = app.state.manifest_sha256
    s = httpx.post(f"{srv.url}/v1/sessions", json={"manifest_sha256": digest}).json()
    url = srv.url.replace("http", "ws") + f"/v1/sessions/{s['session_id']}/ws"
    for headers, status, code in [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer nope"}, 403, "forbidden"),
    ]:
        with pytest.raises(InvalidStatus) as info:
            connect(url, additional_headers=headers)
        assert info.value.response.status_code == status
        assert code in bytes(info.value.response.body).decode()
    # the browser's way: the token as a subprotocol; a bad envelope gets a JSON error
    with connect(url, subprotocols=["spliteasy.v1", f"bearer.{s['token']}"]) as ws:
        assert ws.subprotocol == "spliteasy.v1"
        ws.send(b"\x09\x00\x00\x00\x07frames")
        err = __import__("json").loads(ws.recv(timeout=10))
        assert err["id"] == 7 and err["status"] == 400 and err["error"] == "bad_request"
        ws.send(b"\x01\x00\x00\x00\x08" + b"x" * (app.state.max_body_bytes + 1))
        err = __import__("json").loads(ws.recv(timeout=10))
        assert err["id"] == 8 and err["status"] == 413 and err["error"] == "body_too_large"
    # each message counts in the request metrics, as an HTTP request does
    metrics = httpx.get(f"{srv.url}/metrics").text
    assert 'method="WS"' in metrics and 'status="413"' in metrics


def test_one_retry_policy_for_both_transports():
    """HTTP and WebSocket wait by the same rule (device_tf/retry.py): the first retry at
    once, then backoff doubling to its cap, never sooner than the server's Retry-After, one
    line when the server is lost and one when it is back; against a closed port both give
    up after ``reconnect_timeout`` with the same message."""
    from device_tf._exceptions import ServerUnreachable
    from device_tf.retry import Patience, Retry
    from device_tf.transport import HttpTransport
    from device_tf.ws_transport import WsTransport

    slept: list[float] = []
    lines: list[str] = []
    p = Patience(60.0, (0.1, 0.4), notify=lines.append, sleep=slept.append)
    fails = iter([Retry("reset"), Retry("reset"), Retry("503 busy", 2.0), Retry("reset")] * 2)

    def attempt() -> str:
        if len(slept) < 6:
            raise next(fails)
        return "ok"

    assert p.run(attempt, label="http://b", target="http://b/x") == "ok"
    assert slept == [0.0, 0.1, 2.0, 0.4, 0.4, 0.4]
    assert len(lines) == 2 and "unreachable (reset)" in lines[0] and "is back" in lines[1]

    for cls in (HttpTransport, WsTransport):
        lines.clear()
        t = cls(
            "http://127.0.0.1:9", reconnect_timeout=0.5, backoff=(0.05, 0.1), notify=lines.append
        )
        t.session = __import__("device_tf.transport", fromlist=["SessionInfo"]).SessionInfo(
            "ab" * 16, "token"
        )
        with pytest.raises(ServerUnreachable, match="no answer for .* Restart the same command"):
            t.exchange("forward", b"frames")
        t.close()
        assert len(lines) == 1 and "unreachable" in lines[0], (cls, lines)
