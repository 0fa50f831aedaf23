"""``spliteasy train``: the Python device trains A (and C) against a spliteasy server."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Train the device slices of a bundle against a running spliteasy server."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle directory written by 'spliteasy convert'")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--runtime", choices=["tf", "tflite"], default="tf")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--data",
        choices=["digits"],
        default="digits",
        help="training data (scikit-learn's bundled digits, resized to the model's input)",
    )
    p.add_argument(
        "--aux-label",
        action="store_true",
        help="send targets c - dL/dc instead of gradients (the paper's auxiliary labels)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=Path, help="per-step JSONL log (default runs/train-<time>.jsonl)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import time

    from device_tf.data import fit_to_input, load_digits_split
    from device_tf.factory import make_runtime
    from device_tf.fit import fit
    from device_tf.loop import SplitTrainer
    from device_tf.transport import HttpTransport
    from shared_schema import load_manifest, manifest_digest

    manifest = load_manifest(args.bundle)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=args.seed)
    x_tr, x_te = (fit_to_input(x, manifest.input.sample_shape) for x in (x_tr, x_te))
    if manifest.num_classes < 10:
        raise SystemExit("spliteasy train: the digits data needs a model with at least 10 classes")
    log = args.log or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    runtime = make_runtime(args.runtime, args.bundle, manifest)
    transport = HttpTransport(args.server)
    try:
        with SplitTrainer(
            runtime, transport, manifest, manifest_digest(args.bundle), args.aux_label
        ) as trainer:
            history = fit(
                trainer,
                x_tr,
                y_tr,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                x_val=x_te,
                y_val=y_te,
                log_path=log,
                progress=not args.no_progress,
            )
    finally:
        transport.close()
    print(
        f"test accuracy {history.epoch_accuracy[-1]:.4f} after {args.epochs} epochs "
        f"({manifest.split_mode} split, runtime {args.runtime})"
    )
    print(history.summary())
    print(f"per-step log: {log}")
    return 0
