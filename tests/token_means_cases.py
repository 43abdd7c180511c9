"""One optimizer step of every loss over the same four forget examples, split in different ways.

Shared by ``test_token_means.py`` (one process) and ``test_ddp_token_means.py`` (two DDP processes, which
run this file as a script). The forget answers are 23, 101, 73 and 36 labelled tokens long (the example of
issue 10), the retain answers of TOFU vary in length too, so token means over a micro-batch differ from
token means over the step unless the normalisation spans the whole step.

The update is measured with plain SGD (no momentum, no weight decay), whose update is ``-lr * gradient``:
an adaptive optimizer's first step is close to ``-lr * sign(gradient)`` and would hide the reweighting.
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
from lightning_unlearn.data.formatting import IGNORE_INDEX, PromptFormatter
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import (
    CEU, DPO, EUL, GA, GD, KL, LLMU, NPO, PDU, SFT, UNDIAL, WGA, SatImp, SimNPO, UnlearnModule,
)

ANSWER_TOKENS = (23, 101, 73, 36)
LR = 1.0
# name -> (class, options); EUL trains its own adapters in direct mode, the others an offset on a large model.
LOSSES: dict[str, tuple[type[UnlearnModule], dict[str, Any]]] = {
    "GA": (GA, {}),
    "GD": (GD, {}),
    "KL": (KL, {}),
    "NPO": (NPO, {}),
    "DPO": (DPO, {}),
    "SimNPO": (SimNPO, {}),
    "LLMU": (LLMU, {"num_random_answers": 2}),
    "EUL": (EUL, {"bottleneck": 4}),
    "SFT": (SFT, {}),
    "UNDIAL": (UNDIAL, {"retain_loss": "nll"}),
    "WGA": (WGA, {}),
    "SatImp": (SatImp, {"beta1": 0.5}),
    "CEU": (CEU, {"retain_loss": "nll"}),  # its own update is ~1e-3 of the others (p_y ~ 1/400): float32 noise alone
    "PDU": (PDU, {"dual_warmup_epochs": 0}),
}
# (devices, batch size per device, accumulate_grad_batches): every split covers the four examples in one step.
SPLITS = {"1x4": (1, 4, 1), "2x2": (1, 2, 2), "4x1": (1, 1, 4)}
DDP_SPLITS = {"ddp2x2": (2, 2, 1), "ddp2x1x2": (2, 1, 2)}


def labelled(formatter: PromptFormatter, question: str, answer: str) -> int:
    """Tokens a loss is taken on: labels after the next-token shift."""
    return sum(label != IGNORE_INDEX for label in formatter.encode(question, answer).labels[1:])


def answer_of_length(formatter: PromptFormatter, question: str, words: list[str], tokens: int) -> str:
    """Words taken in order, skipping any that would overshoot, until the answer is exactly ``tokens`` long."""
    text = ""
    for word in words:
        candidate = f"{text} {word}".strip()
        count = labelled(formatter, question, candidate)
        if count == tokens:
            return candidate
        if count < tokens:
            text = candidate
    raise AssertionError(f"no answer of exactly {tokens} tokens from these words")


def write_dataset(tokenizer_dir: str, folder: Path) -> Path:
    """``forget.jsonl`` (answers of 23/101/73/36 labelled tokens) and ``retain.jsonl`` (TOFU rows) in ``folder``."""
    formatter = PromptFormatter(load_tokenizer(tokenizer_dir), max_length=256)
    source = load_split("bundled", "forget10")
    words = " ".join(row["answer"] for row in source).split()
    forget = []
    for i, tokens in enumerate(ANSWER_TOKENS):
        question = source[i]["question"]
        answer = answer_of_length(formatter, question, words[37 * i :] + words, tokens)
        assert labelled(formatter, question, answer) == tokens
        forget.append({"question": question, "answer": answer})
    retain = load_split("bundled", "retain90")[:12]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("forget", forget), ("retain", retain)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


class KeepStart(L.Callback):
    """Keeps the trainable weights as training starts, to measure the step's update."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = trainables(pl_module)


def trainables(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def one_step(world: dict, data: Path, loss: str, devices: int, batch_size: int, accumulate: int,
             root: Path) -> dict[str, torch.Tensor] | None:
    """The update of one optimizer step over the four forget examples (``None`` on DDP ranks other than 0)."""
    cls, options = LOSSES[loss]
    offset = {} if cls is EUL else {"large_model": world["large"], "large_dtype": "float32"}
    module = cls(small_model=world["small"], optimizer=partial(torch.optim.SGD, lr=LR), **offset, **options)
    datamodule = UnlearnDataModule(
        forget_split="forget", retain_split="retain", dataset=str(data), batch_size=batch_size, max_length=256,
        evaluation="loss",
    )
    keep = KeepStart()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
        accumulate_grad_batches=accumulate, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[keep],
    )
    trainer.fit(module, datamodule=datamodule)
    if not trainer.is_global_zero:
        return None
    end = trainables(module)
    return {n: end[n] - keep.start[n] for n in end}


def relative_difference(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """``||u - u_ref|| / ||u_ref||`` over all trainable weights together."""
    diff = sum(float((update[n] - reference[n]).double().pow(2).sum()) for n in reference)
    norm = sum(float(reference[n].double().pow(2).sum()) for n in reference)
    return (diff / norm) ** 0.5


if __name__ == "__main__":  # python token_means_cases.py WORLD_JSON DATA OUT: the DDP splits of every loss
    world_file, data_dir, out_dir = (Path(a) for a in sys.argv[1:4])
    world_info = json.loads(world_file.read_text())
    results = {}
    for loss_name in LOSSES:
        for split, (n_devices, size, accumulate_batches) in DDP_SPLITS.items():
            update = one_step(world_info, data_dir, loss_name, n_devices, size, accumulate_batches,
                              out_dir / loss_name / split)
            if update is not None:
                results[f"{loss_name}/{split}"] = update
    if results:
        torch.save(results, out_dir / "updates.pt")
