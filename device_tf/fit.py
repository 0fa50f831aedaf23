"""Epochs of split training with a progress bar, a per-step JSONL log and a summary.

The log has one JSON object per step (loss and the time breakdown: device compute,
server compute, codec, wire) so runs can be compared and plotted afterwards.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import batches
from .loop import SplitTrainer

PARTS = ("device_ms", "server_ms", "codec_ms", "wire_ms", "total_ms")


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    epoch_accuracy: list[float] = field(default_factory=list)
    timing_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def mean_ms(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.timing_sums.items()}

    def summary(self) -> str:
        m = self.mean_ms()
        return (
            f"{self.steps} steps; mean per step {m['total_ms']:.1f} ms = device {m['device_ms']:.1f} "
            f"+ server {m['server_ms']:.1f} + codec {m['codec_ms']:.2f} + wire {m['wire_ms']:.1f} ms; "
            f"{self.bytes_up / max(self.steps, 1) / 1024:.1f} KiB up, "
            f"{self.bytes_down / max(self.steps, 1) / 1024:.1f} KiB down per step"
        )


def fit(
    trainer: SplitTrainer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    log_path: Path | None = None,
    progress: bool = True,
) -> History:
    from tqdm import tqdm

    history = History()
    log = open(log_path, "a") if log_path else None  # noqa: SIM115
    steps_per_epoch = -(-len(x) // batch_size)
    try:
        for epoch in range(epochs):
            bar = tqdm(
                batches(x, y, batch_size, epoch, seed),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{epochs}",
                disable=None if progress else True,  # None: off when stderr is not a terminal
                file=sys.stderr,
                leave=False,
            )
            for xb, yb in bar:
                result = trainer.step(xb, yb)
                history.losses.append(result.loss)
                history.steps += 1
                t = result.timings
                for part in PARTS:
                    history.timing_sums[part] += getattr(t, part)
                history.bytes_up += t.bytes_up
                history.bytes_down += t.bytes_down
                bar.set_postfix(loss=f"{result.loss:.4f}", ms=f"{t.total_ms:.0f}")
                if log:
                    log.write(json.dumps({"epoch": epoch, **result.to_dict()}) + "\n")
            line = (
                f"epoch {epoch + 1}/{epochs}: loss {np.mean(history.losses[-steps_per_epoch:]):.4f}"
            )
            if x_val is not None:
                acc = trainer.evaluate(x_val, y_val)
                history.epoch_accuracy.append(acc)
                line += f", test accuracy {acc:.4f}"
            if progress:
                print(line, file=sys.stderr)
    finally:
        if log:
            log.close()
    return history
