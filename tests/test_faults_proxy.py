"""The netem fault proxy on its own: every fault happens where it says, nothing else.

A tiny stdlib HTTP/1.1 server counts the requests it *applied*, so each fault's
promise is checked from the server's side too (dropped before: not applied; dropped
after: applied, client got no reply; reset mid-request: not applied).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from netem import Fault, FaultProxy, FaultSchedule, path_matches


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers["Content-Length"])
        body = self.rfile.read(n)
        if len(body) != n:
            return
        self.server.applied.append(body)  # type: ignore[attr-defined]
        reply = body[::-1] * 3
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (reply[:7], reply[7:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[ThreadingHTTPServer]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.applied = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _post(conn: http.client.HTTPConnection, path: str, body: bytes) -> bytes:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
    return conn.getresponse().read()


def _proxy(backend: ThreadingHTTPServer, **schedule) -> FaultProxy:
    return FaultProxy(backend.server_address[:2], FaultSchedule(**schedule)).start()


@pytest.mark.parametrize("path", ["/plain", "/chunked"])
def test_passes_keep_alive_exchanges_unchanged(backend, path) -> None:
    proxy = _proxy(backend)
    try:
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        for i in range(5):  # one connection, five exchanges
            body = bytes(range(i, i + 50)) * 100
            assert _post(conn, path, body) == body[::-1] * 3
        conn.request("GET", "/nobody")
        assert conn.getresponse().status == 204
        conn.close()
    finally:
        proxy.stop()
    assert len(backend.applied) == 5
    assert proxy.counts() == {Fault.NONE: 6}


@pytest.mark.parametrize(
    ("fault", "applied"),
    [
        (Fault.DROP_BEFORE_SERVER, 0),
        (Fault.DROP_AFTER_APPLY, 1),
        (Fault.RESET_REQUEST_BODY, 0),
        (Fault.RESET_RESPONSE_BODY, 1),
    ],
)
def test_each_fault_breaks_the_exchange_where_it_says(backend, fault, applied) -> None:
    proxy = _proxy(backend, explicit={1: fault})
    try:
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        assert _post(conn, "/x", b"first") == b"tsrif" * 3
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            _post(conn, "/x", b"second" * 1000)
        conn.close()
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        assert _post(conn, "/x", b"third") == b"driht" * 3  # a new connection works again
        conn.close()
    finally:
        proxy.stop()
    assert backend.applied[0] == b"first"
    assert backend.applied[-1] == b"third"
    assert len(backend.applied) == 2 + applied
    assert [e.fault for e in proxy.events] == [Fault.NONE, fault, Fault.NONE]


def test_probabilities_are_seeded_and_selectable(backend) -> None:
    def run() -> list[Fault]:
        backend.applied.clear()
        proxy = _proxy(
            backend,
            probabilities={Fault.DROP_BEFORE_SERVER: 0.2, Fault.DROP_AFTER_APPLY: 0.2},
            seed=3,
            applies_to=path_matches(r"^/x$"),
        )
        try:
            for i in range(40):
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
                try:
                    _post(conn, "/x", str(i).encode())
                except (http.client.HTTPException, ConnectionError):
                    pass
                conn.request("GET", "/spared")  # never faulted
                try:
                    assert conn.getresponse().status == 204
                except (http.client.HTTPException, ConnectionError):
                    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
                    conn.request("GET", "/spared")
                    assert conn.getresponse().status == 204
                conn.close()
        finally:
            proxy.stop()
        faults = [e.fault for e in proxy.events if e.target == "/x"]
        before = faults.count(Fault.DROP_BEFORE_SERVER)
        assert len(backend.applied) == 40 - before
        return faults

    first = run()
    assert 3 <= first.count(Fault.DROP_BEFORE_SERVER) <= 14
    assert 3 <= first.count(Fault.DROP_AFTER_APPLY) <= 14
    assert run() == first  # same seed, same faults


def test_server_down_looks_like_a_dropped_connection(backend) -> None:
    proxy = FaultProxy(("127.0.0.1", 1)).start()  # nothing listens on port 1
    try:
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            _post(conn, "/x", b"lost")
        proxy.set_upstream(backend.server_address[:2])
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=5)
        assert _post(conn, "/x", b"found") == b"dnuof" * 3
    finally:
        proxy.stop()
