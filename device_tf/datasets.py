"""The user's own training data, read on the device: a folder of images, an .npz, or digits.

``spliteasy train BUNDLE --data PATH`` takes

- a folder of images in class subfolders (tf_keras' ``image_dataset_from_directory``
  convention: ``PATH/<class>/<image>``, jpeg/png/bmp/gif, any depth below the class
  folder), decoded and resized here with TensorFlow; the labels are the indices of the
  sorted class folder names;
- an ``.npz`` with arrays ``x`` (samples in the model's input shape) and ``y``;
- ``digits`` (scikit-learn's bundled 8x8 digits, resized to the input: the default).

Nothing here leaves the device: images become float32 arrays in memory, and only cut
tensors ever go to the server. Everything is deterministic -- files in sorted order, the
validation hold-out a seeded permutation -- so batches stay a pure function of (seed,
epoch, position) (``data.batch_at``) and a resumed run sees the same data (the state dir
records its sha256).

Pixels are scaled to [0, 1] (as the digits are): decoded as uint8 RGB (RGBA for a 4-channel
input; JPEG with the accurate integer IDCT, as libjpeg and browsers decode it), divided by
255 in float32, resized bilinearly with half-pixel centres
(``tf.image.resize``), and turned grey with ``tf.image.rgb_to_grayscale``'s weights for a
1-channel input. The browser page does the same steps with TF.js, so a PNG decodes to
the same floats on both.

Labels follow the bundle's loss (``manifest.labels``): class indices (int32) for sparse
categorical cross-entropy, one-hot float32 rows for categorical cross-entropy, 0/1
columns for binary cross-entropy (one output unit: two classes; several: one-hot as
multi-label targets), and regression targets only from an ``.npz``.

Bad data is a :class:`DataError` (one line, naming the file and the problem) raised
before any session is opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared_schema import Manifest

from ._exceptions import DeviceError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# tf.image.rgb_to_grayscale's weights (ITU-R BT.601), in float32 as TF applies them.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Seed-stream tag of the validation hold-out, apart from the epochs' shuffles.
_HOLDOUT_STREAM = 0x5EED


class DataError(DeviceError):
    """Training data that cannot be used; the message names the file and the problem."""


@dataclass
class Dataset:
    """Arrays ready for ``fit``: x in the model's input shape (float32), y as the loss
    wants it (``manifest.labels``); the validation part is None without a hold-out."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    source: str
    kind: str  # "digits", "folder" or "npz"
    class_names: list[str] | None = None
    validation_split: float = 0.0
    files: int = 0  # images read (a folder)
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What the run record keeps about its data (class names included)."""
        return {
            "data": self.source,
            "kind": self.kind,
            "class_names": self.class_names,
            "n_train": int(len(self.x_train)),
            "n_validation": 0 if self.x_val is None else int(len(self.x_val)),
            "validation_split": self.validation_split,
        }

    def describe(self) -> str:
        val = "" if self.x_val is None else f", {len(self.x_val)} held out for validation"
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return f"data {self.source}: {len(self.x_train)} training samples{val}{classes}"


# -- entry point -----------------------------------------------------------------------


def load_dataset(
    data: str | Path,
    manifest: Manifest,
    *,
    validation_split: float | None = None,
    seed: int = 0,
) -> Dataset:
    """Read ``data`` (``digits``, a folder or an ``.npz``) for ``manifest``'s model.

    ``validation_split`` (``[0, 1)``) holds out that fraction; None means the digits'
    usual 20 % test split, and nothing held out of the user's own data.
    """
    if validation_split is not None and not 0.0 <= validation_split < 1.0:
        raise DataError(f"--validation-split must lie in [0, 1), got {validation_split}")
    if str(data) == "digits":
        return _digits(manifest, 0.2 if validation_split is None else validation_split, seed)
    path = Path(data)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder (give a folder of images, an .npz or 'digits')"
        )
    split = validation_split or 0.0
    if path.is_dir():
        x, y_index, names, files = read_image_folder(path, manifest.input.sample_shape)
        y = labels_from_classes(y_index, names, manifest, path)
        ds = Dataset(x, y, None, None, str(path), "folder", names, split, files)
    elif path.suffix.lower() == ".npz":
        x, y, names = read_npz(path, manifest)
        ds = Dataset(x, y, None, None, str(path), "npz", names, split)
    else:
        raise DataError(f"{path}: not a folder of images or an .npz file")
    if split > 0:
        _hold_out(ds, split, seed)
    return ds


def _digits(manifest: Manifest, split: float, seed: int) -> Dataset:
    from shared_schema.demo_data import fit_to_input, load_digits_split

    if manifest.num_classes < 10 and manifest.loss.name in _CLASS_LOSSES:
        raise DataError(f"digits: 10 classes, but the model has {manifest.num_classes} outputs")
    if manifest.loss.name in _REGRESSION_LOSSES:
        raise DataError(f"digits: class labels cannot train a {manifest.loss.name} model")
    names = [str(i) for i in range(10)]
    if split > 0:
        x_tr, y_tr, x_te, y_te = load_digits_split(test_fraction=split, seed=seed)
        x_te = fit_to_input(x_te, manifest.input.sample_shape)
        y_te = labels_from_classes(y_te, names, manifest, Path("digits"))
    else:
        x_tr, y_tr, _, _ = load_digits_split(seed=seed)
        x_te = y_te = None
    x_tr = fit_to_input(x_tr, manifest.input.sample_shape)
    y_tr = labels_from_classes(y_tr, names, manifest, Path("digits"))
    return Dataset(x_tr, y_tr, x_te, y_te, "digits", "digits", names, split)


def _hold_out(ds: Dataset, split: float, seed: int) -> None:
    """Move a seeded ``split`` fraction of ``ds``'s training samples to validation; the
    rest keep their order (the epochs shuffle them)."""
    n = len(ds.x_train)
    n_val = int(round(n * split))
    if n_val < 1 or n - n_val < 1:
        raise DataError(
            f"{ds.source}: {n} samples cannot be split {1 - split:.2f}/{split:.2f} "
            "(both parts need at least one sample)"
        )
    order = np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(n)
    val = np.sort(order[:n_val])
    keep = np.ones(n, bool)
    keep[val] = False
    ds.x_val, ds.y_val = ds.x_train[val], ds.y_train[val]
    ds.x_train, ds.y_train = ds.x_train[keep], ds.y_train[keep]


# -- image folders ----------------------------------------------------------------------


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(file, class index)] in sorted order) of ``root``.

    Files with other suffixes are skipped, as tf_keras does; a folder without class
    subfolders, or a class folder without images, is an error naming it.
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root}: empty folder: no class subfolders (expected {root}/<class>/<image>)"
        )
    items: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            raise DataError(
                f"{root / name}: empty folder: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})"
            )
        items.extend((p, index) for p in found)
    return classes, items


def decode_image(path: Path, sample_shape: tuple[int, ...]) -> np.ndarray:
    """One image file -> float32 (H, W, C) in [0, 1] for an input of ``sample_shape``."""
    import tensorflow as tf

    if len(sample_shape) != 3 or sample_shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{path}: images cannot feed a model input of shape {list(sample_shape)} "
            "(an image input is (height, width, 1, 3 or 4 channels))"
        )
    h, w, c = sample_shape
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if not raw:
        raise DataError(f"{path}: unreadable image (the file is empty)")
    try:
        if raw[:3] == b"\xff\xd8\xff":
            # JPEG with the accurate integer IDCT, libjpeg's default and the browsers':
            # TensorFlow's own default (the fast IDCT) is a few levels off theirs.
            img = tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE")
            if c == 4:
                img = tf.concat([img, tf.fill([*img.shape[:2], 1], tf.constant(255, tf.uint8))], -1)
        else:
            img = tf.io.decode_image(raw, channels=4 if c == 4 else 3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({_tf_message(exc)})") from exc
    x = tf.cast(img, tf.float32) / 255.0
    x = tf.image.resize(x, (h, w), method="bilinear")
    if c == 1:
        x = tf.image.rgb_to_grayscale(x)
    return x.numpy().astype(np.float32)


def _tf_message(exc: Exception) -> str:
    """TensorFlow's error text without its node prefix and op suffix."""
    text = str(getattr(exc, "message", None) or exc).strip().splitlines()[0]
    if text.startswith("{{"):
        text = text.split("}}", 1)[-1].strip()
    return text.split(" [Op:", 1)[0].strip()


