"""Where the installed packages keep files the server serves (the device's browser page).

The server serves ``device_tf/js`` at ``/device/`` but must not import the device
package: the directory is found by the package's name, without importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEVICE_PACKAGE = "device_tf"


def device_page_dir() -> Path | None:
    """``device_tf/js`` of the installed (or checked-out) device package, if present."""
    spec = importlib.util.find_spec(DEVICE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    js = Path(next(iter(spec.submodule_search_locations))) / "js"
    return js if js.is_dir() else None
