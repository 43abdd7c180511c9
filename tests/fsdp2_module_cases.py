"""One optimizer step of an unlearning module under ``--trainer.strategy fsdp2`` (2 gloo processes) or in one process.

Shared by ``test_fsdp2_module.py`` (one process, and the launcher) and run as a script for the 2-process side
(``python fsdp2_module_cases.py WORLD_JSON DATA OUT``: Lightning's launcher starts the second rank running this same
file). The four forget examples of ``token_means_cases`` (23/101/73/36 labelled tokens) make one step: one process
with a batch of 4 against two processes with batches of 2, each model sharded over both. The step's token and
sequence means are normalised by the whole step's counts, so the update is the same to float32 rounding. SGD (update
``-lr * gradient``) keeps the comparison linear in the gradient.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.distributed.strategy import FSDP2Strategy
from lightning_unlearn.modules import GD, KL, NPO
from token_means_cases import LR, relative_difference, write_dataset  # noqa: F401  (re-exported for the test)

# case -> (class, offset mode, options)
CASES: dict[str, tuple[type, bool, dict[str, Any]]] = {
    "NPO/offset": (NPO, True, {}),
    "GD/offset": (GD, True, {}),
    "KL/offset": (KL, True, {}),
    "NPO/direct": (NPO, False, {}),
    "GD/direct": (GD, False, {}),
    "KL/direct": (KL, False, {}),
    "NPO/offset/lora": (NPO, True, {"lora_rank": 4}),
    "NPO/offset/cache": (NPO, True, {"logit_cache": "memory"}),  # the frozen models kept whole on every rank
}


def full(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The trainable weights, gathered whole from their shards under FSDP2 (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in module.named_parameters() if p.requires_grad}


class KeepStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = full(pl_module)


def build(world: dict, case: str) -> L.LightningModule:
    cls, offset, options = CASES[case]
    large = {"large_model": world["large"], "large_dtype": "float32"} if offset else {}
    if options.get("lora_rank"):
        torch.manual_seed(0)  # LoRA's A is drawn at configure_model: the same draw in both runs
    return cls(small_model=world["small"], optimizer=partial(torch.optim.SGD, lr=LR), **large, **options)


def one_step(world: dict, data: Path, case: str, devices: int, batch_size: int, root: Path,
             **trainer_options: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """``(start, update)`` of one optimizer step (``None`` on ranks other than 0); ``devices > 1`` runs fsdp2."""
    module = build(world, case)
    if "lora_rank" in CASES[case][2]:
        L.seed_everything(0, verbose=False)
    datamodule = UnlearnDataModule(forget_split="forget", retain_split="retain", dataset=str(data),
                                   batch_size=batch_size, max_length=256, evaluation="loss")
    keep = KeepStart()
    strategy = FSDP2Strategy() if devices > 1 else "auto"
    options = {"max_steps": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
               "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
               **trainer_options}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=root,
                        callbacks=[keep], **options)
    trainer.fit(module, datamodule=datamodule)
    end = full(module)
    if not trainer.is_global_zero:
        return None
    return keep.start, {n: end[n] - keep.start[n] for n in end}


if __name__ == "__main__":  # python fsdp2_module_cases.py WORLD_JSON DATA OUT [CASE ...]
    world_info = json.loads(Path(sys.argv[1]).read_text())
    data_dir, out_dir = Path(sys.argv[2]), Path(sys.argv[3])
    results = {}
    for name in sys.argv[4:] or list(CASES):
        outcome = one_step(world_info, data_dir, name, 2, 2, out_dir / name.replace("/", "_"))
        if outcome is not None:
            results[name] = outcome[1]
    if results:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(results, out_dir / "updates.pt")
