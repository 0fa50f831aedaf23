"""Running the app under uvicorn: in the foreground (the CLI), in a thread (tests,
benchmarks, the demo) or as a ``spliteasy serve`` child process.

The listening socket is bound *before* uvicorn starts, so port 0 works (the OS picks a
free port and we know it at once, with no race between choosing and binding) and the
URL printed or returned is the one that is already accepting connections.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared_schema import SpliteasyError


class ServeError(SpliteasyError):
    """The server could not be started (port taken, child died, never became healthy)."""


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def is_loopback(host: str) -> bool:
    """``host`` (as given to --host) only listens on this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Per-connection limits (``spliteasy serve`` flags): h11 is uvicorn's HTTP parser here.
DEFAULT_LIMITS: dict[str, Any] = {
    "timeout_keep_alive": 15,  # an idle keep-alive connection is closed after this many s
    "h11_max_incomplete_event_size": 16 * 1024,  # request line + headers, bytes
    "timeout_graceful_shutdown": 5,  # then open requests (waiting for B) are cancelled
    "proxy_headers": False,  # X-Forwarded-For would let any client pick its per-IP limit
}
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 512
_FULL = (
    b'{"error":"busy","detail":"the server has as many connections open as it takes; '
    b'retry shortly"}'
)
_FULL_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
) % (len(_FULL), _FULL)


def _guarded_h11(header_timeout: float, max_connections: int | None) -> type:
    """uvicorn's h11 protocol with a header timeout and a connection cap.

    A connection must complete its request line and headers within ``header_timeout`` s
    of its first byte (or of opening), else it is closed: uvicorn has only an idle timeout
    between requests, so a client trickling headers (slowloris) would hold its slot for
    ever. Past ``max_connections`` open connections a new one is answered 503 busy (the
    protocol's JSON, ``Retry-After``) and closed; HTTP/1.1 runs one request at a time per
    connection, so this also caps requests in flight (uvicorn's own ``limit_concurrency``
    answers a plain-text 503 without Retry-After)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                transport.write(_FULL_REPLY)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state == h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state == h11.IDLE:
                self._arm()
            super().data_received(data)
            if self.conn.their_state != h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


def configure_threads(num_threads: int | None = None) -> int:
    """Torch intra-op threads; by default half the cores.

    B runs one call at a time, so intra-op threads are all torch needs. Half the cores
    leaves the rest to whatever else runs on the machine (a demo's device runtime, other
    servers): oversubscribed OpenMP threads spin and stall badly (measured on 2 busy
    cores: a batch-256 step of digits-cnn's B took ~22 ms on 1 thread, 115-1100 ms on 2).
    A dedicated server passes ``--threads``.
    """
    import torch

    n = num_threads or max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(n)
    return n


def _on_exit(app: Any) -> Any:
    """The app's shutdown hook (``create_app`` with a state dir: drain + final checkpoint)."""
    state = getattr(app, "state", None)
    return getattr(state, "on_exit", None) if state is not None else None


def _uvicorn_server(app: Any, log_level: str, **options: Any) -> Any:
    """``options``: uvicorn.Config keywords over :data:`DEFAULT_LIMITS` (ssl_certfile,
    ssl_keyfile, limit_concurrency, ...) and ``header_timeout`` (s)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn that runs the app's shutdown hook *before* it stops accepting: on the
        first SIGTERM/SIGINT the hook drains (a device holding B may still send its
        backward) and writes the final checkpoint, then the usual graceful exit follows.
        A second signal exits at once, as uvicorn's does."""

        _exiting = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            hook = _on_exit(app)
            if hook is None or self._exiting:
                super().handle_exit(sig, frame)
                return
            self._exiting = True
            self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does

            def drain() -> None:
                try:
                    hook()
                finally:
                    self.should_exit = True

            threading.Thread(target=drain, name="spliteasy final checkpoint", daemon=True).start()

    header_timeout = options.pop("header_timeout", DEFAULT_HEADER_TIMEOUT)
    max_connections = options.pop("max_connections", DEFAULT_MAX_CONNECTIONS)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="off",
        access_log=log_level == "debug",
        http=_guarded_h11(header_timeout, max_connections),
        **{**DEFAULT_LIMITS, **options},
    )
    return Server(config)


