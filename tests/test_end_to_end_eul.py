"""Slow: EUL (configs/demo/eul.yaml, direct mode) on the reduced tiny TOFU world forgets the forget author and
keeps the retain authors it was asked to keep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.cli import main as cli
from lightning_unlearn.demo import CONFIGS, QUICK, run_stage, stages


def summary(folder: Path) -> dict:
    return json.loads((folder / "TOFU_SUMMARY.json").read_text())


@pytest.mark.slow
def test_eul_forgets_the_forget_author_and_keeps_the_retain_authors(tmp_cwd: Path) -> None:
    root = tmp_cwd / "demo"
    upstream: dict[str, str] = {}
    # Only the stages EUL needs: the tokenizer and models, then the fine-tuned large model (no retain model:
    # the thresholds are on ROUGE, not on forget quality).
    for stage in stages(root, "EUL", (128, 4), (64, 2), None, quick=True):
        if stage.name in ("init", "finetune_large"):
            run_stage(stage, upstream, force=False)
    model = str(root / "models" / "large_ft")
    cli(["test", "--config", str(CONFIGS / "eval.yaml"), "--model.small_model", model,
         "--trainer.default_root_dir", str(root / "eval" / "finetuned"), *QUICK["eval"]])

    # The demo's EUL settings on the quick world's data, without the per-epoch evaluation and checkpoints.
    eul = ["--config", str(CONFIGS / "eul.yaml"), "--model.small_model", model, "--model.retain_reference", "null",
           "--trainer.callbacks", "null", *QUICK["eul"], *QUICK["eval"]]
    cli(["fit", *eul, "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
         "--trainer.default_root_dir", str(root / "logs" / "eul")])
    layers = root / "logs" / "eul" / "unlearning_layers"
    assert (layers / "unlearning_layers.safetensors").is_file(), "fit saves the request's unlearning layers"
    cli(["test", *eul, "--model.adapters", str(layers), "--trainer.default_root_dir", str(root / "eval" / "eul")])

    before, after = summary(root / "eval" / "finetuned"), summary(root / "eval" / "eul")
    assert before["forget_Q_A_ROUGE"] > 0.8, "the fine-tuned model must know the forget set to begin with"
    assert after["forget_Q_A_ROUGE"] <= 0.5 * before["forget_Q_A_ROUGE"]
    assert after["retain_Q_A_ROUGE"] >= 0.9 * before["retain_Q_A_ROUGE"]
