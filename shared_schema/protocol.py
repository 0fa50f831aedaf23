"""The wire contract's constants, read from ``protocol.json`` (their one source).

Python builds its frame constants (``frame.py``), error statuses (``server_torch.errors``)
and manifest rules (``manifest.py``) from here; the JS device's test
(``device_tf/js/test/protocol.test.mjs``) asserts its modules hold the same values, so
the two codecs cannot drift apart silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROTOCOL_FILE = Path(__file__).with_name("protocol.json")
PROTOCOL: dict[str, Any] = json.loads(PROTOCOL_FILE.read_text())

FRAME: dict[str, Any] = PROTOCOL["frame"]
FRAME_KINDS: dict[str, int] = dict(FRAME["kinds"])
FRAME_DTYPES: dict[int, str] = {int(k): v for k, v in FRAME["dtypes"].items()}
FRAME_LAYOUTS: dict[int, str] = {int(k): v for k, v in FRAME["layouts"].items()}

CODECS: dict[str, Any] = PROTOCOL["codecs"]  # wire compression (shared_schema/codec.py)

ERROR_STATUS: dict[str, int] = {k: v for k, v in PROTOCOL["errors"].items() if k[0] != "$"}
RETRY_AFTER: dict[str, int] = dict(PROTOCOL["retry_after_seconds"])

MANIFEST_RULES: dict[str, Any] = PROTOCOL["manifest"]
LAYOUT_RANK: dict[str, int] = dict(MANIFEST_RULES["layout_rank"])
SPLIT_MODES: dict[str, dict[str, Any]] = MANIFEST_RULES["split_modes"]
SLICE_SIDE: dict[str, str] = dict(MANIFEST_RULES["slice_side"])


def status_of(code: str) -> int:
    """The HTTP status of an error code; an unknown code is a programming error."""
    try:
        return ERROR_STATUS[code]
    except KeyError:
        raise KeyError(f"error code {code!r} is not in {PROTOCOL_FILE.name}") from None
