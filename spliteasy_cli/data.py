"""``spliteasy data``: the user's own data as a frames file, for the TF.js device in Node.

Node has no image decoder in the pinned install set (TF.js' Node bindings need a native
binary download), so a folder of images is decoded once here, by the Python device's own
code (``device_tf.datasets``: the same TensorFlow decoding, resizing and labels as
``spliteasy train --data``), and written as the frames file ``node train.mjs --data``
reads. ``node train.mjs --data FOLDER`` runs this command itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Decode a folder of images (or an .npz) for a bundle into a frames file for the TF.js device."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "bundle",
        help="bundle directory, or the URL of a spliteasy server (its /v1/manifest is read)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="a folder of images in class subfolders, an .npz with x and y, or 'digits'",
    )
    p.add_argument("--out", type=Path, required=True, help="frames file to write (train part)")
    p.add_argument(
        "--validation-split",
        type=float,
        default=None,
        metavar="F",
        help="hold out this fraction (seeded) into <out stem>.val.frames",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the validation hold-out")


def _manifest(where: str):
    import json
    import urllib.request

    from shared_schema import Manifest, SpliteasyError, load_manifest

    if where.startswith(("http://", "https://")):
        url = where.rstrip("/") + "/v1/manifest"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return Manifest.model_validate(json.loads(r.read()))
        except (OSError, ValueError) as exc:
            raise SpliteasyError(f"cannot read the manifest from {url}: {exc}") from exc
    return load_manifest(where)


def run(args: argparse.Namespace) -> int:
    import json

    from device_tf.datasets import load_dataset, write_frames

    manifest = _manifest(args.bundle)
    ds = load_dataset(args.data, manifest, validation_split=args.validation_split, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_frames(ds, args.out, manifest.input.name)
    written = [str(args.out)]
    if ds.x_val is not None:
        val = args.out.with_name(args.out.stem + ".val.frames")
        write_frames(ds, val, manifest.input.name, validation=True)
        written.append(str(val))
    print(json.dumps({"written": written, **ds.record()}))
    return 0
