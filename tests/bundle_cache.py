"""Converted bundles, once per configuration: an on-disk cache keyed by what the converter reads.

A conversion (slicing, tf2onnx, onnx2torch, verification, SavedModel/TF.js/TFLite
export) is the slowest thing the suite does -- 5-10 s for digits, 20-70 s for a zoo
network -- and most tests only need *a* bundle of a given configuration. So each
configuration is converted once and kept:

- **Key.** sha256 over (1) the model: its JSON config and every initial weight's bytes,
  so another seed or architecture is another bundle; (2) the conversion's arguments:
  cuts, optimizer, runtimes, loss form, model name, verification settings; (3) the
  converter's sources: ``converters/``, ``shared_schema/``, ``server_torch``'s passes and
  the modules they import, ``device_tf/keras_util.py``; (4) the versions of the
  toolchain packages. Any edit to the converter is a new key, never a stale bundle.
- **Where.** ``$SPLITEASY_TEST_CACHE`` or ``<repo>/.cache/bundles/`` (gitignored):
  ``<key>/bundle/`` (the bundle) and ``<key>/entry.json`` (what it was made from).
  ``SPLITEASY_TEST_CACHE=off`` keeps the bundles in a temporary directory for this
  process only (still one conversion per configuration per process).
- **Concurrency.** One ``fcntl`` lock per key: under pytest-xdist (or two pytest runs)
  the first worker converts and the others wait and reuse. The entry appears by an
  atomic rename of a finished directory, so a killed run never leaves half a bundle.
- **Integrity.** A bundle is read-only for tests (copy it before tampering:
  ``copy_bundle``). Every process checks an entry once before reusing it
  (``load_manifest`` re-hashes every artefact); a tampered or torn entry is rebuilt.
- **Pruning.** Entries unused for ``PRUNE_DAYS`` are removed at most once per process.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV = "SPLITEASY_TEST_CACHE"
PRUNE_DAYS = 7
ALL_RUNTIMES = ("tf", "tfjs", "tflite")

# What the converter reads besides its arguments. The server's app, sessions and
# trainer are not here: they never touch a bundle's bytes.
SOURCES = (
    "converters",
    "shared_schema",
    "server_torch/passes",
    "server_torch/__init__.py",
    "server_torch/keras_compat.py",
    "server_torch/spec.py",
    "server_torch/rebuild.py",
    "device_tf/__init__.py",
    "device_tf/keras_util.py",
)
TOOLCHAIN = (
    "tensorflow",
    "tf-keras",
    "torch",
    "onnx",
    "onnx2torch",
    "tf2onnx",
    "tensorflowjs",
    "numpy",
    "pydantic",
)

_verified: dict[str, Path] = {}
_tmp_root: Path | None = None
_pruned = False


def cache_root() -> Path:
    """The cache directory (created); a per-process temporary one when the cache is off."""
    global _tmp_root
    setting = os.environ.get(ENV, "")
    if setting.lower() in ("off", "0", "no", "false"):
        if _tmp_root is None:
            _tmp_root = Path(tempfile.mkdtemp(prefix="spliteasy-bundles-"))
            atexit.register(shutil.rmtree, _tmp_root, True)
        return _tmp_root
    root = Path(setting) if setting else REPO / ".cache" / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sources_digest() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        path = REPO / rel
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".json") and "__pycache__" not in f.parts:
                h.update(f.relative_to(REPO).as_posix().encode() + b"\0")
                h.update(hashlib.sha256(f.read_bytes()).digest())
    for dist in TOOLCHAIN:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{dist}=={version}\0".encode())
    return h.hexdigest()


def model_digest(model: Any) -> str:
    """sha256 of a tf_keras model's config and of every variable's bytes, in order."""
    h = hashlib.sha256(model.to_json().encode())
    for w in model.weights:
        arr = w.numpy()
        h.update(f"{w.name}|{arr.dtype.str}|{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def canonical_runtimes(runtimes: Sequence[str]) -> tuple[str, ...]:
    """``write_bundle`` always adds ``tf``; the order of the rest changes nothing."""
    unknown = set(runtimes) - set(ALL_RUNTIMES)
    if unknown:
        raise ValueError(f"unknown runtimes {sorted(unknown)}")
    return tuple(r for r in ALL_RUNTIMES if r == "tf" or r in runtimes)


def bundle_key(model: Any, cuts: Sequence[str], **convert_args: Any) -> tuple[str, dict]:
    """(key, the JSON description it hashes) for ``write_bundle(model, cuts, **convert_args)``."""
    args = dict(convert_args)
    if "optimizer" in args and hasattr(args["optimizer"], "model_dump"):
        args["optimizer"] = args["optimizer"].model_dump()
    args["runtimes"] = list(canonical_runtimes(args.get("runtimes", ("tf",))))
    what = {
        "model": model_digest(model),
        "model_class": type(model).__name__,
        "cuts": list(cuts),
        "args": args,
        "sources": _sources_digest(),
    }
    blob = json.dumps(what, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32], what


@contextlib.contextmanager
def _locked(root: Path, key: str) -> Iterator[None]:
    with open(root / f"{key}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _usable(bundle: Path) -> bool:
    from shared_schema import load_manifest

    if not (bundle / "manifest.json").is_file():
        return False
    try:
        load_manifest(bundle)  # re-hashes every artefact the manifest lists
    except Exception:
        return False
    return True


def _prune(root: Path) -> None:
    global _pruned
    if _pruned:
        return
    _pruned = True
    horizon = time.time() - PRUNE_DAYS * 86400
    for entry in root.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.stat().st_mtime < horizon:
            with _locked(root, entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            (root / f"{entry.name}.lock").unlink(missing_ok=True)
        elif entry.name.startswith(".tmp-") and entry.stat().st_mtime < time.time() - 86400:
            shutil.rmtree(entry, ignore_errors=True)  # a run killed mid-conversion


def converted(model: Any, cuts: Sequence[str], **convert_args: Any) -> Path:
    """The bundle ``write_bundle(model, cuts, out, **convert_args)`` writes, from the cache.

    Read-only: copy it (``copy_bundle``) before changing anything in it.
    """
    from converters.bundle import write_bundle

    convert_args["runtimes"] = canonical_runtimes(convert_args.get("runtimes", ("tf",)))
    key, what = bundle_key(model, cuts, **convert_args)
    if key in _verified:
        return _verified[key]
    root = cache_root()
    _prune(root)
    entry = root / key
    bundle = entry / "bundle"
    with _locked(root, key):
        if not _usable(bundle):
            shutil.rmtree(entry, ignore_errors=True)
            tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            try:
                started = time.perf_counter()
                write_bundle(model, list(cuts), tmp / "bundle", **convert_args)
                what["seconds"] = round(time.perf_counter() - started, 2)
                (tmp / "entry.json").write_text(json.dumps(what, indent=1, default=str) + "\n")
                tmp.rename(entry)  # atomic: the entry is whole or absent
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        os.utime(entry)  # recently used: kept by the pruning
    _verified[key] = bundle
    return bundle


def copy_bundle(bundle: Path, out: Path) -> Path:
    """A private, writable copy of a cached bundle at ``out`` (absent or an empty dir)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    shutil.copytree(bundle, out, dirs_exist_ok=True)
    return out
