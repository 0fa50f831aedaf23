"""Many devices at once (issue #11): 32 concurrent devices x 50 steps on loopback, in each
mode (turns, parallel) and over each transport (http, ws), through ``benchmarks/load.py``
against ``spliteasy serve`` in a child process: 0 errors, and the server's optimizer
steps equal the steps sent (turns) or the rounds (parallel: 50 rounds of 32). Latency and
throughput figures are printed, not asserted.

One server per mode (started with the arguments the load tool gives its own, shared by
the http and the ws run: the tool counts B's steps as the difference of /v1/health
before and after its run, and every session of the first run is closed before the
second opens): two torch start-ups instead of four. The module is one xdist group, so
both transports of a mode meet the same server."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from split_helpers import SGD_CFG, digits_bundle

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("load")]

DEVICES, STEPS = 32, 50


def _load_tool():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("spliteasy_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle() -> Path:
    return digits_bundle(None, "double", SGD_CFG)[0]


@pytest.fixture(scope="module", params=["turns", "parallel"])
def server(request, bundle) -> Iterator[tuple[str, str]]:
    """(mode, URL) of ``spliteasy serve --mode MODE`` with the arguments ``load.py`` gives
    the server it starts itself."""
    from server_torch.serving import ServerProcess

    mode = request.param
    extra = ["--mode", mode, "--session-rate", "0", "--max-sessions", str(2 * DEVICES)]
    if mode == "parallel":
        extra += ["--devices-per-round", str(DEVICES), "--round-timeout", "120"]
    srv = ServerProcess(bundle, extra).start(timeout=300)  # a torch start-up on a busy machine
    try:
        yield mode, srv.url
    finally:
        srv.stop()


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_32_devices_50_steps(server, transport, bundle, capsys):
    mode, url = server
    args = [str(bundle), "--server", url, "--devices", str(DEVICES), "--steps", str(STEPS)]
    args += ["--batch", "8", "--mode", mode, "--transport", transport]
    assert _load_tool().main(args) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    print(err.strip())
    assert report["errors"] == 0, report["error_samples"]
    assert report["steps_sent"] == DEVICES * STEPS
    expected = DEVICES * STEPS if mode == "turns" else STEPS
    assert report["server_steps"] == expected
