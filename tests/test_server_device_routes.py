"""Routes a device page needs besides the step protocol: the schema and demo data."""

from __future__ import annotations

import httpx
import numpy as np


def test_schema_and_demo_data(digits_bundle_dir, serve_app):
    import jsonschema

    from server_torch.app import create_app
    from shared_schema import FrameKind, decode, json_schema, load_manifest

    srv = serve_app(create_app(digits_bundle_dir))
    schema = httpx.get(f"{srv.url}/v1/schema").json()
    assert schema == json_schema()
    jsonschema.validate(httpx.get(f"{srv.url}/v1/manifest").json(), schema)

    reply = httpx.get(f"{srv.url}/v1/demo/digits.frames")
    assert reply.status_code == 200
    x, y = decode(reply.content)
    manifest = load_manifest(digits_bundle_dir)
    assert x.kind == FrameKind.ACTIVATION and x.name == manifest.input.name
    assert x.array.shape[1:] == manifest.input.sample_shape and y.kind == FrameKind.LABELS
    assert len(x.array) == len(y.array) == 1437 and set(np.unique(y.array)) == set(range(10))
    assert x.array.min() >= 0.0 and x.array.max() <= 1.0
