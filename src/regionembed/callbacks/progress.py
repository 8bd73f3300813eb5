"""A log line with the measured time left, for long runs started on a user's behalf (e.g. re-training a zoo model)."""

from __future__ import annotations

import logging
import time

import lightning as L

__all__ = ["EtaLogger", "format_seconds"]

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``"1 h 02 min"``, ``"12 min 05 s"`` or ``"42 s"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


class EtaLogger(L.Callback):
    """Log ``step k/N, elapsed, ETA`` every ``every_s`` seconds, the ETA from this run's own mean step time.

    The estimate is what the progress bar shows, measured on this machine under its current load, instead of a
    constant from another machine. Steps restored from a checkpoint are not counted as this run's work.

    Args:
        name: what is being trained, for the message.
        every_s: seconds between two log lines (the first comes after ``first_after`` steps).
        first_after: steps to measure before the first estimate.
    """

    def __init__(self, name: str = "training", every_s: float = 60.0, first_after: int = 5) -> None:
        self.name, self.every_s, self.first_after = name, float(every_s), int(first_after)
        self._start: float | None = None
        self._start_step = 0
        self._last_log = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = trainer.global_step
        self._last_log = 0.0

    def eta(self, trainer: L.Trainer) -> tuple[int, int, float, float] | None:
        """``(step, total, elapsed_s, remaining_s)``, or None before ``first_after`` steps of this run."""
        done = trainer.global_step - self._start_step
        if self._start is None or done < self.first_after:
            return None
        total = int(trainer.estimated_stepping_batches)
        elapsed = time.monotonic() - self._start
        return trainer.global_step, total, elapsed, elapsed / done * max(0, total - trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        now = time.monotonic()
        estimate = self.eta(trainer)
        if estimate is None or (self._last_log and now - self._last_log < self.every_s):
            return
        self._last_log = now
        step, total, elapsed, remaining = estimate
        log.warning(
            "%s: step %d/%d, %s elapsed, about %s left at this machine's current speed",
            self.name,
            step,
            total,
            format_seconds(elapsed),
            format_seconds(remaining),
        )
