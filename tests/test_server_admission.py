"""Issue #8: admission (enrolment keys, rate limits, idle eviction), TLS with a verifying
device, connection limits, the exposure refusal of ``spliteasy serve``, and /metrics."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server_helpers import A_CUT, B_CUT, double_b, double_manifest, rand, write_bundle

from device_tf._exceptions import ServerRejected, ServerUnreachable
from device_tf.transport import HttpTransport
from server_torch.app import create_app
from server_torch.guard import load_auth_keys
from shared_schema import Frame, FrameKind, decode, encode

KEY = "k3y-for-the-lab-devices-0123456789"
ACT, GRAD = FrameKind.ACTIVATION, FrameKind.GRADIENT


def _app(**kwargs):
    return create_app(
        None, module=double_b(), manifest=double_manifest(), device_dir=None, **kwargs
    )


def _steps(transport: HttpTransport, n: int) -> None:
    """n double-split steps through the Python device's transport (real frames)."""
    sidb = bytes.fromhex(transport.session.session_id)
    for step in range(n):
        a = encode([Frame(ACT, A_CUT.name, rand((2, 8, 8, 4), step), A_CUT.layout, sidb, step)])
        (out,) = decode(bytearray(transport.exchange("forward", a).body))
        assert out.array.shape == (2, 4, 4, 8)
        g = encode(
            [Frame(GRAD, B_CUT.name, rand((2, 4, 4, 8), step, 1e-2), B_CUT.layout, sidb, step)]
        )
        (ga,) = decode(bytearray(transport.exchange("backward", g).body))
        assert np.isfinite(ga.array).all()


# -- enrolment keys ---------------------------------------------------------------------


def test_auth_keys_file_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# lab devices\nlab {KEY}\nanother-key-without-a-name-0000\n")
    keys = load_auth_keys(f, env="env-key-0123456789abcdef")
    assert sorted(keys.values()) == ["env1", "lab", "line3"]
    assert KEY not in str(keys)  # only hashes are kept
    assert load_auth_keys(None, env="") is None
    f.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        load_auth_keys(f, env="")


def test_session_creation_needs_an_enrolment_key(serve_app):
    app = _app(auth_keys=load_auth_keys(None, env=KEY))
    url = serve_app(app).url
    sha = app.state.manifest_sha256
    r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha})
    assert r.status_code == 401 and r.json()["error"] == "key_required"
    r = httpx.post(
        f"{url}/v1/sessions",
        json={"manifest_sha256": sha},
        headers={"Authorization": "Bearer not-the-key-at-all-000"},
    )
    assert r.status_code == 401 and r.json()["error"] == "key_required"
    assert httpx.get(f"{url}/v1/health").json()["sessions"] == 0
    # the Python device sends its key; the session's own token then works as before
    with pytest.raises(ServerRejected) as info:
        HttpTransport(url).open_session(sha)
    assert info.value.status == 401
    dev = HttpTransport(url, auth_key=KEY)
    dev.open_session(sha)
    _steps(dev, 2)
    dev.close()


def test_rate_limits_per_key_and_per_address(serve_app):
    app = _app(auth_keys=load_auth_keys(None, env=KEY), session_rate=3)
    url = serve_app(app).url
    sha = app.state.manifest_sha256
    auth = {"Authorization": f"Bearer {KEY}"}
    codes = [
        httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha}, headers=auth).status_code
        for _ in range(4)
    ]
    assert codes == [201, 201, 201, 429]
    r = httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha}, headers=auth)
    assert r.json()["error"] == "rate_limited" and int(r.headers["retry-after"]) >= 1

    open_app = _app(session_rate=2)  # no keys: the per-address limit still holds
    url2 = serve_app(open_app).url
    sha2 = open_app.state.manifest_sha256
    codes = [
        httpx.post(f"{url2}/v1/sessions", json={"manifest_sha256": sha2}).status_code
        for _ in range(3)
    ]
    assert codes == [201, 201, 429]


