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


class KillAtPredictBatch(L.Callback):
    """SIGKILL this process at the start of predict batch ``batch`` (earlier batches' outputs are written)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class SlowPredict(L.Callback):
    """Sleep ``seconds`` after each predict batch, so that a second run can start while this one is writing."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import time

        time.sleep(self.seconds)