def read_image_folder(
    root: Path, sample_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(x (N, H, W, C) float32, class indices int32, class names, files) of a folder."""
    classes, items = list_image_folder(root)
    x = np.empty((len(items), *sample_shape), np.float32)
    for i, (path, _) in enumerate(items):
        x[i] = decode_image(path, sample_shape)
    y = np.asarray([index for _, index in items], np.int32)
    return x, y, classes, len(items)


# -- arrays ---------------------------------------------------------------------------


def read_npz(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(x, y as the loss wants it, class names if the file holds ``class_names``)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: no array {' or '.join(missing)} (found {sorted(arrays) or 'none'})"
        )
    x, y = arrays["x"], arrays["y"]
    want = manifest.input.sample_shape
    if x.ndim == len(want) and want[-1] == 1 and x.shape[1:] == want[:-1]:
        x = x[..., None]  # (N, H, W) for a one-channel input
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise DataError(f"{path}: x has shape {list(x.shape)}, the model's input is {['N', *want]}")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{path}: x has dtype {x.dtype}, expected numbers")
    if len(x) < 1:
        raise DataError(f"{path}: x holds no samples")
    if len(y) != len(x):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    x = np.ascontiguousarray(x, np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x holds NaN or Inf")
    names = None
    if "class_names" in arrays:
        names = [str(s) for s in arrays["class_names"].tolist()]
    if manifest.labels.dtype.startswith("int"):
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
            raise DataError(
                f"{path}: y has shape {list(y.shape)} ({y.dtype}); "
                f"{manifest.loss.name} needs one integer class index per sample"
            )
        y = y.astype(np.int64)
        n = manifest.num_classes
        if y.min() < 0 or y.max() >= n:
            raise DataError(
                f"{path}: labels span [{y.min()}, {y.max()}], the model has {n} outputs "
                f"(classes 0..{n - 1})"
            )
        return x, y.astype(np.int32), names
    return x, _float_labels(y, manifest, path, names), names


def _float_labels(
    y: np.ndarray, manifest: Manifest, path: Path, names: list[str] | None
) -> np.ndarray:
    """y of an .npz for a one-hot / binary / regression loss, shaped like the output."""
    want = manifest.labels.sample_shape
    loss = manifest.loss.name
    if y.ndim == 1 and loss in _CLASS_LOSSES and y.dtype.kind in "iu" and want[-1] > 1:
        return labels_from_classes(y.astype(np.int32), names, manifest, path)  # indices -> one-hot
    if y.ndim == 1 and want == (1,):
        y = y[:, None]
    if tuple(y.shape[1:]) != want:
        raise DataError(
            f"{path}: y has shape {list(y.shape)}, the model's output is {['N', *want]}"
        )
    y = np.ascontiguousarray(y, np.float32)
    if not np.isfinite(y).all():
        raise DataError(f"{path}: y holds NaN or Inf")
    if loss in _CLASS_LOSSES and (y.min() < 0 or y.max() > 1):
        raise DataError(
            f"{path}: {loss} targets must lie in [0, 1]; y spans [{y.min()}, {y.max()}]"
        )
    return y


_CLASS_LOSSES = (
    "sparse_categorical_crossentropy",
    "categorical_crossentropy",
    "binary_crossentropy",
)
_REGRESSION_LOSSES = ("mean_squared_error", "mean_absolute_error")


def labels_from_classes(
    index: np.ndarray, names: list[str] | None, manifest: Manifest, source: Path
) -> np.ndarray:
    """Class indices -> the labels the bundle's loss takes (``manifest.labels``)."""
    loss = manifest.loss.name
    outputs = manifest.num_classes
    n_classes = len(names) if names else int(index.max()) + 1
    if loss in _REGRESSION_LOSSES:
        raise DataError(
            f"{source}: class folders give class labels, but the model trains {loss} "
            "(regression): give an .npz with float targets y"
        )
    if loss == "binary_crossentropy" and outputs == 1:
        if n_classes > 2:
            raise DataError(
                f"{source}: {n_classes} classes ({_names(names)}), but the model has one "
                "binary output (two classes)"
            )
        return index.astype(np.float32)[:, None]
    if n_classes > outputs:
        raise DataError(
            f"{source}: {n_classes} classes ({_names(names)}), more than the model's "
            f"{outputs} outputs"
        )
    if loss == "sparse_categorical_crossentropy":
        return index.astype(np.int32)
    return np.eye(outputs, dtype=np.float32)[index]


def _names(names: list[str] | None) -> str:
    if not names:
        return "by index"
    shown = ", ".join(names[:6])
    return shown + (", ..." if len(names) > 6 else "")


def write_frames(ds: Dataset, path: Path, input_name: str, validation: bool = False) -> Path:
    """Write the training (or validation) part as a frames file the TF.js device reads,
    with a ``.json`` beside it naming the classes (``spliteasy dataset``)."""
    from shared_schema.demo_data import frames_dataset

    x, y = (ds.x_val, ds.y_val) if validation else (ds.x_train, ds.y_train)
    if x is None:
        raise DataError(f"{ds.source}: nothing held out for validation")
    path = Path(path)
    path.write_bytes(frames_dataset(x, y, input_name))
    path.with_suffix(".json").write_text(json.dumps(ds.record(), indent=1) + "\n")
    return path
