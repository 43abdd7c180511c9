"""Slow: UNDIAL, WGA, SatImp, CE-U and PDU in offset mode on the demo's quick world: which forget and keep what.

The quick world (``lightning_unlearn.demo --quick``: a 128 x 4 "large" and a 64 x 2 "small" tiny Llama fine-tuned
60 epochs on the forget01 author, 20 retain rows, 20 real-author and 20 world-fact pairs) is built once for the
module; each method then unlearns offset as the demo's NPO does (``configs/demo/unlearn.yaml``: 10 epochs, lr
1e-3, batch 8, retain term ``retain_perturbed[:10]``) with its own defaults, and is evaluated on 20 samples per
set. Bounds: forget ROUGE <= 0.5x the fine-tuned model's, and the ROUGE of the retain rows in the retain term
>= 0.8x. The other 10 retain rows are held out: no method keeps them (nor does NPO, ``test_end_to_end.py``).

First measured at seed 0 (commit af255cc), on the shared 2-vCPU x86_64 machine (1 and 2 threads gave the
same digits for PDU). A case (fit and evaluation) took 13 s (PDU) and 18 s (CE-U) at 2 threads under a load of
about 5, and several minutes under a load of 13-20; the module's quick world is built first. ROUGE ratios
after/before (fine-tuned: forget 0.962, retain 0.966, retain-term rows 0.961):

    method (defaults)         forget   retain (all 20)  retain-term rows  held-out rows  model utility
    WGA                        0.018        0.676             1.000            0.356          0.166
    PDU                        0.061        0.643             0.951            0.337          0.468
    SatImp                     0.050        0.596             1.000            0.196          0.330
    CEU (no retain term)       0.014        0.009             0.014            0.004          0.000
    CEU, retain_loss nll       0.049        0.718             1.000            0.438          0.429
    UNDIAL (no retain term)    0.149        0.214             0.173            0.255          0.531
    UNDIAL, retain_loss nll    0.159        0.940             1.000            0.881          0.896

Not tested, because they fail with their defaults: CE-U and UNDIAL as their references run them, with no retain
term: at the demo's lr 1e-3 for 10 epochs nothing holds the retain rows (CE-U collapses every set; UNDIAL's
bounded target slows it, yet retain falls to 0.2x). Both are tested with a retain NLL term instead.

Measured again at commit 0f2cf46 over seeds 0-4 (``demo --quick --seed S``'s world, every command seeded S, 1
thread, load about 2, 15-18 s per case). Seed 0's figures differ from af255cc's (29 commits to the losses,
modules and evaluation since), e.g. PDU's retain-term rows 0.951 -> 1.000, its held-out rows 0.337 -> 0.578. Every
seed's fine-tuned model gives the same ROUGE as above (0.962, 0.966, 0.961); ratios after/before:

    forget ROUGE                s0      s1      s2      s3      s4
    CEU, retain_loss nll     0.024   0.039   0.049   0.029   0.057
    PDU                      0.045   0.036   0.034   0.046   0.064
    SatImp                   0.025   0.033   0.078   0.000   0.037
    UNDIAL, retain_loss nll  0.158   0.151   0.114   0.107   0.164
    WGA                      0.027   0.051   0.036   0.035   0.026
    retain-term rows ROUGE: 1.000 for every case and seed
    held-out rows ROUGE: CEU 0.26-0.60, PDU 0.51-0.72, SatImp 0.24-0.51, UNDIAL 0.77-1.00, WGA 0.16-0.37
    model utility after: CEU 0-0.58, PDU 0.62-0.79, SatImp 0.25-0.64, UNDIAL 0.86-0.92, WGA 0-0.25

Seed 1's five cases rerun at 2 threads (dbbf3b5, ``OMP_NUM_THREADS=2``, on seed 1's 1-thread world; seed 2's
world rebuilt at 2 threads logged the same fine-tuning losses to the last bit, ``test_end_to_end.py``) gave
every ROUGE ratio above to the last bit; model utility differed by about 1e-8 (float32 reductions). 24-37 s
per case at 2 threads under a load of about 2.

Bounds margin: forget <= 0.5 against measured <= 0.164 (UNDIAL, seed 4), over 3x; retain-term >= 0.8 against
1.000 at every seed (0.951 at af255cc). Both still fail when unlearning breaks: no forgetting leaves the forget
ratio at 1, and CE-U without its retain term took the retain-term rows to 0.014 (af255cc).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.cli import main as cli
from lightning_unlearn.demo import CONFIGS, QUICK, retain_term_rows, selectivity

CASES = {"WGA": ("WGA",), "SatImp": ("SatImp",), "PDU": ("PDU",), "CEU-nll": ("CEU", "--model.retain_loss", "nll"),
         "UNDIAL-nll": ("UNDIAL", "--model.retain_loss", "nll")}


ROWS = retain_term_rows("offset", quick=True)  # the retain rows in the retain term; the other 10 are held out


def summary(folder: Path) -> dict:
    """``TOFU_SUMMARY.json`` with the retain ROUGE of the rows in and out of the retain term (``selectivity``)."""
    return {**json.loads((folder / "TOFU_SUMMARY.json").read_text()),
            **selectivity(json.loads((folder / "TOFU_EVAL.json").read_text()), ROWS)}


@pytest.fixture(scope="module")
def quick_world(quick_pair: Path) -> tuple[Path, dict]:
    """The quick world's fine-tuned pair (``conftest.quick_pair``, built once) and the fine-tuned large model's
    evaluation."""
    root = quick_pair
    cli(["test", "--config", str(CONFIGS / "eval.yaml"), "--model.small_model", str(root / "models" / "large_ft"),
         "--trainer.default_root_dir", str(root / "eval" / "finetuned"), "--verbose", "false", *QUICK["eval"]])
    return root, summary(root / "eval" / "finetuned")


def unlearn(root: Path, method: str, *extra: str) -> dict:
    """Offset unlearning with ``method``'s defaults in the demo's setting, then the TOFU evaluation of the result."""
    logs = root / "logs" / "-".join([method, *extra[1::2]])
    run = cli(["fit", "--config", str(CONFIGS / "unlearn.yaml"), "--model", method,
               "--model.large_model", str(root / "models" / "large_ft"),
               "--model.small_model", str(root / "models" / "small_ft"),
               "--data.retain_split", f"retain_perturbed[:{ROWS}]",
               "--model.retain_reference", "null", "--trainer.callbacks", "null", "--trainer.enable_checkpointing",
               "false", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(logs), *QUICK["eval"], *extra])
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)
    return summary(logs)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_logit_method_forgets_and_keeps_the_retain_term(case: str, quick_world: tuple[Path, dict]) -> None:
    root, before = quick_world
    assert before["forget_Q_A_ROUGE"] > 0.8 and before["retain_term_Q_A_ROUGE"] > 0.8, "the fine-tuned model knows both"
    after = unlearn(root, *CASES[case])
    forget = after["forget_Q_A_ROUGE"] / before["forget_Q_A_ROUGE"]
    retain = after["retain_term_Q_A_ROUGE"] / before["retain_term_Q_A_ROUGE"]
    assert forget <= 0.5 and retain >= 0.8, (case, forget, retain)
