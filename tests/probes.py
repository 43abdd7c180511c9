"""Lightning callbacks the tests add by class path (``--trainer.callbacks+=probes.NAME``): at the tests' root, so
that an in-process run and a DDP worker process (``PYTHONPATH`` = the tests' root) import the same module."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class DualProbe(L.Callback):
    """Records, per optimizer step: lambda used in the loss, the retain loss, lambda after the step; prints it."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, float, float, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        losses = pl_module.last_losses
        row = (trainer.current_epoch, trainer.global_step, float(losses["dual"]), float(losses["retain_loss"]),
               pl_module.dual)
        self.rows.append(row)
        print(f"DUAL rank={trainer.global_rank} step={trainer.global_step} after={pl_module.dual!r}", flush=True)


class KillAt(L.Callback):
    """Stands in for a crash: fails the run as step ``step`` starts, after the checkpoint of the step before."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


class ThreadProbe(L.Callback):
    """Prints the intra-op thread count each rank trains with (the DDP child process is a fresh interpreter)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"THREADS rank={trainer.global_rank} threads={torch.get_num_threads()}", flush=True)
