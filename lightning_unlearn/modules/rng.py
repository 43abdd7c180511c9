"""Random-number state in checkpoints, so a resumed run draws what an uninterrupted run would have drawn.

Lightning checkpoints hold weights, optimizer, schedulers and loop counters but no RNG state: a run resumed
with ``--ckpt_path`` is re-seeded by ``seed_everything`` and, in a model with dropout, would draw other
masks from then on. The states are stored as tensors and plain lists so that checkpoints still load with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RestoreRNG(L.Callback):
    """Saves every rank's RNG state with each checkpoint and restores it before the first resumed batch.

    Restoring at the first training batch, not at load time, skips whatever the resumed run draws while
    starting up (the sanity check, loader creation) that the uninterrupted run did not.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: list[dict[str, Any]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """All ranks' states: every rank builds the checkpoint, rank 0 writes it."""
        local = rng_state()
        interrupted = self._trainer is not None and self._trainer.interrupted
        # No collective on the exception path (OnExceptionCheckpoint): the other ranks may never reach it.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not interrupted:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
            return {"per_rank": states}
        return {"per_rank": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("per_rank")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the RNG states of {len(states)} processes, this run has {trainer.world_size}: "
                "random draws (dropout) after resumption will differ from an uninterrupted run."
            )
            return
        set_rng_state(states[trainer.global_rank])
