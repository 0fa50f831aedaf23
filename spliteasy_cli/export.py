"""``spliteasy export``: the trained model out of a split run, as one unsplit tf_keras model."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Write the trained, unsplit model (SavedModel; TFLite, TF.js on request) from a run's state."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="the bundle the run trained")
    p.add_argument(
        "--server-state",
        type=Path,
        help="the server's state dir ('spliteasy serve --state-dir'); default: serve's "
        "default, runs/serve-<12 hex of the manifest sha256>/",
    )
    p.add_argument(
        "--device-state",
        type=Path,
        required=True,
        help="the device's state dir ('spliteasy train --state-dir')",
    )
    p.add_argument("--out", type=Path, required=True, help="where the SavedModel is written")
    p.add_argument(
        "--formats",
        default="savedmodel",
        help="comma list: savedmodel (always), tflite (OUT/model.tflite), tfjs (OUT/tfjs/)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-5,
        help="largest relative error accepted between the export and split inference",
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the check against split inference"
    )
    p.add_argument(
        "--allow-step-mismatch",
        action="store_true",
        help="export even if the server checkpoint and the device snapshot hold different steps",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from converters.export.trained import export_trained
    from server_torch.checkpoint import default_state_dir
    from shared_schema import SpliteasyError, load_manifest, manifest_digest

    load_manifest(args.bundle, verify=False)  # "not a bundle" before anything else
    server_state = args.server_state or default_state_dir(manifest_digest(args.bundle))
    if args.server_state is None and not server_state.is_dir():
        raise SpliteasyError(
            f"no server state at {server_state} (the default of 'spliteasy serve' for this "
            "bundle, relative to this directory); pass --server-state DIR"
        )
    result = export_trained(
        args.bundle,
        server_state,
        args.device_state,
        args.out,
        formats=args.formats,
        overwrite=args.force,
        verify=not args.no_verify,
        tol=args.tol,
        allow_step_mismatch=args.allow_step_mismatch,
    )
    rec = result.record
    if "warning" in rec:
        print(f"spliteasy export: warning: {rec['warning']}", file=sys.stderr)
    print(f"wrote the trained {rec['model']} model to {result.out} (tf_keras SavedModel)")
    for fmt, rel in rec["formats"].items():
        if fmt != "savedmodel":
            print(f"  {fmt}: {result.out / rel}")
    print(
        f"  from server checkpoint {Path(rec['server_checkpoint']['path']).name} "
        f"(B at step {rec['server_checkpoint']['steps']}) and device snapshot "
        f"{Path(rec['device_snapshot']['path']).name}/ (step {rec['device_snapshot']['step']})"
    )
    ver = rec["verification"]
    if "split_vs_unsplit_rel_err" in ver:
        print(
            f"  equals split inference within {ver['split_vs_unsplit_rel_err']:.1e} relative "
            f"on {ver['samples']} probe inputs"
            + (f"; TFLite within {ver['tflite_rel_err']:.1e}" if "tflite_rel_err" in ver else "")
        )
    print(f"  load it with tf_keras.models.load_model({str(result.out)!r}); details in export.json")
    return 0
