"""The TF.js device in Node over the WebSocket binding (issue #11): the same run as over
HTTP gives bit-identical weights of A, B and C, and a socket the server drops mid-step
(after B applied the message, before its reply) reconnects without applying it twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from js_fixtures import node, run_node, write_batches

from split_helpers import ALL_RUNTIMES, SGD_CFG, digits_bundle, fixed_batches

pytestmark = pytest.mark.js

STEPS, BATCH = 5, 32
MODEL = "digits-bn"


def _run(bundle: Path, serve_app, data: Path, out: Path, transport: str, fault=None):
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec

    app = create_app(bundle)
    app.state.ws_fault = fault
    srv = serve_app(app)
    out.mkdir()
    args = ["train.mjs", "--server", srv.url, "--data", str(data), "--bundle", str(bundle)]
    args += ["--batch-size", str(BATCH), "--steps", str(STEPS), "--transport", transport]
    args += ["--log-json", str(out / "log.json"), "--weights-out", str(out / "weights.json")]
    proc = run_node(args)
    assert "done: 5 steps" in proc.stdout, proc.stdout + proc.stderr
    losses = [r["loss"] for r in json.loads((out / "log.json").read_text())["records"]]
    held = json.loads((out / "weights.json").read_text())
    weights = {
        name: np.asarray(w["data"], np.float32).reshape(w["shape"])
        for part in held.values()
        for name, w in part.items()
    }
    weights.update(keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B")))
    steps = app.state.trainer.steps
    srv.stop()
    return losses, weights, steps


def test_node_ws_equals_http_and_survives_a_dropped_socket(tmp_path, serve_app):
    node()
    bundle, _ = digits_bundle(None, "double", SGD_CFG, ALL_RUNTIMES, MODEL)
    data = write_batches(tmp_path / "train.frames", fixed_batches(STEPS, BATCH))
    http = _run(bundle, serve_app, data, tmp_path / "http", "http")
    ws = _run(bundle, serve_app, data, tmp_path / "ws", "ws")
    seen = {"forward": 0, "backward": 0}
    dropped = []

    def fault(op: str, rid: int) -> bool:
        seen[op] += 1
        if (op, seen[op]) in {("backward", 2), ("forward", 4)}:
            dropped.append(op)
            return True
        return False

    faulty = _run(bundle, serve_app, data, tmp_path / "faulty", "ws", fault)
    assert len(dropped) == 2
    for label, (losses, weights, steps) in (("ws", ws), ("ws+drops", faulty)):
        assert steps == STEPS, label  # nothing applied twice
        assert losses == http[0], label
        differ = [k for k in http[1] if not np.array_equal(weights[k], http[1][k])]
        assert not differ, (label, differ)
    print(f"\nnode: {len(http[1])} variables bit-identical over http, ws and ws with 2 drops")
