"""Slow: offset NPO on a tiny text world forgets the forget corpus verbatim and keeps the retain knowledge.

The world: ``build_muse_world`` on the first 10 rows of a TOFU forget author and of a retain author (one
document each, ~600 tokens), holdout texts from ``holdout01``; a tokenizer and a tiny Llama pair (large 128 x 4
layers, small 64 x 2) as the demo's, both fine-tuned (SFT) on the two documents, as text windows of 128 tokens
with stride 96, 120 epochs; then offset NPO (beta 0.1, retain NLL on the retain document, lr 5e-4, 10 epochs),
evaluated with MUSE's protocol (64 new tokens for verbmem) before (the fine-tuned large model) and after.

Measured (2-vCPU x86_64 shared with other jobs, 1 thread; about 100 s of CPU time per run, 15 min wall at a
load of 15):

    seed   forget verbmem ROUGE       retain knowmem ROUGE      forget knowmem ROUGE   mia_min_k
           before  after  ratio       before  after  ratio      before  after          before after
    0      0.606   0.097  0.16        0.140   0.178  1.27       0.290   0.102          1.0    1.0
    1      0.584   0.103  0.18        0.116   0.108  0.93       0.319   0.019          1.0    1.0
    2      0.710   0.125  0.18        0.150   0.217  1.44       0.273   0.007          1.0    1.0
    (lr 1e-3 instead of 5e-4, seed 0: verbmem 0.606 -> 0.094, retain knowmem 0.140 -> 0.138, 0.99x)

Bounds (the issue's): forget verbmem ROUGE <= 0.5x (measured 0.16x-0.18x: wide margin), retain knowmem ROUGE
>= 0.9x (measured 0.93x-1.44x over seeds 0-2: seed 1 is near the bound; the test runs seed 0, 1.27x). The tiny world's retain knowmem is low to begin with (0.14: a 1.3M-parameter model recites its
documents from a verbmem prompt, 0.61, but answers few-shot questions poorly), so the retain bound is a weak
one; mia_min_k stays 1.0 (privleak's attack still separates forget from holdout texts: NPO removes the
recitation, not the likelihood gap to never-seen text).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.cli import main
from lightning_unlearn.data.muse_world import build_muse_world
from lightning_unlearn.models.tiny import make_tiny_pair

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tests" / "muse.yaml")
COMMON = ["--trainer.fast_dev_run", "false", "--trainer.enable_checkpointing", "false",
          "--trainer.num_sanity_val_steps", "0", "--data.max_length", "128", "--data.text_stride", "96",
          "--data.eval_subset", "null", "--data.eval_batch_size", "32", "--model.max_new_tokens", "64"]


def muse_summary(root: Path, name: str, seed: int, model: list[str]) -> dict:
    main(["test", "--config", CONFIG, "--data.dataset", str(root / "world"), *COMMON, "--seed_everything", str(seed),
          *model, "--trainer.default_root_dir", str(root / "eval" / name), "--verbose", "false"])
    return json.loads((root / "eval" / name / "MUSE_SUMMARY.json").read_text())


def run_world(root: Path, seed: int, finetune_epochs: int = 120, unlearn_epochs: int = 10, lr: str = "5e-4",
              finetune_batch: int = 4, rows: int = 10) -> tuple[dict, dict]:
    """Build, fine-tune, unlearn; return the MUSE summaries of the fine-tuned and the unlearned model."""
    world = build_muse_world(root / "world", forget=f"forget01[:{rows}]", retain1=f"retain_perturbed[:{rows}]",
                             retain2=f"retain_perturbed[{rows}:{2 * rows}]", holdout=f"holdout01[:{rows}]",
                             rows_per_document=rows, gt_words=32)
    init = make_tiny_pair(root / "init", seed=seed)
    data = ["--data.dataset", str(world), *COMMON, "--seed_everything", str(seed)]
    for size in ("large", "small"):
        main(["fit", "--config", CONFIG, *data, "--model", "SFT", "--model.small_model", str(init[size]),
              "--model.large_model", "null", "--model.export_dir", str(root / "ft" / size),
              "--model.optimizer.lr", "3e-3", "--model.lr_scheduler", "cosine", "--model.warmup_steps", "10",
              "--data.forget_split", "[forget, retain1]", "--data.retain_split", "null",
              "--data.batch_size", str(finetune_batch),
              "--data.evaluation", "loss", "--trainer.limit_val_batches", "0",
              "--trainer.max_epochs", str(finetune_epochs), "--trainer.default_root_dir", str(root / "logs" / size)])
    pair = ["--model.large_model", str(root / "ft" / "large"), "--model.small_model", str(root / "ft" / "small"),
            "--model.large_dtype", "float32"]
    before = muse_summary(root, "finetuned", seed, ["--model", "SFT", "--model.small_model", str(root / "ft" / "large")])
    # evaluated once, after the last epoch: the history's entry is the unlearned model's summary
    main(["fit", "--config", CONFIG, *data, "--model", "NPO", *pair, "--model.optimizer.lr", lr,
          "--data.batch_size", "4", "--trainer.max_epochs", str(unlearn_epochs),
          "--trainer.check_val_every_n_epoch", str(unlearn_epochs), "--trainer.default_root_dir", str(root / "npo")])
    after = json.loads((root / "npo" / "MUSE_HISTORY.json").read_text())[-1]
    return before, after


@pytest.mark.slow
def test_offset_npo_forgets_text_verbatim_and_keeps_retain_knowledge(tmp_cwd: Path) -> None:
    before, after = run_world(tmp_cwd, seed=0)
    assert before["forget_verbmem_ROUGE"] > 0.4, "the fine-tuned model must recite the forget corpus to begin with"
    assert after["forget_verbmem_ROUGE"] <= 0.5 * before["forget_verbmem_ROUGE"], (before, after)
    assert after["retain_knowmem_ROUGE"] >= 0.9 * before["retain_knowmem_ROUGE"], (before, after)
