"""Shared by the parallel-mode tests (``test_parallel.py``, ``test_workers.py``): N Python
TF devices in threads training synchronous rounds against a real server, and the check
that A, B and C then equal unsplit tf_keras training with the round's whole batch."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from split_helpers import rel


@dataclass
class DeviceRun:
    runtimes: list  # each device's runtime (its A and C after the run)
    losses: np.ndarray  # (devices, rounds)
    covered: list[int]  # devices each sync averaged, in completion order


def run_devices(
    url: str,
    bundle: Path,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    n: int,
    b: int,
    transports: Sequence[str] | None = None,
    sync: bool = True,
    timeout: float = 300.0,
) -> DeviceRun:
    """Device i trains rows [i*b, (i+1)*b) of every batch, one round each, then (``sync``)
    averages A and C with its peers. Raises the first device error."""
    from device_tf.loop import SplitTrainer
    from device_tf.parallel import sync_slices
    from device_tf.tf_runtime import TFRuntime
    from device_tf.ws_transport import make_transport
    from shared_schema import load_manifest, manifest_digest

    manifest, digest = load_manifest(bundle), manifest_digest(bundle)
    kinds = list(transports or ["http"] * n)
    runtimes = [TFRuntime.from_bundle(bundle) for _ in range(n)]
    losses = np.zeros((n, len(batches)))
    covered: list[int] = []
    errors: list[BaseException] = []

    def device(i: int) -> None:
        transport = make_transport(kinds[i], url)
        try:
            with SplitTrainer(runtimes[i], transport, manifest, digest) as trainer:
                for r, (x, y) in enumerate(batches):
                    part = slice(i * b, (i + 1) * b)
                    losses[i, r] = trainer.step(x[part], y[part]).loss
                    if sync:
                        covered.append(sync_slices(transport, runtimes[i], r, b))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            errors.append(exc)
        finally:
            transport.close()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return DeviceRun(runtimes, losses, covered)


def b_weights_of_module(module, bundle: Path) -> dict[str, np.ndarray]:
    """B's variables by Keras name from a live torch B."""
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec

    return keras_weights(module, TorchSpec.load(bundle / "B"))


def b_weights_of_checkpoint(state_dir: Path, bundle: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(steps, B's variables by Keras name) from a server state dir's newest checkpoint."""
    from server_torch.checkpoint import read_state_dir
    from server_torch.spec import TorchSpec

    saved = read_state_dir(state_dir)
    spec = TorchSpec.load(bundle / "B")
    state = saved.module_state
    return saved.step, {
        v.keras: v.to_keras(state[v.torch].detach().cpu().numpy().copy()) for v in spec.variables
    }


def assert_equals_unsplit(
    label: str,
    run: DeviceRun,
    b_weights: dict[str, np.ndarray],
    reference,
    ref_losses: Sequence[float],
    tol: float = 1e-4,
) -> float:
    """Every device's A and C, with B, equal the unsplit reference within ``tol``; so do the
    round losses (mean over devices). Returns the worst relative error."""
    from device_tf.keras_util import named_variables

    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    worst = 0.0
    for i, rt in enumerate(run.runtimes):
        got = dict(b_weights)
        for held in rt.weights().values():
            got.update(held)
        assert set(got) == set(expected), set(got) ^ set(expected)
        errs = {k: rel(got[k], expected[k]) for k in expected}
        name = max(errs, key=errs.get)
        worst = max(worst, errs[name])
        assert errs[name] <= tol, (i, sorted(errs.items(), key=lambda kv: -kv[1])[:5])
    round_losses = run.losses.mean(axis=0)
    loss_errs = [abs(a - b) / abs(b) for a, b in zip(round_losses, ref_losses, strict=True)]
    print(
        f"\n{label}: worst variable rel err {worst:.2e}; "
        f"loss rel errs {[f'{e:.1e}' for e in loss_errs]}"
    )
    assert max(loss_errs) <= tol
    assert ref_losses[-1] < ref_losses[0]
    # B's BatchNorm moved: its moving statistics were compared in motion
    for name, value in expected.items():
        if name.startswith("b_") and name.endswith("/moving_mean"):
            assert np.linalg.norm(value) > 100 * tol, name
        elif name.startswith("b_") and name.endswith("/moving_variance"):
            assert rel(value, np.ones_like(value)) > 100 * tol, name
    return worst
