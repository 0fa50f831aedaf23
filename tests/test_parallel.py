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

from parallel_helpers import assert_equals_unsplit, b_weights_of_module, run_devices

from split_helpers import SGD_CFG, digits_bundle, fixed_batches

N, B, ROUNDS, TOL = 4, 8, 5, 1e-4


def test_parallel_rounds_equal_unsplit_large_batch(serve_app):
    from device_tf.reference import train_unsplit
    from server_torch.app import create_app
    from shared_schema import load_manifest

    bundle, reference = digits_bundle(None, "double", SGD_CFG)
    manifest = load_manifest(bundle)
    big = fixed_batches(ROUNDS, N * B)
    ref_losses = train_unsplit(reference, big, manifest.optimizer, manifest.loss)

    app = create_app(bundle, mode="parallel", devices_per_round=N, sync_every=1, round_timeout=120)
    srv = serve_app(app)
    run = run_devices(srv.url, bundle, big, N, B)
    rounds = app.state.rounds
    assert rounds.rounds == ROUNDS and rounds.round_sizes == [N] * ROUNDS
    assert run.covered == [N] * (N * ROUNDS)
    # B's time is counted once a round in the metrics, not once per device
    import httpx

    metrics = httpx.get(f"{srv.url}/metrics").text
    assert f'spliteasy_b_compute_seconds_count{{op="backward"}} {float(ROUNDS)}' in metrics

    b_weights = b_weights_of_module(app.state.trainer.module, bundle)
    assert_equals_unsplit(f"parallel N={N} b={B}", run, b_weights, reference, ref_losses, TOL)


def test_a_round_closes_after_its_timeout_with_the_devices_that_came(serve_app):
    """Stragglers: 2 devices against rounds of 3 with a 1 s timeout. Every round (and
    every sync) closes on its timer with the 2 that arrived; nothing is lost or counted
    twice: B's steps == rounds == steps each device sent."""
    from server_torch.app import create_app

    bundle, _ = digits_bundle(None, "double", SGD_CFG)
    app = create_app(bundle, mode="parallel", devices_per_round=3, round_timeout=1.0)
    srv = serve_app(app)
    run = run_devices(srv.url, bundle, fixed_batches(3, 2 * B), 2, B, transports=["http", "ws"])
    rounds = app.state.rounds
    assert app.state.trainer.steps == rounds.rounds == 3
    assert rounds.round_sizes == [2, 2, 2]
    assert run.covered == [2] * 6
