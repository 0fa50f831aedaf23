"""``spliteasy demo``: the embedded default, end to end, on this machine.

Converts the built-in CNN, starts the real server (``spliteasy serve`` on 127.0.0.1, a
free port), trains a double split on scikit-learn's digits images (labels never leave
the device), then trains the same model unsplit in tf_keras from the same initial
weights on the same batches, and prints both test accuracies side by side. It ends by
writing the trained model, unsplit, as a tf_keras SavedModel (``spliteasy export`` from
the run's server and device state) and printing where it is and its accuracy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "Convert the built-in CNN, serve it, train split on digits, and compare with unsplit training."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    p.add_argument(
        "--lr", type=float, default=None, help="default 0.001 (adam) or 0.01 (sgd, momentum 0.9)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo"),
        help="where the bundle, the run's state, the log and the trained model go",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.add_argument("--no-progress", action="store_true")


def run_demo(
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: str = "adam",
    lr: float | None = None,
    out: Path = Path("runs/demo"),
    seed: int = 0,
    progress: bool = True,
) -> dict:
    import os
    import shutil
    import time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converters.bundle import write_bundle
    from converters.export.trained import export_trained
    from converters.models import DIGITS_CUTS, digits_cnn
    from device_tf.data import batches, load_digits_split
    from device_tf.fit import fit
    from device_tf.loop import SplitTrainer
    from device_tf.reference import accuracy, clone_with_weights, train_unsplit
    from device_tf.state import DeviceState, RunSpec, data_digest
    from device_tf.tf_runtime import TFRuntime
    from device_tf.transport import HttpTransport
    from server_torch.serving import ServerProcess
    from shared_schema import AdamSpec, SGDSpec, load_manifest, manifest_digest

    say = print if progress else (lambda *a, **k: None)
    opt = (
        SGDSpec(learning_rate=lr or 0.01, momentum=0.9)
        if optimizer == "sgd"
        else AdamSpec(learning_rate=lr or 0.001)
    )
    out = Path(out)
    bundle = out / "bundle"
    server_state, device_state, trained = (
        out / "server-state",
        out / "device-state",
        out / "trained",
    )
    for old in (server_state, device_state):  # a fresh run, never a resumed one
        shutil.rmtree(old, ignore_errors=True)
    model = digits_cnn(seed=seed)
    baseline = clone_with_weights(model)
    t0 = time.perf_counter()
    write_bundle(
        model,
        list(DIGITS_CUTS),
        bundle,
        model_name="digits-cnn",
        optimizer=opt,
        overwrite=True,
        seed=seed,
    )
    manifest = load_manifest(bundle)
    report = json.loads((bundle / "report.json").read_text())["verification"]
    say(
        f"[1/5] converted digits-cnn -> {bundle} in {time.perf_counter() - t0:.1f}s "
        f"(B verified: max gradient rel err {report['max_param_grad_rel_err']:.1e})"
    )
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=seed)
    digest = manifest_digest(bundle)
    # The server checkpoints B into its state dir (the last time when it is stopped), the
    # device keeps A and C in its own: the two halves `spliteasy export` joins at the end.
    with ServerProcess(bundle, ["--state-dir", str(server_state)]) as srv:
        say(f"[2/5] serving B (PyTorch) at {srv.url}")
        runtime = TFRuntime.from_bundle(bundle, manifest)
        spec = RunSpec(
            manifest_sha256=digest,
            runtime=runtime.name,
            aux_label=False,
            data_sha256=data_digest(x_tr, y_tr),
            n_samples=len(x_tr),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
        state = DeviceState(device_state, spec, server=srv.url)
        state.runtime = runtime
        transport = HttpTransport(srv.url)
        t1 = time.perf_counter()
        try:
            trainer = SplitTrainer(runtime, transport, manifest, digest)
            say(f"[3/5] split training: {epochs} epochs of {len(x_tr)} digits, batch {batch_size}")
            history = fit(  # opens the session and saves A, C after every step
                trainer,
                x_tr,
                y_tr,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                x_val=x_te,
                y_val=y_te,
                log_path=out / "steps.jsonl",
                progress=progress,
                state=state,
            )
            trainer.close()
        finally:
            transport.close()
        split_seconds = time.perf_counter() - t1
    say(f"      {history.summary()}")
    say("[4/5] unsplit baseline: same model, same initial weights, same batches, tf_keras")
    all_batches = [b for e in range(epochs) for b in batches(x_tr, y_tr, batch_size, e, seed)]
    train_unsplit(baseline, all_batches, manifest.optimizer, manifest.loss)
    exported = export_trained(bundle, server_state, device_state, trained, overwrite=True)
    import tf_keras as keras

    trained_model = keras.models.load_model(trained, compile=False)
    say(
        f"[5/5] trained model (unsplit tf_keras SavedModel) written to {trained}; equals split "
        f"inference within {exported.verification['split_vs_unsplit_rel_err']:.1e}"
    )
    result = {
        "split_accuracy": history.epoch_accuracy[-1],
        "unsplit_accuracy": accuracy(baseline, x_te, y_te),
        "exported_accuracy": accuracy(trained_model, x_te, y_te),
        "trained_model": str(trained),
        "epochs": epochs,
        "steps": history.steps,
        "split_seconds": round(split_seconds, 1),
        "mean_step_ms": {k: round(v, 2) for k, v in history.mean_ms().items()},
        "test_samples": int(len(x_te)),
    }
    say("")
    say(f"  test accuracy on {len(x_te)} held-out digits after {epochs} epochs")
    say(
        f"    split   (A, C: TensorFlow on the device; B: PyTorch server)  {result['split_accuracy']:.4f}"
    )
    say(
        f"    unsplit (the same model in tf_keras)                         {result['unsplit_accuracy']:.4f}"
    )
    say(
        f"    exported (the split run's trained model, unsplit)            {result['exported_accuracy']:.4f}"
    )
    say("")
    say(f"  trained model: {trained}  (tf_keras.models.load_model({str(trained)!r}))")
    return result


def run(args: argparse.Namespace) -> int:
    result = run_demo(
        args.epochs,
        args.batch_size,
        args.optimizer,
        args.lr,
        args.out,
        args.seed,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(result))
    return 0
