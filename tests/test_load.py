"""Many devices at once (issue #11): 32 concurrent devices x 50 steps on loopback, in each
mode (turns, parallel) and over each transport (http, ws), through ``benchmarks/load.py``
against ``spliteasy serve`` in a child process: 0 errors, and the server's optimizer
steps equal the steps sent (turns) or the rounds (parallel: 50 rounds of 32). Latency and
throughput figures are printed, not asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from split_helpers import SGD_CFG, digits_bundle

pytestmark = pytest.mark.slow

DEVICES, STEPS = 32, 50


def _load_tool():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("spliteasy_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize("mode", ["turns", "parallel"])
def test_32_devices_50_steps(mode, transport, capsys):
    bundle, _ = digits_bundle(None, "double", SGD_CFG)
    args = [str(bundle), "--devices", str(DEVICES), "--steps", str(STEPS), "--batch", "8"]
    args += ["--mode", mode, "--transport", transport, "--round-timeout", "120"]
    assert _load_tool().main(args) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    print(err.strip())
    assert report["errors"] == 0, report["error_samples"]
    assert report["steps_sent"] == DEVICES * STEPS
    expected = DEVICES * STEPS if mode == "turns" else STEPS
    assert report["server_steps"] == expected
