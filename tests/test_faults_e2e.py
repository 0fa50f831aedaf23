"""100 steps through the netem fault proxy: the retried exchanges change nothing.

``spliteasy train`` (a child process) talks to ``spliteasy serve`` (another) through the
fault proxy, which drops 10 % of requests before they reach the server, 10 % after the
server applied them (the reply is lost), and resets 5 % mid-request and 5 % mid-reply.
The device retries each identically; the server answers a repeated step from its retry
store. The final A, B and C must equal the fault-free run's exactly, and B must have
taken exactly 100 optimizer steps.

The fault-free run is the same ``train``/``serve`` code in this process
(``resume_helpers.uninterrupted``): bit-equal to child processes, without their start-up.
"""

from __future__ import annotations

import json
from collections import Counter

from resume_helpers import STEPS_100, Device, Server, compare, final_state, uninterrupted

from netem import Fault, FaultProxy, FaultSchedule, path_matches
from split_helpers import ALL_RUNTIMES, SGD_CFG

FAULTS = {
    Fault.DROP_BEFORE_SERVER: 0.10,
    Fault.DROP_AFTER_APPLY: 0.10,
    Fault.RESET_REQUEST_BODY: 0.05,
    Fault.RESET_RESPONSE_BODY: 0.05,
}


def test_hundred_steps_through_dropped_connections(digits_bundles, tmp_path) -> None:
    bundle, _ = digits_bundles("double", SGD_CFG, runtimes=ALL_RUNTIMES)
    want = uninterrupted(bundle, tmp_path / "reference", STEPS_100)

    work = tmp_path / "faulty"
    work.mkdir()
    server = Server(bundle, work / "server-state", extra=()).start(wait=False)  # its port: known
    schedule = FaultSchedule(FAULTS, seed=7, applies_to=path_matches(r"^/v1/sessions"))
    proxy = FaultProxy(("127.0.0.1", server.port), schedule).start()
    device = Device(bundle, work, STEPS_100)
    try:
        device.start(proxy.url)  # imports TF while the server loads B
        server.wait()
        device.finish(timeout=900)
        steps = server.health()["steps"]  # asked directly, not through the proxy
        got = final_state(server, device)
    finally:
        device.stop()
        proxy.stop()
        server.stop()

    counts = proxy.counts()
    ops = Counter(e.target.rsplit("/", 1)[-1] for e in proxy.events if e.fault is not Fault.NONE)
    records = [json.loads(line) for line in device.log.read_text().splitlines()]
    replayed = sum(r["replayed"] for r in records)
    print(f"\nfaults {dict(counts)} on {dict(ops)}; {replayed} steps answered from the store")
    assert steps == 100
    assert [r["step"] for r in records] == list(range(100))
    for fault, p in FAULTS.items():
        assert counts[fault] >= 0.3 * p * 200, (fault, counts)  # ~200 step requests
    assert replayed >= 1  # replies lost after the server applied them were replayed
    assert compare(got, want) == 0.0  # bit for bit
