"""Which Keras layer classes spliteasy carries, where, and why not (``layers.json``).

The one table the converters' checks (``converters/cuts.py``, ``export/tfjs.py``,
``export/tflite.py``) read, and the JS device's test compares ``layers.mjs`` with.
Framework-free: only names and reasons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LAYERS_FILE = Path(__file__).with_name("layers.json")
TABLE: dict[str, Any] = json.loads(LAYERS_FILE.read_text())

_LAYERS: dict[str, dict[str, str]] = TABLE["layers"]
# every class some slice may hold (A/C on the device, B on the server)
CARRIED_LAYERS: frozenset[str] = frozenset(_LAYERS)
RESEEDED_LAYERS: frozenset[str] = frozenset(TABLE["random"]["reseeded"])
UNREPEATABLE_LAYERS: frozenset[str] = frozenset(TABLE["random"]["unrepeatable"])
RANDOM_LAYERS: frozenset[str] = RESEEDED_LAYERS | UNREPEATABLE_LAYERS
# the carried classes whose training output is deterministic (some still only in A/C:
# DEVICE_ONLY_LAYERS); the random ones are the device's (RESEEDED_LAYERS)
SUPPORTED_LAYERS: frozenset[str] = CARRIED_LAYERS - RANDOM_LAYERS
# class -> why slice B (the server) cannot train it; A and C can
DEVICE_ONLY_LAYERS: dict[str, str] = {n: e["B"] for n, e in _LAYERS.items() if "B" in e}
# class -> why TFLite's slice A cannot hold it (A's train() recomputes the forward)
TFLITE_NOT_IN_A: dict[str, str] = {n: e["tflite_A"] for n, e in _LAYERS.items() if "tflite_A" in e}
# class -> why TF.js cannot hold it in A or C (convert --runtimes tfjs refuses it)
TFJS_REFUSED: dict[str, str] = {n: e["tfjs"] for n, e in _LAYERS.items() if "tfjs" in e}
SUPPORTED_ACTIVATIONS: frozenset[str] = frozenset(TABLE["activations"])
REFUSED_WHY: dict[str, str] = dict(TABLE["refused"])
TFJS_LAYER_CLASSES: frozenset[str] = frozenset(TABLE["tfjs_classes"]["classes"])

__all__ = [
    "CARRIED_LAYERS",
    "DEVICE_ONLY_LAYERS",
    "RANDOM_LAYERS",
    "REFUSED_WHY",
    "RESEEDED_LAYERS",
    "SUPPORTED_ACTIVATIONS",
    "SUPPORTED_LAYERS",
    "TABLE",
    "TFJS_LAYER_CLASSES",
    "TFJS_REFUSED",
    "TFLITE_NOT_IN_A",
    "UNREPEATABLE_LAYERS",
]
