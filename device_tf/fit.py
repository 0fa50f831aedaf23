"""Epochs of split training with a progress bar, a per-step JSONL log and a summary.

The run is a sequence of global steps 0 .. epochs x steps_per_epoch - 1; step n trains on
batch ``n % steps_per_epoch`` of epoch ``n // steps_per_epoch`` (``data.batch_at``), so
a run can start, stop and go back at any step and still see the same batches in the
same order. With a :class:`~device_tf.state.DeviceState` the runtime's state is saved
after every step, and a server that restarted from an older checkpoint (409
step_conflict with ``next_step``) makes the loop restore that step and replay from it.

The log has one JSON object per step (loss and the time breakdown: device compute,
server compute, codec, wire) so runs can be compared and plotted afterwards.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._exceptions import ServerRejected, StepConflict
from .data import batch_at
from .loop import SplitTrainer

if TYPE_CHECKING:
    from .state import DeviceState

PARTS = ("device_ms", "server_ms", "codec_ms", "wire_ms", "total_ms")


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    epoch_accuracy: list[float] = field(default_factory=list)
    timing_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    first_step: int = 0  # the global step this process started at (a resumed run: > 0)
    last_step: int = 0  # steps completed at the end
    rollbacks: int = 0  # times a restarted server sent the device back to its checkpoint

    def mean_ms(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.timing_sums.items()}

    def summary(self) -> str:
        m = self.mean_ms()
        line = (
            f"{self.steps} steps; mean per step {m['total_ms']:.1f} ms = device {m['device_ms']:.1f} "
            f"+ server {m['server_ms']:.1f} + codec {m['codec_ms']:.2f} + wire {m['wire_ms']:.1f} ms; "
            f"{self.bytes_up / max(self.steps, 1) / 1024:.1f} KiB up, "
            f"{self.bytes_down / max(self.steps, 1) / 1024:.1f} KiB down per step"
        )
        if self.first_step:
            line += f"; resumed at step {self.first_step}"
        if self.rollbacks:
            line += f"; {self.rollbacks} rollback(s) to the server's checkpoint"
        return line


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
    state: DeviceState | None = None,
    val_label: str = "test accuracy",
) -> History:
    """Train ``epochs`` epochs; with ``state``, resume a saved run and save every step.

    Without a state the session's step numbers go on from the trainer's ``next_step``
    while batches start at epoch 0; with one, the global step is the session's step.
    ``val_label`` names the per-epoch score on (x_val, y_val) (``SplitTrainer.evaluate``).
    """
    from tqdm import tqdm

    steps_per_epoch = -(-len(x) // batch_size)
    total = epochs * steps_per_epoch
    if state is not None:
        first = state.begin(trainer)
    else:
        if trainer.session is None:
            trainer.open()
        first = 0
    history = History(first_step=first, last_step=first)
    log = open(log_path, "a") if log_path else None  # noqa: SIM115
    bar = tqdm(
        total=total,
        initial=first,
        desc="training",
        disable=None if progress else True,  # None: off when stderr is not a terminal
        file=sys.stderr,
        leave=False,
    )
    evaluated: set[int] = set()
    epoch_losses: dict[int, float] = {}
    i = first
    try:
        while i < total:
            epoch, position = divmod(i, steps_per_epoch)
            xb, yb = batch_at(x, y, batch_size, epoch, position, seed)
            try:
                result = trainer.step(xb, yb)
            except (StepConflict, ServerRejected) as exc:
                if state is None:
                    raise
                i = _recover(trainer, state, exc, i)
                history.rollbacks += 1
                bar.n = i
                bar.refresh()
                continue
            i += 1
            if state is not None:
                state.announce(result.durable_step)
                state.commit(i)
            history.losses.append(result.loss)
            epoch_losses[i - 1] = result.loss
            history.steps += 1
            t = result.timings
            for part in PARTS:
                history.timing_sums[part] += getattr(t, part)
            history.bytes_up += t.bytes_up
            history.bytes_down += t.bytes_down
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{result.loss:.4f}", ms=f"{t.total_ms:.0f}")
            if log:
                log.write(json.dumps({"epoch": epoch, **result.to_dict()}) + "\n")
                log.flush()
            if i % steps_per_epoch == 0:
                done = range(i - steps_per_epoch, i)
                known = [epoch_losses[k] for k in done if k in epoch_losses]
                line = f"epoch {epoch + 1}/{epochs}: loss {np.mean(known):.4f}"
                if len(known) < steps_per_epoch:
                    line += f" (over the {len(known)} steps run by this process)"
                if x_val is not None:
                    acc = trainer.evaluate(x_val, y_val)
                    history.epoch_accuracy.append(acc)
                    evaluated.add(epoch)
                    line += f", {val_label} {acc:.4f}"
                if progress:
                    print(line, file=sys.stderr)
        if x_val is not None and total and (total - 1) // steps_per_epoch not in evaluated:
            history.epoch_accuracy.append(trainer.evaluate(x_val, y_val))  # resumed at the end
    finally:
        bar.close()
        if log:
            log.close()
    history.last_step = i
    return history


def _recover(trainer: SplitTrainer, state: DeviceState, exc: ServerRejected, step: int) -> int:
    """The step to go on from after the server refused ``step``; re-raises what is fatal."""
    if isinstance(exc, StepConflict) and exc.next_step is not None:
        if exc.next_step > step:
            raise exc
        return state.rollback(trainer, exc.next_step)
    if exc.code == "stale_forward":  # our forward's hold on B lapsed: redo this step
        return state.rollback(trainer, step)
    if exc.code == "unknown_session":
        return state.session_lost(trainer)
    raise exc
