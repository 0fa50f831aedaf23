"""Pick a device runtime by name; each runtime's imports stay behind its name."""

from __future__ import annotations

from pathlib import Path

from shared_schema import Manifest

from ._exceptions import DeviceError
from .runtime import DeviceRuntime

RUNTIMES = ("tf", "tflite")


def make_runtime(
    name: str, bundle: Path, manifest: Manifest, *, recompute_a: bool = False
) -> DeviceRuntime:
    """``recompute_a``: recompute A's forward in its backward (``tf.recompute_grad``),
    so A's inner activations are not held across the round trip; Python TF only."""
    if name == "tf":
        from .tf_runtime import TFRuntime

        return TFRuntime.from_bundle(bundle, manifest, recompute_a=recompute_a)
    if recompute_a:
        raise DeviceError(f"--recompute-a is offered by the tf runtime only, not {name}")
    if name == "tflite":
        from .tflite_runtime import TFLiteRuntime

        return TFLiteRuntime.from_bundle(bundle, manifest)
    raise DeviceError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
