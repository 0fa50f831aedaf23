"""The manifest models, the exported JSON Schema and bundle integrity checks."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared_schema import ManifestError, TensorSpec, load_manifest
from shared_schema.export_schema import render
from shared_schema.manifest import MANIFEST_FILE


def test_exported_schema_file_is_up_to_date():
    from pathlib import Path

    import shared_schema

    committed = Path(shared_schema.__file__).with_name("manifest.schema.json").read_text()
    assert committed == render(), "run `make schema` and commit shared_schema/manifest.schema.json"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": [8, 8, 8, 1], "layout": "NHWC"},  # batch dimension must be free
        {"shape": [None, 8, 8], "layout": "NHWC"},  # rank disagrees with layout
        {"shape": [None, 0, 8, 1], "layout": "NHWC"},
    ],
)
def test_tensor_spec_rejects_nonsense(kwargs):
    with pytest.raises(ValidationError):
        TensorSpec(name="t", **kwargs)


def test_bytes_per_sample():
    assert TensorSpec(name="t", shape=[None, 4, 4, 32], layout="NHWC").bytes_per_sample == 2048


def test_bundle_hashes_are_checked(digits_bundle_dir, tmp_path):
    import shutil

    import jsonschema

    copy = tmp_path / "bundle"
    shutil.copytree(digits_bundle_dir, copy)
    manifest = load_manifest(copy)
    schema = json.loads(render())
    jsonschema.validate(json.loads((copy / MANIFEST_FILE).read_text()), schema)
    assert [s.name for s in manifest.slices] == ["A", "B", "C"]
    weights = copy / "B" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match="weights.safetensors"):
        load_manifest(copy)
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="invalid manifest"):
        load_manifest(copy, verify=False)
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)
