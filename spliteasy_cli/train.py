"""``spliteasy train``: the Python device trains A (and C) against a spliteasy server."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Train the device slices of a bundle against a running spliteasy server."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle directory written by 'spliteasy convert'")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--runtime",
        choices=["tf", "tflite", "tfjs"],
        default="tf",
        help="device runtime: Python TF, the TFLite interpreter, or TF.js in Node (device_tf/js)",
    )
    p.add_argument(
        "--transport",
        choices=["http", "ws"],
        default="http",
        help="how frames travel: one HTTP request per operation, or one WebSocket for the "
        "whole run (/v1/sessions/{sid}/ws; same frames, same exactly-once retries)",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--data",
        default="digits",
        metavar="PATH",
        help="training data: a folder of images in class subfolders (PATH/<class>/<image>, "
        "jpeg/png/bmp/gif; decoded and resized on the device, labels from the sorted folder "
        "names), an .npz with arrays x and y, or 'digits' (scikit-learn's bundled digits, "
        "the default)",
    )
    p.add_argument(
        "--validation-split",
        type=float,
        default=None,
        metavar="F",
        help="hold out this fraction of the data (seeded) and report the validation score "
        "after each epoch (default: digits' 20%% test split; none of your own data)",
    )
    p.add_argument(
        "--aux-label",
        action="store_true",
        help="send targets c - dL/dc instead of gradients (the paper's auxiliary labels)",
    )
    p.add_argument(
        "--codec",
        default="float32",
        choices=_codec_names(),
        help="wire codec of activations and gradients, asked for when the session opens "
        "(docs/protocol.md, Compression); float32 is exact",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--recompute-a",
        action="store_true",
        help="tf runtime: recompute A's forward in its backward (tf.recompute_grad) instead of "
        "holding A's activations across the round trip; same results, less device memory",
    )
    p.add_argument("--log", type=Path, help="per-step JSONL log (default runs/train-<time>.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="keep the device's training state here after every step (slices, optimizer, "
        "progress, session token); running the same command again resumes at the exact batch",
    )
    p.add_argument(
        "--reconnect-timeout",
        type=float,
        default=300.0,
        help="while the server is unreachable, keep retrying with backoff this many seconds "
        "before giving up (default %(default)s)",
    )
    p.add_argument(
        "--auth-key",
        default=None,
        help="enrolment key for a server started with --auth-keys (default $SPLITEASY_AUTH_KEY)",
    )
    p.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="CA certificate (PEM) that signed an https server's certificate; the server's "
        "certificate is always verified (the system's CAs without this)",
    )


def _codec_names() -> list[str]:
    from shared_schema.codec import NAMES  # protocol.json's codecs: their one source

    return list(NAMES)


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from device_tf.datasets import load_dataset
    from device_tf.factory import make_runtime
    from device_tf.fit import fit
    from device_tf.loop import SplitTrainer
    from device_tf.ws_transport import make_transport
    from shared_schema import SpliteasyError, load_manifest, manifest_digest

    if args.reconnect_timeout < 0:
        raise SpliteasyError("--reconnect-timeout must be >= 0")
    if args.recompute_a and args.runtime != "tf":
        raise SpliteasyError(f"--recompute-a is offered by the tf runtime only, not {args.runtime}")
    manifest = load_manifest(args.bundle)
    # All of the data is read and checked here, before anything is sent to the server.
    ds = load_dataset(args.data, manifest, validation_split=args.validation_split, seed=args.seed)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_val, ds.y_val
    if not args.no_progress:
        print(f"spliteasy: {ds.describe()}", file=sys.stderr)
    log = args.log or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.runtime == "tfjs":
        code = _run_tfjs(args, manifest, (x_tr, y_tr, x_te, y_te), log)
        if code == 0:
            print(f"run record: {_write_run_record(args, manifest, ds, log, {})}")
        return code
    digest = manifest_digest(args.bundle)
    state = None
    if args.state_dir is not None:
        from device_tf.state import DeviceState, RunSpec, data_digest

        spec = RunSpec(
            manifest_sha256=digest,
            runtime=args.runtime,
            aux_label=args.aux_label,
            data_sha256=data_digest(x_tr, y_tr),
            n_samples=len(x_tr),
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            codec=args.codec,
        )
        state = DeviceState(args.state_dir, spec, server=args.server)
        state.data = ds.record()
        state.read_session()  # another bundle's or run's state dir: refused before any work
    runtime = make_runtime(args.runtime, args.bundle, manifest, recompute_a=args.recompute_a)
    if state is not None:
        state.runtime = runtime
    transport = make_transport(
        args.transport,
        args.server,
        reconnect_timeout=args.reconnect_timeout,
        ca_file=args.ca_file,
        auth_key=args.auth_key,
    )
    trainer = SplitTrainer(runtime, transport, manifest, digest, args.aux_label, args.codec)
    parallel = transport.health().get("parallel")
    if parallel is not None:  # spliteasy serve --mode parallel: average A and C as it says
        from device_tf.parallel import with_sync

        with_sync(trainer, transport, runtime, int(parallel["sync_every"]))
    finished = False
    try:
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
            state=state,
            val_label=_val_label(ds, manifest),
        )
        finished = True
    finally:
        # A finished run ends its session; a run that failed keeps it when it has a state
        # dir, so the same command can take it up again.
        if finished or state is None:
            trainer.close()
        transport.close()
    label = _val_label(ds, manifest)
    if history.epoch_accuracy:
        print(
            f"{label} {history.epoch_accuracy[-1]:.4f} after {args.epochs} epochs "
            f"({manifest.split_mode} split, runtime {args.runtime})"
        )
    print(history.summary())
    print(f"per-step log: {log}")
    record = _write_run_record(args, manifest, ds, log, {label: history.epoch_accuracy})
    print(f"run record: {record}")
    if state is not None:
        print(f"device state: {args.state_dir} (step {history.last_step})")
    return 0


def _val_label(ds, manifest) -> str:
    """'test accuracy' on the digits' held-out split, 'validation <score>' on a hold-out
    of the user's data (the score follows the loss: ``device_tf.losses.metric_name``)."""
    from device_tf.losses import metric_name

    what = "test" if ds.kind == "digits" else "validation"
    return f"{what} {metric_name(manifest.loss)}"


