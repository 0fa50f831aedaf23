"""Issue #8: waiting for B costs no thread. 64 devices and an attacker who holds B's lease
(a forward, never its backward, again and again) on one real uvicorn on 127.0.0.1.

Health answers every probe within its timeout, session creation stays quick, every
device finishes its steps, and the steps applied to B are exactly the steps sent.
"""

from __future__ import annotations

import threading
import time

import httpx
from test_server_helpers import A_CUT, B_CUT, double_b, double_manifest, rand

from server_torch.app import create_app
from shared_schema import MEDIA_TYPE, Frame, FrameKind, encode

DEVICES, STEPS, LEASE = 64, 3, 1.0
ACT, GRAD = FrameKind.ACTIVATION, FrameKind.GRADIENT


class RawDevice:
    """A protocol client on one keep-alive connection that honours 503 + Retry-After."""

    def __init__(self, url: str, sha: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        r = self.http.post("/v1/sessions", json={"manifest_sha256": sha})
        assert r.status_code == 201, r.text
        self.sid, token = r.json()["session_id"], r.json()["token"]
        self.sidb = bytes.fromhex(self.sid)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": MEDIA_TYPE}
        self.busy = 0

    def post(self, op: str, kind: FrameKind, spec, arr, step: int) -> httpx.Response:
        body = encode([Frame(kind, spec.name, arr, spec.layout, self.sidb, step)])
        while True:
            r = self.http.post(f"/v1/sessions/{self.sid}/{op}", content=body, headers=self.headers)
            if r.status_code != 503:
                return r
            self.busy += 1
            time.sleep(min(float(r.headers.get("retry-after", "1")), 2.0))


def test_64_devices_and_a_lease_holder_all_finish_and_health_answers(serve_app):
    app = create_app(
        None,
        module=double_b(),
        manifest=double_manifest(),
        device_dir=None,
        max_sessions=DEVICES + 8,
        lease_timeout=LEASE,
        session_rate=600,  # all from 127.0.0.1
    )
    url = serve_app(app).url
    sha = app.state.manifest_sha256
    stop = threading.Event()
    errors: list[str] = []
    probes: list[float] = []
    creations: list[float] = []

    def attacker() -> None:
        dev = RawDevice(url, sha)
        x = rand((2, 8, 8, 4), 99)
        while not stop.is_set():  # forward step 0 forever: B held for a lease each turn
            dev.post("forward", ACT, A_CUT, x, 0)

    def prober() -> None:
        with httpx.Client(base_url=url, timeout=2.0) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    assert http.get("/v1/health").status_code == 200
                except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                    errors.append(f"health: {type(exc).__name__} {exc}")
                probes.append(time.monotonic() - t0)
                time.sleep(0.05)

    def creator() -> None:
        with httpx.Client(base_url=url, timeout=2.0) as http:
            for _ in range(4):
                time.sleep(0.5)
                t0 = time.monotonic()
                r = http.post("/v1/sessions", json={"manifest_sha256": sha})
                creations.append(time.monotonic() - t0)
                if r.status_code != 201:
                    errors.append(f"create: {r.status_code} {r.text}")
                    continue
                info = r.json()
                http.delete(
                    f"/v1/sessions/{info['session_id']}",
                    headers={"Authorization": f"Bearer {info['token']}"},
                )

    done = [0] * DEVICES
    devices = [RawDevice(url, sha) for _ in range(DEVICES)]

    def device(i: int) -> None:
        dev = devices[i]
        try:
            step = 0
            while step < STEPS:
                r = dev.post("forward", ACT, A_CUT, rand((2, 8, 8, 4), 1000 * i + step), step)
                assert r.status_code == 200, r.text
                r = dev.post("backward", GRAD, B_CUT, rand((2, 4, 4, 8), i, 1e-3), step)
                if r.status_code == 409 and r.json()["error"] == "stale_forward":
                    continue  # held B too long (a slow machine): redo the step
                assert r.status_code == 200, r.text
                step += 1
                done[i] = step
        except Exception as exc:  # noqa: BLE001
            errors.append(f"device {i}: {type(exc).__name__} {exc}")

    side = [threading.Thread(target=f, daemon=True) for f in (attacker, prober, creator)]
    workers = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(DEVICES)]
    t0 = time.monotonic()
    for t in side + workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    elapsed = time.monotonic() - t0
    stop.set()
    for t in side:
        t.join(timeout=10)

    assert not errors, errors[:5]
    assert done == [STEPS] * DEVICES
    assert app.state.trainer.steps == DEVICES * STEPS  # steps on the server == steps sent
    assert probes and max(probes) < 2.0, max(probes)
    assert len(creations) == 4 and max(creations) < 2.0, creations
    assert elapsed < 120
    metrics = httpx.get(f"{url}/metrics").text
    assert f"spliteasy_steps {float(DEVICES * STEPS)}" in metrics
    assert "spliteasy_lease_wait_seconds_count" in metrics
    print(
        f"\n{DEVICES} devices x {STEPS} steps + lease holder: {elapsed:.1f} s, "
        f"{len(probes)} health probes, slowest {max(probes) * 1e3:.0f} ms, "
        f"session creation slowest {max(creations) * 1e3:.0f} ms, "
        f"503 retries {sum(d.busy for d in devices)}"
    )


def test_waiting_queue_is_bounded_503_with_retry_after(serve_app):
    """max_waiting=2: with B held, a third waiting forward is told to come back later."""
    app = create_app(
        None,
        module=double_b(),
        manifest=double_manifest(),
        device_dir=None,
        lease_timeout=30.0,
        max_waiting=2,
    )
    url = serve_app(app).url
    sha = app.state.manifest_sha256
    holder, *waiting = [RawDevice(url, sha) for _ in range(5)]
    body = encode([Frame(ACT, A_CUT.name, rand((2, 8, 8, 4), 0), A_CUT.layout, holder.sidb, 0)])
    assert holder.http.post(
        f"/v1/sessions/{holder.sid}/forward", content=body, headers=holder.headers
    ).is_success
    results: dict[int, httpx.Response] = {}

    def go(i: int) -> None:
        d = waiting[i]
        b = encode([Frame(ACT, A_CUT.name, rand((2, 8, 8, 4), i), A_CUT.layout, d.sidb, 0)])
        results[i] = d.http.post(f"/v1/sessions/{d.sid}/forward", content=b, headers=d.headers)

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(results) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = list(results.values())
    assert len(refused) == 2 and all(r.status_code == 503 for r in refused)
    assert all(r.json()["error"] == "busy" and int(r.headers["retry-after"]) >= 1 for r in refused)
    assert app.state.waiter.waiting == 2
    assert httpx.get(f"{url}/v1/health", timeout=2).status_code == 200
    # the holder finishes its step: the two waiting forwards go through in turn
    grad = encode([Frame(GRAD, B_CUT.name, rand((2, 4, 4, 8), 0), B_CUT.layout, holder.sidb, 0)])
    assert holder.http.post(
        f"/v1/sessions/{holder.sid}/backward", content=grad, headers=holder.headers
    ).is_success
    deadline = time.monotonic() + 10
    while len(results) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(r.status_code for r in results.values())[:3] == [200, 503, 503]
    for d in (holder, *waiting):  # the last waiter learns its session is gone, at once
        d.http.delete(f"/v1/sessions/{d.sid}", headers=d.headers)
    deadline = time.monotonic() + 5
    while len(results) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(results) == 4 and app.state.waiter.waiting == 0
