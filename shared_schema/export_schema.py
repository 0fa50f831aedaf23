"""Writes the manifest's JSON Schema beside this module (``python -m shared_schema.export_schema``).

The schema file is committed so non-Python devices (the TF.js harness) validate bundles
against the very models the server uses; a test keeps it in step with the models.
"""

import json
from pathlib import Path

from . import SCHEMA_FILE, json_schema


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    path = Path(__file__).with_name(SCHEMA_FILE)
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
