"""Getting bytes to the server and back; knows nothing of steps or tensors.

``HttpTransport`` keeps one persistent HTTP/1.1 connection (httpx) for the whole run.
A request that fails in transit is sent again, identically, a bounded number of times:
every frame carries (session, step), and the server answers a repeated step from its
store without applying it twice, so a retry is always safe. A WebSocket transport can
sit beside this one behind the same three methods.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import httpx

from shared_schema import MEDIA_TYPE

from ._exceptions import ServerRejected, ServerUnreachable


@dataclass
class Reply:
    body: bytes
    server_ms: float
    round_trip_ms: float


class HttpTransport:
    def __init__(self, base_url: str, timeout: float = 60.0, retries: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.token: str | None = None
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout)

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = exc
                time.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            if response.status_code >= 400:
                try:
                    body = response.json()
                    code, detail = body.get("error", "error"), body.get("detail", response.text)
                except ValueError:
                    code, detail = "error", response.text[:500]
                raise ServerRejected(response.status_code, str(code), str(detail))
            return response
        raise ServerUnreachable(
            f"{self.base_url}{path}: no answer after {self.retries + 1} tries: {last}"
        )

    def get_json(self, path: str) -> dict:
        return self._send("GET", path).json()

    def post_json(self, path: str, payload: dict) -> dict:
        return self._send("POST", path, json=payload).json()

    def post_frames(self, path: str, body: bytes) -> Reply:
        headers = {"Content-Type": MEDIA_TYPE}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        start = time.perf_counter()
        response = self._send("POST", path, content=body, headers=headers)
        round_trip = (time.perf_counter() - start) * 1000
        server_ms = float(response.headers.get("X-Spliteasy-Server-Ms", 0.0))
        return Reply(response.content, server_ms, round_trip)

    def delete(self, path: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        # best effort: the server evicts idle sessions anyway
        with contextlib.suppress(httpx.TransportError):
            self._client.request("DELETE", path, headers=headers)

    def close(self) -> None:
        self._client.close()