def serve_forever(app: Any, sock: socket.socket, log_level: str = "info", **options: Any) -> None:
    """Serve ``app`` on an already-bound socket until interrupted (Ctrl-C / SIGTERM)."""
    _uvicorn_server(app, log_level, **options).run(sockets=[sock])


def wait_for_health(
    url: str,
    timeout: float = 60.0,
    proc: subprocess.Popen | None = None,
    ca_file: str | Path | None = None,
) -> dict:
    """Poll ``{url}/v1/health`` until it answers 200; returns its JSON. ``ca_file``: the CA
    that signed an https server's certificate (verified; the system's CAs without it)."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"server process exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(
                f"{url}/v1/health", timeout=2, context=context if url.startswith("https") else None
            ) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            time.sleep(0.05)
    raise ServeError(f"{url} did not become healthy within {timeout:g} s ({last})")


class ServerThread:
    """uvicorn serving an app object in a background thread of this process.

    ::

        with ServerThread(create_app(bundle)) as srv:
            httpx.get(f"{srv.url}/v1/health")
    """

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        **options: Any,
    ):
        """``options``: uvicorn settings (``ssl_certfile``/``ssl_keyfile`` for TLS, limits)."""
        self.app = app
        self.host, self.port, self.log_level = host, port, log_level
        self.options = options
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> ServerThread:
        sock = bind_socket(self.host, self.port)
        self.url = url_of(sock, tls=bool(self.options.get("ssl_certfile")))
        self._server = _uvicorn_server(self.app, self.log_level, **self.options)

        def run() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # surfaced by start()/stop()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"uvicorn {self.url}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"uvicorn did not start on {self.url}: {self._error}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        hook = _on_exit(self.app)
        if self._server is not None and hook is not None and not self._server.should_exit:
            hook()  # the final checkpoint, as on SIGTERM
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LISTENING = re.compile(r"listening on (https?://\S+)")


class ServerProcess:
    """``spliteasy serve BUNDLE`` as a child process on a free port of 127.0.0.1.

    The child prints the URL it listens on; we read it and wait for /v1/health. Unless
    ``extra_args`` name ``--state-dir`` (or ``--no-state``) the child keeps no state, so
    separate runs never resume each other's.
    ::

        with ServerProcess(bundle_dir) as srv:
            httpx.get(f"{srv.url}/v1/manifest")
    """

    def __init__(
        self,
        bundle_dir: Path | str,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_level: str = "warning",
        ca_file: str | Path | None = None,
    ):
        """``ca_file``: the CA of the child's TLS certificate (``--ssl-certfile``)."""
        self.bundle_dir = Path(bundle_dir)
        self.ca_file = ca_file
        extra_args = list(extra_args)
        if not {"--state-dir", "--no-state"} & {a.split("=")[0] for a in extra_args}:
            extra_args.append("--no-state")
        self.args = [
            sys.executable, "-m", "spliteasy_cli.main", "serve", str(self.bundle_dir),
            "--host", host, "--port", "0", "--log-level", log_level, *extra_args,
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self, timeout: float = 120.0) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        found = threading.Event()

        def pump() -> None:  # keep reading so the child never blocks on a full pipe
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = _LISTENING.search(line)
                if m and not self.url:
                    self.url = m.group(1).rstrip("/")
                    found.set()
            found.set()

        threading.Thread(target=pump, name="spliteasy serve output", daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.stop()
            raise ServeError("spliteasy serve did not start:\n" + "".join(self.output))
        try:
            wait_for_health(self.url, timeout, self.proc, self.ca_file)
        except ServeError:
            self.stop()
            raise ServeError("spliteasy serve is not healthy:\n" + "".join(self.output)) from None
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