def test_idle_sessions_are_evicted_on_schedule(serve_app):
    app = _app(idle_timeout=0.5, evict_every=0.2)
    url = serve_app(app).url
    sha = app.state.manifest_sha256
    for _ in range(3):
        assert httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": sha}).status_code == 201
    assert httpx.get(f"{url}/v1/health").json()["sessions"] == 3
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and app.state.service.session_count:
        time.sleep(0.1)
    assert app.state.service.session_count == 0  # without the table ever filling up
    assert "spliteasy_sessions_evicted_total 3.0" in httpx.get(f"{url}/metrics").text


def test_sessions_restored_from_a_checkpoint_stay_valid_with_keys(tmp_path, serve_app):
    keys = load_auth_keys(None, env=KEY)
    state = tmp_path / "state"
    first = create_app(
        None, module=double_b(), manifest=double_manifest(), device_dir=None,
        state_dir=state, auth_keys=keys,
    )  # fmt: skip
    srv = serve_app(first)
    dev = HttpTransport(srv.url, auth_key=KEY)
    info = dev.open_session(first.state.manifest_sha256)
    _steps(dev, 1)
    srv.stop()
    second = create_app(
        None, module=double_b(), manifest=double_manifest(), device_dir=None,
        state_dir=state, auth_keys=keys,
    )  # fmt: skip
    url = serve_app(second).url
    back = HttpTransport(url)  # no key needed: the session's token is its credential
    resumed = back.resume_session(info.session_id, info.token)
    assert resumed.next_step == 1
    sidb = bytes.fromhex(info.session_id)
    a = encode([Frame(ACT, A_CUT.name, rand((2, 8, 8, 4), 7), A_CUT.layout, sidb, 1)])
    assert back.exchange("forward", a).body


# -- TLS ----------------------------------------------------------------------------------


def _make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1/localhost signed by it (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=spliteasy test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"


def test_training_over_tls_with_a_verifying_device(tmp_path, serve_app):
    ca, cert, key = _make_ca_and_cert(tmp_path)
    app = _app(auth_keys=load_auth_keys(None, env=KEY))
    srv = serve_app(app, ssl_certfile=str(cert), ssl_keyfile=str(key))
    assert srv.url.startswith("https://127.0.0.1:")
    sha = app.state.manifest_sha256
    dev = HttpTransport(srv.url, auth_key=KEY, ca_file=str(ca))
    dev.open_session(sha)
    _steps(dev, 3)
    assert app.state.trainer.steps == 3
    dev.close()
    # without the CA the device refuses the server's certificate (no silent fallback)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{srv.url}/v1/health")
    untrusting = HttpTransport(srv.url, auth_key=KEY)  # at once, not after --reconnect-timeout
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="not trusted.*--ca-file"):
        untrusting.open_session(sha)
    assert time.monotonic() - t0 < 10
    # and plain http to the TLS port gets nothing
    with pytest.raises(httpx.HTTPError):
        httpx.get(srv.url.replace("https", "http") + "/v1/health", timeout=2)


# -- connection limits --------------------------------------------------------------------


def test_header_timeout_closes_a_slowloris_connection(serve_app):
    app = _app()
    url = serve_app(app, header_timeout=0.5).url
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        t0 = time.monotonic()
        for _ in range(20):
            time.sleep(0.1)
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        assert s.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
    with socket.create_connection((host, int(port)), timeout=5) as s:  # silent from the start
        assert s.recv(100) == b""
    assert httpx.get(f"{url}/v1/health").status_code == 200


