"""The user's own data on the Python device (issue #9, item 1): ``spliteasy train --data``.

A generated image folder (3 classes, png/jpeg/bmp/gif, sizes 8..24 px) trains split
exactly as unsplit tf_keras trains on the same decoded files and batches; each kind of
bad data is refused with one line naming the file, before anything reaches a server
(the server URL given is a closed port: any attempt to reach it would be another error).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from image_folders import make_image_folder

from split_helpers import SGD_CFG

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    from spliteasy_cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _bad_cases(root: Path) -> list[tuple[list[str], str]]:
    """(--data arguments, what the one-line error must say) for every bad-data case."""
    from PIL import Image

    img = Image.fromarray(np.full((12, 12, 3), 200, np.uint8))
    (root / "empty").mkdir()
    (root / "no_images" / "cats").mkdir(parents=True)
    (root / "no_images" / "cats" / "notes.txt").write_text("not an image")
    (root / "one_empty" / "a").mkdir(parents=True)
    (root / "one_empty" / "b").mkdir(parents=True)
    img.save(root / "one_empty" / "a" / "x.png")
    for name, cut in (("truncated", 60), ("garbage", 0)):
        d = root / name / "a"
        d.mkdir(parents=True)
        img.save(d / "ok.png")
        img.save(d / "bad.jpg", "JPEG")
        raw = (d / "bad.jpg").read_bytes()
        (d / "bad.jpg").write_bytes(raw[:cut] if cut else b"hello, not a jpeg")
    for i in range(11):
        (root / "eleven" / f"c{i:02d}").mkdir(parents=True)
        img.save(root / "eleven" / f"c{i:02d}" / "x.png")
    np.savez(root / "shape.npz", x=np.zeros((4, 9, 9, 1), np.float32), y=np.zeros(4, np.int32))
    np.savez(root / "no_y.npz", x=np.zeros((4, 8, 8, 1), np.float32))
    np.savez(root / "labels.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.arange(4) * 4)
    np.savez(root / "count.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(3, np.int32))
    (root / "pickle.npz").write_bytes(b"not a zip")
    return [
        ([str(root / "empty")], f"{root / 'empty'}: empty folder: no class subfolders"),
        ([str(root / "no_images")], f"{root / 'no_images' / 'cats'}: empty folder: no images"),
        ([str(root / "one_empty")], f"{root / 'one_empty' / 'b'}: empty folder"),
        ([str(root / "truncated")], f"{root / 'truncated' / 'a' / 'bad.jpg'}: unreadable or truncated image"),
        ([str(root / "garbage")], f"{root / 'garbage' / 'a' / 'bad.jpg'}: unreadable or truncated image"),
        ([str(root / "eleven")], "11 classes (c00, c01, c02, c03, c04, c05, ...), more than the model's 10 outputs"),
        ([str(root / "shape.npz")], "shape.npz: x has shape [4, 9, 9, 1], the model's input is ['N', 8, 8, 1]"),
        ([str(root / "no_y.npz")], "no_y.npz: no array y"),
        ([str(root / "labels.npz")], "labels.npz: labels span [0, 12], the model has 10 outputs"),
        ([str(root / "count.npz")], "count.npz: x has 4 samples but y has 3"),
        ([str(root / "pickle.npz")], "pickle.npz: not a readable .npz file"),
        ([str(root / "absent")], f"{root / 'absent'}: no such file or folder"),
        ([str(root / "eleven"), "--validation-split", "1.5"], "--validation-split must lie in [0, 1)"),
    ]  # fmt: skip


def test_bad_data_is_one_line_naming_the_file(digits_bundle_dir, tmp_path, capsys):
    for data_args, message in _bad_cases(tmp_path):
        code, out, err = in_process(
            capsys, "train", str(digits_bundle_dir), "--server", CLOSED, "--no-progress",
            "--reconnect-timeout", "0", "--log", str(tmp_path / "log.jsonl"), "--data", *data_args,
        )  # fmt: skip
        assert code == 2, (data_args, err)
        assert message in err, (message, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "log.jsonl").exists()  # refused before the run began


def test_folder_and_npz_load_deterministically(digits_bundle_dir, tmp_path):
    """Sorted classes and files, a seeded hold-out; an .npz of (N, H, W) takes its channel."""
    from device_tf.datasets import load_dataset
    from shared_schema import load_manifest

    manifest = load_manifest(digits_bundle_dir)
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    a = load_dataset(folder, manifest, validation_split=0.25, seed=3)
    b = load_dataset(folder, manifest, validation_split=0.25, seed=3)
    assert a.class_names == ["bottom", "left", "top"] and a.files == 12
    assert a.x_train.shape == (9, 8, 8, 1) and a.x_val.shape == (3, 8, 8, 1)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_val, b.y_val)
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0
    np.savez(tmp_path / "d.npz", x=a.x_train[..., 0], y=a.y_train, class_names=a.class_names)
    c = load_dataset(tmp_path / "d.npz", manifest)
    assert np.array_equal(c.x_train, a.x_train) and np.array_equal(c.y_train, a.y_train)
    assert c.class_names == a.class_names and c.x_val is None


def test_image_folder_trains_split_as_unsplit(digits_bundles, serve_bundle, tmp_path):
    """``spliteasy train --data FOLDER --validation-split`` (a real process against a real
    server): every step's loss equals unsplit tf_keras on the same decoded files and
    batches, and so does the validation accuracy; the class names are kept with the run."""
    from device_tf.data import batches
    from device_tf.datasets import load_dataset
    from device_tf.reference import accuracy, train_unsplit
    from shared_schema import load_manifest

    bundle, reference = digits_bundles("double", SGD_CFG)
    folder = make_image_folder(tmp_path / "imgs", per_class=16)
    srv = serve_bundle(bundle)
    log, state = tmp_path / "steps.jsonl", tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-m", "spliteasy_cli.main", "train", str(bundle), "--server", srv.url,
         "--data", str(folder), "--validation-split", "0.25", "--epochs", "2", "--batch-size", "8",
         "--log", str(log), "--state-dir", str(state), "--no-progress"],
        capture_output=True, text=True, timeout=600, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    split_losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(split_losses) == 10  # 36 training images, batch 8, 2 epochs
    run = json.loads((tmp_path / "steps.run.json").read_text())
    assert run["class_names"] == ["bottom", "left", "top"] and run["n_validation"] == 12
    session = json.loads((state / "session.json").read_text())
    assert session["data"]["class_names"] == ["bottom", "left", "top"]

    manifest = load_manifest(bundle)
    ds = load_dataset(folder, manifest, validation_split=0.25, seed=0)
    all_batches = [b for e in range(2) for b in batches(ds.x_train, ds.y_train, 8, e, 0)]
    ref_losses = train_unsplit(reference, all_batches, manifest.optimizer, manifest.loss)
    errs = [abs(s - r) / abs(r) for s, r in zip(split_losses, ref_losses, strict=True)]
    print(f"\nimage folder, 10 steps: loss rel errors max {max(errs):.1e}")
    assert max(errs) < 1e-4, (split_losses, ref_losses)
    split_acc = float(result.stdout.split("validation accuracy")[1].split()[0])
    assert split_acc == pytest.approx(accuracy(reference, ds.x_val, ds.y_val), abs=1e-9)
    assert run["per_epoch"]["validation accuracy"][-1] == split_acc


@pytest.mark.js
def test_node_device_takes_the_same_folder(tmp_path, serve_app, digits_bundles):
    """``node train.mjs --data FOLDER``: decoded by ``spliteasy data`` (the Python device's
    decoding), trained in file order like unsplit tf_keras on the same images; a bad folder
    is the same one-line error, exit status 2."""
    from js_fixtures import node, run_node

    from device_tf.datasets import load_dataset
    from device_tf.reference import train_unsplit
    from server_torch.app import create_app
    from shared_schema import load_manifest
    from split_helpers import ALL_RUNTIMES

    node()
    bundle, reference = digits_bundles("double", SGD_CFG, ALL_RUNTIMES)
    manifest = load_manifest(bundle)
    folder = make_image_folder(tmp_path / "imgs", per_class=8)
    ds = load_dataset(folder, manifest)
    in_order = [(ds.x_train[i : i + 8], ds.y_train[i : i + 8]) for i in range(0, 24, 8)]
    ref_losses = train_unsplit(reference, in_order, manifest.optimizer, manifest.loss)
    srv = serve_app(create_app(bundle))
    log = tmp_path / "log.json"
    proc = run_node(
        ["train.mjs", "--bundle", str(bundle), "--server", srv.url, "--data", str(folder)]
        + ["--batch-size", "8", "--log-json", str(log)]
    )
    assert "3 classes (bottom, left, top), decoded by spliteasy data" in proc.stdout, proc.stdout
    losses = [r["loss"] for r in json.loads(log.read_text())["records"]]
    errs = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
    print(f"\nnode, image folder: loss rel errors {[f'{e:.1e}' for e in errs]}")
    assert max(errs) < 1e-4, (losses, ref_losses)

    (tmp_path / "empty").mkdir()
    import subprocess

    from js_fixtures import JS_DIR

    bad = subprocess.run(
        ["node", "train.mjs", "--bundle", str(bundle), "--server", srv.url,
         "--data", str(tmp_path / "empty")],
        cwd=JS_DIR, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert f"{tmp_path / 'empty'}: empty folder: no class subfolders" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