def _write_run_record(args: argparse.Namespace, manifest, ds, log: Path, scores: dict) -> Path:
    """``<log>.run.json`` beside the per-step log: what the run trained (bundle, data and
    its class names, settings) and its per-epoch validation scores."""
    import json

    path = log.with_name(log.name.removesuffix(".jsonl") + ".run.json")
    doc = {
        "bundle": str(args.bundle),
        "model": manifest.model,
        "split_mode": manifest.split_mode,
        "loss": manifest.loss.model_dump(mode="json"),
        "runtime": args.runtime,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        **ds.record(),
        "per_epoch": scores,
        "step_log": str(log),
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _run_tfjs(args: argparse.Namespace, manifest, data, log: Path) -> int:
    """The TF.js device in Node: the same bundle, server, data and per-step log format."""
    import json
    import os
    import shutil
    import subprocess
    import tempfile

    import device_tf
    from device_tf.data import frames_dataset
    from shared_schema import SpliteasyError

    js = Path(device_tf.__file__).parent / "js"
    node = shutil.which("node")
    if node is None or not (js / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        raise SpliteasyError(
            f"the tfjs runtime needs node and the npm packages of {js} (run `make js`)"
        )
    x_tr, y_tr, x_te, y_te = data
    with tempfile.TemporaryDirectory(prefix="spliteasy-tfjs-") as tmp:
        train, test = Path(tmp) / "train.frames", Path(tmp) / "test.frames"
        js_log = Path(tmp) / "log.json"
        train.write_bytes(frames_dataset(x_tr, y_tr, manifest.input.name))
        if x_te is not None:
            test.write_bytes(frames_dataset(x_te, y_te, manifest.input.name))
        cmd = [
            node,
            str(js / "train.mjs"),
            "--bundle",
            str(args.bundle),
            "--server",
            args.server,
            "--data",
            str(train),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
            "--log-json",
            str(js_log),
        ]
        if x_te is not None:
            cmd += ["--eval-data", str(test)]
        if args.aux_label:
            cmd.append("--aux-label")
        if args.codec != "float32":
            cmd += ["--codec", args.codec]
        if args.state_dir is not None:
            cmd += ["--state-dir", str(args.state_dir)]
        cmd += ["--reconnect-timeout", str(args.reconnect_timeout)]
        if args.transport != "http":
            cmd += ["--transport", args.transport]
        if args.auth_key:
            cmd += ["--auth-key", args.auth_key]
        env = dict(os.environ)
        if args.ca_file is not None:  # Node's fetch verifies against its CAs plus these
            env["NODE_EXTRA_CA_CERTS"] = str(args.ca_file)
        if args.no_progress:
            cmd.append("--quiet")
        code = subprocess.call(cmd, env=env)
        if code == 0:  # the same per-step JSON lines as the Python runtimes write
            if not js_log.is_file():
                raise SpliteasyError("the TF.js device finished without writing its step log")
            records = json.loads(js_log.read_text())["records"]
            log.write_text("".join(json.dumps(r) + "\n" for r in records))
            print(f"per-step log: {log}")
    return 2 if code == 2 else code
