"""Demo data for the device: re-exported from ``shared_schema.demo_data``.

The digits, the seeded batches and the frames-file writer live in ``shared_schema``
because the server hands the same data to the browser page and must not import the
device package for it.
"""

from shared_schema.demo_data import (
    batch_at,
    batches,
    epoch_order,
    fit_to_input,
    frames_dataset,
    load_digits_split,
    resize_bilinear,
)

__all__ = [
    "batch_at",
    "batches",
    "epoch_order",
    "fit_to_input",
    "frames_dataset",
    "load_digits_split",
    "resize_bilinear",
]
