"""``--mode parallel`` (issue #11): N devices in synchronous rounds train exactly as
unsplit training with batch N*b.

digits-cnn (BatchNormalization only in B), SGD with momentum, 4 Python TF devices in
threads with batch 8 each against the real server (uvicorn, 127.0.0.1) in parallel mode
with ``devices_per_round=4`` and ``sync_every=1``; unsplit tf_keras trains on the
concatenated batches of 32 from the same initial weights. After 5 rounds every variable
of A, B and C (B's BatchNorm statistics included) agrees within 1e-4 relative, and so
does each round's loss (the mean of the devices' losses).
"""

from __future__ import annotations

import threading

import numpy as np

from split_helpers import SGD_CFG, digits_bundle, fixed_batches, rel

N, B, ROUNDS, TOL = 4, 8, 5, 1e-4


def test_parallel_rounds_equal_unsplit_large_batch(serve_app):
    from device_tf.keras_util import named_variables
    from device_tf.loop import SplitTrainer
    from device_tf.parallel import sync_slices
    from device_tf.reference import train_unsplit
    from device_tf.tf_runtime import TFRuntime
    from device_tf.transport import HttpTransport
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest, manifest_digest

    bundle, reference = digits_bundle(None, "double", SGD_CFG)
    manifest = load_manifest(bundle)
    digest = manifest_digest(bundle)
    big = fixed_batches(ROUNDS, N * B)
    ref_losses = train_unsplit(reference, big, manifest.optimizer, manifest.loss)

    app = create_app(bundle, mode="parallel", devices_per_round=N, sync_every=1, round_timeout=120)
    srv = serve_app(app)
    runtimes = [TFRuntime.from_bundle(bundle) for _ in range(N)]
    losses = np.zeros((N, ROUNDS))
    covered: list[int] = []
    errors: list[BaseException] = []

    def device(i: int) -> None:
        transport = HttpTransport(srv.url)
        try:
            with SplitTrainer(runtimes[i], transport, manifest, digest) as trainer:
                for r, (x, y) in enumerate(big):
                    part = slice(i * B, (i + 1) * B)
                    losses[i, r] = trainer.step(x[part], y[part]).loss
                    covered.append(sync_slices(transport, runtimes[i], r, B))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            transport.close()

    threads = [threading.Thread(target=device, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    rounds = app.state.rounds
    assert rounds.rounds == ROUNDS and rounds.round_sizes == [N] * ROUNDS
    assert covered == [N] * (N * ROUNDS)
    # B's time is counted once a round in the metrics, not once per device
    import httpx

    metrics = httpx.get(f"{srv.url}/metrics").text
    assert f'spliteasy_b_compute_seconds_count{{op="backward"}} {float(ROUNDS)}' in metrics

    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    b_weights = keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B"))
    worst = 0.0
    for i, rt in enumerate(runtimes):
        got = dict(b_weights)
        for held in rt.weights().values():
            got.update(held)
        assert set(got) == set(expected), set(got) ^ set(expected)
        errs = {k: rel(got[k], expected[k]) for k in expected}
        name = max(errs, key=errs.get)
        worst = max(worst, errs[name])
        assert errs[name] <= TOL, (i, sorted(errs.items(), key=lambda kv: -kv[1])[:5])
    round_losses = losses.mean(axis=0)
    loss_errs = [abs(a - b) / abs(b) for a, b in zip(round_losses, ref_losses, strict=True)]
    print(
        f"\nparallel N={N} b={B}: worst variable rel err {worst:.2e}; "
        f"loss rel errs {[f'{e:.1e}' for e in loss_errs]}"
    )
    assert max(loss_errs) <= TOL
    assert ref_losses[-1] < ref_losses[0]
    assert np.linalg.norm(expected["b_bn1/moving_mean"]) > 100 * TOL  # B's BN moved


def test_a_round_closes_after_its_timeout_with_the_devices_that_came(serve_app):
    """Stragglers: 2 devices against rounds of 3 with a 1 s timeout. Every round (and
    every sync) closes on its timer with the 2 that arrived; nothing is lost or counted
    twice: B's steps == rounds == steps each device sent."""
    from device_tf.loop import SplitTrainer
    from device_tf.parallel import sync_slices
    from device_tf.tf_runtime import TFRuntime
    from device_tf.ws_transport import make_transport
    from server_torch.app import create_app
    from shared_schema import load_manifest, manifest_digest

    bundle, _ = digits_bundle(None, "double", SGD_CFG)
    manifest, digest = load_manifest(bundle), manifest_digest(bundle)
    app = create_app(bundle, mode="parallel", devices_per_round=3, round_timeout=1.0)
    srv = serve_app(app)
    batches = fixed_batches(3, 2 * B)
    covered: list[int] = []
    errors: list[BaseException] = []

    def device(i: int, kind: str) -> None:
        runtime = TFRuntime.from_bundle(bundle)
        transport = make_transport(kind, srv.url)
        try:
            with SplitTrainer(runtime, transport, manifest, digest) as trainer:
                for r, (x, y) in enumerate(batches):
                    part = slice(i * B, (i + 1) * B)
                    trainer.step(x[part], y[part])
                    covered.append(sync_slices(transport, runtime, r, B))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            transport.close()

    threads = [threading.Thread(target=device, args=(i, k)) for i, k in enumerate(["http", "ws"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    rounds = app.state.rounds
    assert app.state.trainer.steps == rounds.rounds == 3
    assert rounds.round_sizes == [2, 2, 2]
    assert covered == [2] * 6
