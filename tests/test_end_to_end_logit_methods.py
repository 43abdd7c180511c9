"""Slow: UNDIAL, WGA, SatImp, CE-U and PDU, each with its defaults in offset mode, on the demo's quick world.

The quick world (``lightning_unlearn.demo --quick``: a 128 x 4 "large" and a 64 x 2 "small" tiny Llama fine-tuned
60 epochs on the forget01 author, 20 retain rows, 20 real-author and 20 world-fact pairs) is built once for the
module; each method then unlearns offset as the demo's NPO does (``configs/demo/unlearn.yaml``: 10 epochs, lr
1e-3, batch 8, retain term ``retain_perturbed[:10]``) with nothing changed but ``--model``, and the unlearned
model is evaluated on 20 samples per set. Bounds: forget ROUGE <= 0.5x the fine-tuned model's and retain
ROUGE (all 20 retain rows: 10 in the retain term, 10 held out) >= 0.8x.

Measured (seed 0, 2 threads, shared 2-vCPU x86_64; fine-tuned forget / retain ROUGE FORGET0 / RETAIN0):

MEASURED

Methods that do not meet the bounds with their defaults are left out of the parametrisation, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.cli import main as cli
from lightning_unlearn.demo import CONFIGS, QUICK, retain_term_rows, run_stage, selectivity, stages

METHODS = ["UNDIAL", "WGA", "SatImp", "CEU", "PDU"]


ROWS = retain_term_rows("offset", quick=True)  # the retain rows in the retain term; the other 10 are held out


def summary(folder: Path) -> dict:
    """``TOFU_SUMMARY.json`` with the retain ROUGE of the rows in and out of the retain term (``selectivity``)."""
    return {**json.loads((folder / "TOFU_SUMMARY.json").read_text()),
            **selectivity(json.loads((folder / "TOFU_EVAL.json").read_text()), ROWS)}


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The quick world's fine-tuned pair (built once) and the fine-tuned large model's evaluation."""
    root = tmp_path_factory.mktemp("logit_methods") / "demo"
    upstream: dict[str, str] = {}
    for stage in stages(root, "NPO", (128, 4), (64, 2), None, quick=True, seed=0):
        if stage.name in ("init", "finetune_large", "finetune_small"):
            run_stage(stage, upstream, force=False)
    cli(["test", "--config", str(CONFIGS / "eval.yaml"), "--model.small_model", str(root / "models" / "large_ft"),
         "--trainer.default_root_dir", str(root / "eval" / "finetuned"), "--verbose", "false", *QUICK["eval"]])
    return root, summary(root / "eval" / "finetuned")


def unlearn(root: Path, method: str) -> dict:
    """Offset unlearning with ``method``'s defaults in the demo's setting, then the TOFU evaluation of the result."""
    logs = root / "logs" / method
    run = cli(["fit", "--config", str(CONFIGS / "unlearn.yaml"), "--model", method,
               "--model.large_model", str(root / "models" / "large_ft"),
               "--model.small_model", str(root / "models" / "small_ft"),
               "--data.retain_split", f"retain_perturbed[:{ROWS}]",
               "--model.retain_reference", "null", "--trainer.callbacks", "null", "--trainer.enable_checkpointing",
               "false", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(logs), *QUICK["eval"]])
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)
    return summary(logs)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_logit_method_forgets_and_keeps_the_retain_set(method: str, quick_world: tuple[Path, dict]) -> None:
    root, before = quick_world
    assert before["forget_Q_A_ROUGE"] > 0.8 and before["retain_Q_A_ROUGE"] > 0.8, "the fine-tuned model knows both"
    after = unlearn(root, method)
    forget = after["forget_Q_A_ROUGE"] / before["forget_Q_A_ROUGE"]
    retain = after["retain_Q_A_ROUGE"] / before["retain_Q_A_ROUGE"]
    assert forget <= 0.5 and retain >= 0.8, (method, forget, retain)
