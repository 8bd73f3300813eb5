"""Callbacks used by subprocess tests to simulate failures."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process at the start of global step ``step`` (checkpoints of earlier steps are on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
