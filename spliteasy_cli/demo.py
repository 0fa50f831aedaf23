"""``spliteasy demo``: the embedded default, end to end, on this machine.

Converts the built-in CNN, starts the real server (``spliteasy serve`` on 127.0.0.1, a
free port), trains a double split on scikit-learn's digits images (labels never leave
the device), then trains the same model unsplit in tf_keras from the same initial
weights on the same batches, and prints both test accuracies side by side. It ends by
writing the trained model, unsplit, as a tf_keras SavedModel (``spliteasy export`` from
the run's server and device state) and printing where it is and its accuracy.

``--compare`` is the paper's Figure 3 as a command: both runs are scored on the held-out
data after every epoch, and the two accuracy curves go to ``compare.json`` and
``compare.png`` in the run folder. ``--data`` and ``--model`` pick what is trained (the
data as ``spliteasy train --data`` reads it: ``digits``, a folder of images, an ``.npz``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "Convert the built-in CNN, serve it, train split on digits, and compare with unsplit training."
)
# Built-in image classifiers the demo can train on image data (digits, folders, .npz).
DEMO_MODELS = ("digits-cnn", "digits-bn")


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
    p.add_argument("--model", choices=DEMO_MODELS, default="digits-cnn")
    p.add_argument(
        "--data",
        default="digits",
        help="digits (default), a folder of images in class subfolders, or an .npz with x, y",
    )
    p.add_argument(
        "--validation-split",
        type=float,
        default=None,
        help="held-out fraction scored each epoch (default: digits' 20%% test split; 0.2 of "
        "your own data)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="score split and unsplit after every epoch; write the two accuracy curves to "
        "compare.json and compare.png in --out",
    )


def run_demo(
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: str = "adam",
    lr: float | None = None,
    out: Path = Path("runs/demo"),
    seed: int = 0,
    progress: bool = True,
    *,
    model_name: str = "digits-cnn",
    data: str = "digits",
    validation_split: float | None = None,
    compare: bool = False,
) -> dict:
    import os
    import shutil
    import time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converters.bundle import write_bundle
    from converters.export.trained import export_trained
    from converters.models import builtin_cuts, load_model
    from device_tf.data import batches
    from device_tf.datasets import load_dataset
    from device_tf.fit import fit
    from device_tf.keras_util import keras_loss, keras_optimizer
    from device_tf.loop import SplitTrainer
    from device_tf.reference import accuracy, clone_with_weights
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
    if data != "digits" and not Path(data).exists():  # before minutes of conversion
        from device_tf.datasets import DataError

        raise DataError(
            f"{data}: no such file or folder (give a folder of images, an .npz or 'digits')"
        )
    model, _ = load_model(model_name, seed=seed)
    baseline = clone_with_weights(model)
    t0 = time.perf_counter()
    write_bundle(
        model,
        list(builtin_cuts(model_name)),
        bundle,
        model_name=model_name,
        optimizer=opt,
        overwrite=True,
        seed=seed,
    )
    manifest = load_manifest(bundle)
    report = json.loads((bundle / "report.json").read_text())["verification"]
    say(
        f"[1/5] converted {model_name} -> {bundle} in {time.perf_counter() - t0:.1f}s "
        f"(B verified: max gradient rel err {report['max_param_grad_rel_err']:.1e})"
    )
    if data != "digits" and validation_split is None:
        validation_split = 0.2  # the demo always scores on held-out samples
    ds = load_dataset(data, manifest, validation_split=validation_split, seed=seed)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_val, ds.y_val
    if x_te is None:
        from device_tf.datasets import DataError

        raise DataError(f"{data}: the demo needs held-out samples; give --validation-split > 0")
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
            say(
                f"[3/5] split training: {epochs} epochs of {len(x_tr)} samples ({data}), "
                f"batch {batch_size}"
            )
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
    # One compiled model (one optimizer state) through every epoch's batches, scored after
    # each epoch as the split run is.
    baseline.compile(optimizer=keras_optimizer(manifest.optimizer), loss=keras_loss(manifest.loss))
    unsplit_curve: list[float] = []
    for e in range(epochs):
        for xb, yb in batches(x_tr, y_tr, batch_size, e, seed):
            baseline.train_on_batch(xb, yb)
        if compare or e == epochs - 1:
            unsplit_curve.append(accuracy(baseline, x_te, y_te))
    exported = export_trained(bundle, server_state, device_state, trained, overwrite=True)
    import tf_keras as keras

    trained_model = keras.models.load_model(trained, compile=False)
    say(
        f"[5/5] trained model (unsplit tf_keras SavedModel) written to {trained}; equals split "
        f"inference within {exported.verification['split_vs_unsplit_rel_err']:.1e}"
    )
    result = {
        "split_accuracy": history.epoch_accuracy[-1],
        "unsplit_accuracy": unsplit_curve[-1],
        "exported_accuracy": accuracy(trained_model, x_te, y_te),
        "trained_model": str(trained),
        "epochs": epochs,
        "steps": history.steps,
        "split_seconds": round(split_seconds, 1),
        "mean_step_ms": {k: round(v, 2) for k, v in history.mean_ms().items()},
        "test_samples": int(len(x_te)),
    }
    if compare:
        result["compare"] = write_compare(
            out,
            history.epoch_accuracy[-epochs:],
            unsplit_curve,
            title=f"{model_name} on {data}: {len(x_tr)} training, {len(x_te)} held out",
        )
    say("")
    say(f"  test accuracy on {len(x_te)} held-out samples ({data}) after {epochs} epochs")
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
    if compare:
        say(f"  accuracy curves: {result['compare']['png']}  {result['compare']['json']}")
    return result


def write_compare(out: Path, split: list[float], unsplit: list[float], title: str) -> dict:
    """The two per-epoch accuracy curves as ``compare.json`` and ``compare.png`` in ``out``
    (the paper's Figure 3: split training follows unsplit training epoch for epoch)."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = list(range(1, len(split) + 1))
    json_path, png_path = out / "compare.json", out / "compare.png"
    json_path.write_text(
        json.dumps(
            {
                "title": title,
                "epochs": epochs,
                "split_accuracy": split,
                "unsplit_accuracy": unsplit,
                "max_abs_difference": max(
                    (abs(a - b) for a, b in zip(split, unsplit, strict=True)), default=0.0
                ),
            },
            indent=2,
        )
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, unsplit, "o-", label="unsplit (tf_keras)", linewidth=3, alpha=0.5)
    ax.plot(epochs, split, "s--", label="split (A, C: TF device; B: PyTorch server)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return {"json": str(json_path), "png": str(png_path)}


def run(args: argparse.Namespace) -> int:
    result = run_demo(
        args.epochs,
        args.batch_size,
        args.optimizer,
        args.lr,
        args.out,
        args.seed,
        progress=not args.no_progress,
        model_name=args.model,
        data=args.data,
        validation_split=args.validation_split,
        compare=args.compare,
    )
    if args.json:
        print(json.dumps(result))
    return 0
