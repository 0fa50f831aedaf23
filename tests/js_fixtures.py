"""What the TF.js device tests share: running node on device_tf/js, and its data files.

The JS device reads training data as a spliteasy frame message (``device_tf/js/src/data.mjs``):
an ``x`` frame (float32, NHWC) and a LABELS frame ``y`` (int32). ``write_frames_dataset``
writes one from numpy with the wire codec, in the order the batches are to be taken.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest

JS_DIR = Path(__file__).resolve().parents[1] / "device_tf" / "js"


def node() -> str:
    """The node executable, with the harness' npm packages installed (``make js``)."""
    exe = shutil.which("node")
    if exe is None:
        pytest.fail("node (20+) is not on PATH; the TF.js device tests need it (see README)")
    if not (JS_DIR / "node_modules" / "@tensorflow" / "tfjs").is_dir():
        pytest.fail(f"npm packages missing in {JS_DIR}: run `make js` (npm ci)")
    return exe


def chromium() -> str:
    """Debian's chromium for the browser device tests (``make browser``)."""
    exe = os.environ.get("SPLITEASY_CHROMIUM") or shutil.which("chromium")
    if not exe:
        pytest.fail(
            "Debian chromium is not installed: run `make browser` (apt-get install chromium)"
        )
    return exe


def has_route(url: str) -> bool:
    """Whether ``url`` answers 200: a server built without a route answers 404."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def run_node(args: Sequence[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``node ARGS`` in device_tf/js; a non-zero exit fails the test with node's output."""
    proc = subprocess.run(
        [node(), *args], cwd=JS_DIR, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"node {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def write_frames_dataset(path: Path, x: np.ndarray, y: np.ndarray, name: str = "image") -> Path:
    """x (float32, NHWC or NC) and y (int32 labels) as a JS device data file."""
    from device_tf.data import frames_dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(frames_dataset(x, y, name))
    return path


def write_batches(path: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Batches, in order, as one data file: the JS device takes them back in file order."""
    batches = list(batches)
    return write_frames_dataset(
        path, np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    )
