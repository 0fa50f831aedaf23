"""``spliteasy serve``: arguments, refusals, and a real bundle served by a child process."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_server_helpers import Device, rand, write_bundle

from shared_schema import FrameKind, load_manifest, sha256_tree
from spliteasy_cli.main import main


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--host", "--port", "--log-level", "--threads", "--max-batch", "--lease-timeout"):
        assert opt in out


def test_refuses_a_missing_or_tampered_bundle(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    bundle, _ = write_bundle(tmp_path / "b")
    (bundle / "A" / "model.json").write_text("{}")
    assert main(["serve", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spliteasy serve: error:") and "does not match its sha256" in err
    assert main(["serve", str(bundle), "--max-batch", "0"]) == 2


@pytest.fixture(scope="module")
def digits_bundle(digits_bundle_dir):
    """What ``spliteasy convert --optimizer sgd`` writes (double split), from the cache;
    the convert command's own subprocess is test_cli's."""
    return digits_bundle_dir


@pytest.mark.slow
def test_serves_a_converted_bundle(digits_bundle, serve_bundle):
    from server_torch.rebuild import load_server_slice

    srv = serve_bundle(digits_bundle)
    manifest = load_manifest(digits_bundle)
    dev = Device(srv.url)
    # the device fetches its own slice's files, never B's
    weights = dev.http.get("/v1/bundle/A/weights.h5")
    assert weights.status_code == 200
    assert (
        hashlib.sha256(weights.content).hexdigest()
        == sha256_tree(digits_bundle / "A" / "weights.h5")[0]
    )
    assert dev.http.get("/v1/bundle/B/weights.safetensors").status_code == 404

    a_spec, b_spec = manifest.cuts
    a = rand((4, *a_spec.sample_shape), 0)
    g = rand((4, *b_spec.sample_shape), 1, scale=0.1)
    (b,), _ = dev.ok("forward", dev.body(FrameKind.ACTIVATION, a_spec, a, 0))
    (g_a,), _ = dev.ok("backward", dev.body(FrameKind.GRADIENT, b_spec, g, 0))

    ref = load_server_slice(digits_bundle, manifest)
    x = torch.tensor(a).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    out = ref(x)
    np.testing.assert_allclose(
        b.array, out.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5
    )
    out.backward(torch.tensor(g).permute(0, 3, 1, 2))
    np.testing.assert_allclose(g_a.array, x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-6)
    assert dev.http.get("/v1/health").json()["steps"] == 1


@pytest.mark.slow
def test_port_in_use_is_a_one_line_error(digits_bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "spliteasy_cli.main",
            "serve",
            str(digits_bundle),
            "--port",
            str(port),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "cannot listen on 127.0.0.1" in res.stderr and "Traceback" not in res.stderr