def test_serve_refuses_beyond_loopback_without_tls_and_keys(tmp_path):
    bundle, _ = write_bundle(tmp_path / "bundle")
    cmd = [sys.executable, "-m", "spliteasy_cli.main", "serve", str(bundle), "--no-state",
           "--host", "0.0.0.0", "--port", "0"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--insecure" in r.stdout + r.stderr and "TLS" in r.stdout + r.stderr


def test_metrics_in_prometheus_format(serve_app):
    app = _app()
    url = serve_app(app).url
    sha = app.state.manifest_sha256
    dev = HttpTransport(url)
    dev.open_session(sha)
    _steps(dev, 2)
    httpx.post(f"{url}/v1/sessions", json={"manifest_sha256": "0" * 64})
    text = httpx.get(f"{url}/metrics").text
    for line in (
        "spliteasy_steps 2.0",
        'spliteasy_rejections_total{code="manifest_mismatch"} 1.0',
        "spliteasy_queue_depth 0.0",
        'spliteasy_b_compute_seconds_count{op="backward"} 2.0',
        'spliteasy_requests_total{method="POST",route="/v1/sessions/{sid}/forward",status="200"} 2.0',
        "spliteasy_lease_wait_seconds_bucket",
    ):
        assert line in text, line


# -- the TF.js device (Node): Retry-After, enrolment key, TLS verification ------------------

JS_SRC = Path(__file__).resolve().parents[1] / "device_tf" / "js" / "src" / "transport.mjs"


def _node(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    if shutil.which("node") is None:
        pytest.skip("node not installed")
    import os

    return subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_js_device_honours_retry_after_and_sends_its_key():
    """A stub server: 503 busy with Retry-After: 1, then 429 rate_limited with Retry-After: 1,
    then 201. The JS transport waits as told and sends the enrolment key."""
    import http.server
    import json as _json
    import threading

    seen: list[tuple[float, str | None]] = []

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((time.monotonic(), self.headers.get("Authorization")))
            status, body = [
                (503, {"error": "busy", "detail": "wait"}),
                (429, {"error": "rate_limited", "detail": "wait"}),
                (201, {"session_id": "ab" * 16, "token": "t", "next_step": 0, "durable_step": 0}),
            ][min(len(seen) - 1, 2)]
            raw = _json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            if status != 201:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        r = _node(
            f"import {{ HttpTransport }} from '{JS_SRC.as_uri()}';\n"
            f"const t = new HttpTransport('{url}', {{ authKey: '{KEY}' }});\n"
            "const s = await t.openSession({ manifestSha256: '0'.repeat(64) });\n"
            "console.log(s.sessionId);"
        )
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr
    assert len(seen) == 3 and all(auth == f"Bearer {KEY}" for _, auth in seen)
    assert seen[1][0] - seen[0][0] >= 0.95 and seen[2][0] - seen[1][0] >= 0.95  # as told


def test_js_device_verifies_the_servers_certificate(tmp_path, serve_app):
    ca, cert, key = _make_ca_and_cert(tmp_path)
    app = _app()
    srv = serve_app(app, ssl_certfile=str(cert), ssl_keyfile=str(key))
    script = (
        f"import {{ HttpTransport }} from '{JS_SRC.as_uri()}';\n"
        f"const t = new HttpTransport('{srv.url}');\n"
        "const h = await t.getJson('/v1/health');\n"
        "console.log(h.status);"
    )
    trusted = _node(script, {"NODE_EXTRA_CA_CERTS": str(ca)})
    assert trusted.returncode == 0 and trusted.stdout.strip() == "ok", trusted.stderr
    untrusted = _node(script, {"NODE_EXTRA_CA_CERTS": ""})
    assert untrusted.returncode != 0
    assert re.search("UNABLE_TO_VERIFY|SELF_SIGNED|CERT_", untrusted.stderr), untrusted.stderr
    assert "not trusted" in untrusted.stderr  # at once, with the hint, not as "unreachable"


def test_connection_cap_answers_503_busy_json(serve_app):
    app = _app()
    url = serve_app(app, max_connections=4).url
    host, port = url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            reply = b""
            while chunk := extra.recv(4096):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head
        assert json.loads(body)["error"] == "busy"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the slots are free again
        try:
            assert httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
            break
        except (httpx.HTTPError, AssertionError):
            time.sleep(0.1)
    else:
        raise AssertionError("health did not answer after the connections closed")
