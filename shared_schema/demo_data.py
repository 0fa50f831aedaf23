"""Demo data: scikit-learn's bundled digits (real 8x8 images shipped in the wheel).

Nothing is downloaded. Batches come from a seeded permutation per epoch, so a split
run and its unsplit baseline see exactly the same batches in the same order. Kept here,
framework-free (numpy only), because the device trains on it and the server hands it to
the browser page (``/v1/demo/digits.frames``): neither side imports the other for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .frame import Frame, FrameKind, encode


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test): x float32 NHWC in [0, 1], y int32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., None]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return x_tr, y_tr, x_te, y_te


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, epoch: int = 0, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of one epoch, shuffled by (seed, epoch). The last one may be short."""
    order = epoch_order(len(x), epoch, seed)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def epoch_order(n: int, epoch: int, seed: int = 0) -> np.ndarray:
    """The shuffled sample order of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(
    x: np.ndarray, y: np.ndarray, batch_size: int, epoch: int, position: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``position`` of ``epoch``: the one ``batches(...)`` yields at that position,
    without producing the ones before it (a resumed run starts mid-epoch)."""
    key = (len(x), epoch, seed)
    if _order_cache.get("key") != key:
        _order_cache.update(key=key, order=epoch_order(len(x), epoch, seed))
    start = position * batch_size
    if not 0 <= start < len(x):
        raise IndexError(f"epoch {epoch} has no batch {position} of size {batch_size}")
    idx = _order_cache["order"][start : start + batch_size]
    return x[idx], y[idx]


_order_cache: dict = {}


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """NHWC float32 images resized like ``tf.image.resize(x, (h, w))`` (bilinear, half-pixel
    centres, no antialiasing), bit for bit: the same float32 operations in the same order
    (checked against TensorFlow in ``tests/test_import_graph.py``)."""
    x = np.asarray(x, np.float32)

    def axis(in_size: int, out_size: int):
        scale = np.float32(in_size) / np.float32(out_size)
        pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
        floor = np.floor(pos)
        low = np.maximum(floor, 0).astype(np.int64)
        high = np.minimum(np.ceil(pos), in_size - 1).astype(np.int64)
        return low, high, (pos - floor).astype(np.float32)

    y0, y1, y_lerp = axis(x.shape[1], height)
    x0, x1, x_lerp = axis(x.shape[2], width)
    x_lerp = x_lerp[None, None, :, None]
    top_rows, bottom_rows = x[:, y0], x[:, y1]
    top = top_rows[:, :, x0] + (top_rows[:, :, x1] - top_rows[:, :, x0]) * x_lerp
    bottom = bottom_rows[:, :, x0] + (bottom_rows[:, :, x1] - bottom_rows[:, :, x0]) * x_lerp
    return top + (bottom - top) * y_lerp[None, :, None, None]


def fit_to_input(x: np.ndarray, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Digits (N, 8, 8, 1) resized and tiled to a bundle's input (N, H, W, C).

    Lets any image bundle (the application zoo at any input size) train on real data.
    """
    if x.shape[1:] == tuple(sample_shape):
        return x
    if len(sample_shape) != 3:
        raise ValueError(f"digits cannot feed an input of shape {sample_shape}")
    h, w, c = sample_shape
    resized = resize_bilinear(x, h, w)
    return np.ascontiguousarray(np.repeat(resized, c, axis=-1)[..., :c].astype(np.float32))


def frames_dataset(x: np.ndarray, y: np.ndarray, input_name: str = "image") -> bytes:
    """A data set as one frames message: an ``x`` ACTIVATION frame (float32, NHWC or NC)
    and a LABELS frame: int32 class indices (N), or float32 rows (NC: one-hot, binary or
    regression targets, as the bundle's loss takes them). The TF.js device (Node and
    page) reads this format."""
    # float32 features, or int32 token ids (a model whose A starts with an Embedding)
    ids = np.asarray(x).dtype.kind in "iu"
    x = np.ascontiguousarray(x, dtype=np.int32 if ids else np.float32)
    layout = {4: "NHWC", 3: "NWC", 2: "NC"}[x.ndim]
    if np.asarray(y).dtype.kind == "f":
        y = np.ascontiguousarray(y, dtype=np.float32).reshape(len(x), -1)
        labels = Frame(FrameKind.LABELS, "labels", y, "NC")
    else:
        labels = Frame(FrameKind.LABELS, "labels", np.ascontiguousarray(y, np.int32), "N")
    return encode([Frame(FrameKind.ACTIVATION, input_name, x, layout), labels])
