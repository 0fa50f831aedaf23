"""The device page trains on a folder the user picks (issue #9, item 2), in headless Chromium.

The page's folder picker (<input webkitdirectory>) is handed a generated image folder
(3 classes, png/bmp/gif/jpeg, 8-24 px) as a user would pick it
(``tools/browser_run.mjs --pick-folder``); the page decodes the images itself
(createImageBitmap, tf.browser.fromPixels, resize to the model input; page_data.mjs),
labels them from the folder names and trains. Its losses and every variable of A, B and
C equal unsplit tf_keras trained on the same files decoded by the Python device
(``device_tf.datasets``), in file order, within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from image_folders import make_image_folder
from js_fixtures import chromium, has_route, node, run_node

from split_helpers import ALL_RUNTIMES, SGD_CFG, rel

pytestmark = [pytest.mark.js, pytest.mark.browser]

TOL = 1e-4
BATCH = 8
SCHEMA = Path(__file__).resolve().parents[1] / "shared_schema" / "manifest.schema.json"


def test_page_trains_on_a_picked_image_folder(tmp_path, serve_app, page_files, digits_bundles):
    from device_tf.data import batches
    from device_tf.datasets import load_dataset
    from device_tf.keras_util import named_variables
    from device_tf.reference import train_unsplit
    from server_torch.app import create_app
    from server_torch.rebuild import keras_weights
    from server_torch.spec import TorchSpec
    from shared_schema import load_manifest

    node()
    browser = chromium()
    bundle, reference = digits_bundles("double", SGD_CFG, ALL_RUNTIMES)
    manifest = load_manifest(bundle)
    folder = make_image_folder(tmp_path / "photos", per_class=8)
    ds = load_dataset(folder, manifest)  # the Python device's decoding, file order
    file_order = list(batches(ds.x_train, ds.y_train, BATCH, epoch=0, seed=0))
    in_order = [
        (ds.x_train[i : i + BATCH], ds.y_train[i : i + BATCH])
        for i in range(0, len(ds.x_train), BATCH)
    ]
    assert len(in_order) == len(file_order) == 3
    ref_losses = train_unsplit(reference, in_order, manifest.optimizer, manifest.loss)

    app = create_app(bundle)
    srv = serve_app(app)
    query = f"batch={BATCH}&epochs=1"
    if not has_route(f"{srv.url}/v1/schema"):
        schema = page_files(".schema.json")
        shutil.copyfile(SCHEMA, schema)
        query += f"&schema=../data/{schema.name}"
    url = f"{srv.url}/device/web/?{query}"
    proc = run_node(
        ["tools/browser_run.mjs", url, "--chromium", browser, "--timeout", "240000"]
        + ["--pick-folder", str(folder)]
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result = out["result"]
    assert result is not None and result["status"] == "done", json.dumps(out, indent=1)[:4000]
    assert not out["errors"], out["errors"]
    assert result["data"] == {"source": "photos", "classes": ["bottom", "left", "top"], "count": 24}

    losses = result["losses"]
    errs = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
    print(f"\npicked folder in the page: loss rel errors vs unsplit {[f'{e:.1e}' for e in errs]}")
    assert max(errs) <= TOL, (losses, ref_losses)

    expected = {k: v.numpy() for k, v in named_variables(reference).items()}
    got = keras_weights(app.state.trainer.module, TorchSpec.load(bundle / "B"))
    for held in result["weights"].values():
        for name, w in held.items():
            got[name] = np.asarray(w["data"], np.float32).reshape(w["shape"])
    assert set(got) == set(expected), set(got) ^ set(expected)
    errors = {name: rel(got[name], expected[name]) for name in got}
    worst = max(errors, key=errors.get)
    print(f"  page + server vs unsplit: largest weight rel err {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
