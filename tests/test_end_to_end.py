"""Slow: the demo pipeline on a reduced tiny TOFU world forgets the forget author, more than anything else.

Training a tiny world is chaotic: another CPU, thread count or seed gives another trajectory (forget quality
1.1e-8 -> 9.5e-6 on one machine, 2.7e-4 -> 1.1e-3 on another). So the bounds are on statistics that move by
much more than they vary, and were set from runs of ``demo --quick --seed S`` at OMP 2 threads (as ``make
test`` runs) (tools: ``lightning_unlearn.demo.selectivity``; mean answer NLL in nats per token, before -> after):

    statistic                                s0/2t     s1/2t     s2/2t
    forget ROUGE before                      0.962     0.962     0.962
    forget ROUGE after/before               0.0668     0.114     0.107
    forget NLL rise                           6.91      5.94      5.32
    forget truth ratio rise                  0.149     0.113     0.102
    retain-term NLL rise                   0.00444   0.00376  -0.00356
    retain-term ROUGE after/before               1         1         1
    held-out retain NLL rise                  1.14      0.28     0.398
    held-out retain ROUGE after/before       0.258     0.417     0.362
    real-authors NLL rise                     3.68      2.45     0.834
    world-facts NLL rise                       4.5       2.7      1.32
    forget rise - largest control rise        2.41      3.25      3.99
    model utility before                      0.94     0.927     0.923
    model utility after                      0.273      0.46     0.519
    forget quality before                 1.43e-07  1.33e-06  1.33e-06
    forget quality after                  9.55e-06  9.55e-06  5.57e-05

The quick world's fine-tuning runs 60 epochs: with the full world's 30, seed 2 stayed on a loss plateau
and left the model half-trained (forget ROUGE 0.395, model utility 0.52 before unlearning), which failed the
precondition below; at 60 every seed memorises (0.962). Seed 2 at 1 thread gave the s2/2t column to the last
digit (and, at 30 epochs, seed 1 too), and one machine repeats itself exactly (s0 ran twice,
evaluating every epoch and every 5: the same numbers, so the evaluation does not steer the training).
Bounds, each well outside the measured values: forget ROUGE ratio <= 0.3; forget NLL rise > 2 nats; forget
truth ratio rise > 0.05; forget rise > every control rise + 0.5 and > the retain author's rises + 2; the
retain term's rows kept (NLL rise < 0.3, ROUGE >= 0.9x); damage outside it bounded (held-out retain rise
< 3, real-author and world-fact rises < 6 nats). No model-utility floor: this NPO (10-row retain term, 10
epochs at lr 1e-3) costs the real authors and world facts up to 4.5 nats (model utility 0.27-0.52 after,
and 0 at 30 fine-tuning epochs), too close to zero to bound; a floor needs a gentler quick unlearning.

Forget quality is left out: its p-values are tiny and move by orders of magnitude between runs.

The full demo's calibration (retain weight 10, the epoch and alpha picked by the utility-floor rule) does not
carry over to this world: with its 10-row retain term, retain weight 10 still left model utility at 0.54-0.68
from the second epoch on (seed 0, 1 thread), so the rule would keep the first epoch, which has hardly forgotten
(forget NLL rise 0.7). ``--quick`` therefore keeps the setting these bounds were measured on (``demo.QUICK``),
and the model-utility floor still waits for a gentler quick unlearning.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from lightning_unlearn.demo import CONFIGS, NPO_CONFIG, main as demo, selected_alpha_dir, selectivity, stages


def rise(before: dict, after: dict, part: str) -> float:
    """Rise of a part's mean answer NLL (nats per token) from the fine-tuned to the unlearned model."""
    return after[f"{part}_mean_nll"] - before[f"{part}_mean_nll"]


def test_selectivity_splits_the_retain_set_at_the_retain_term() -> None:
    def by_index(field: str, values: list[float]) -> dict:
        return {"value_by_index": {str(i): {field: v} for i, v in enumerate(values)}}

    report = {"forget_Q_A_Prob": by_index("prob", [math.exp(-1.0), math.exp(-3.0)]),
              "retain_Q_A_Prob": by_index("prob", [math.exp(-0.5), math.exp(-1.5), math.exp(-2.0)]),
              "retain_Q_A_ROUGE": by_index("rougeL_recall", [1.0, 0.5, 0.25]),
              "ra_Q_A_Prob": by_index("prob", [math.exp(-4.0)])}
    got = selectivity(report, retain_rows=2)
    assert got["forget_mean_nll"] == pytest.approx(2.0) and got["ra_mean_nll"] == pytest.approx(4.0)
    assert got["retain_term_mean_nll"] == pytest.approx(1.0) and got["retain_heldout_mean_nll"] == pytest.approx(2.0)
    assert got["retain_term_Q_A_ROUGE"] == pytest.approx(0.75) and got["retain_heldout_Q_A_ROUGE"] == 0.25
    assert got["wf_mean_nll"] is None, "a set that was not evaluated has no mean"
    assert selectivity(report, retain_rows=3)["retain_heldout_Q_A_ROUGE"] is None


def test_the_demo_reports_the_alpha_the_sweep_selected(tmp_path: Path) -> None:
    assert selected_alpha_dir(tmp_path) == tmp_path, "a plain evaluation folder is its own result"
    sweep = [{"alpha": 1.0, "selected": False}, {"alpha": 1.5, "selected": True}, {"alpha": 2.0, "selected": False}]
    (tmp_path / "ALPHA_SWEEP.json").write_text(json.dumps(sweep))
    assert selected_alpha_dir(tmp_path) == tmp_path / "alpha_1.5"
    (tmp_path / "ALPHA_SWEEP.json").write_text(json.dumps([{"alpha": 1.0}]))
    with pytest.raises(ValueError, match="no selected alpha"):
        selected_alpha_dir(tmp_path)


@pytest.mark.slow
def test_offset_npo_forgets_the_forget_set_and_keeps_the_rest(tmp_cwd: Path) -> None:
    columns = demo(["--root", str(tmp_cwd / "demo"), "--quick"])
    before, after = columns["fine-tuned"], columns["unlearned"]
    assert before["forget_Q_A_ROUGE"] > 0.8, "the fine-tuned model must know the forget set to begin with"
    assert before["retain_heldout_Q_A_ROUGE"] > 0.8 and before["model_utility"] > 0.8, "and the rest"

    # Forgetting: answers, probabilities and truth ratios of the forget author.
    assert after["forget_Q_A_ROUGE"] <= 0.3 * before["forget_Q_A_ROUGE"], (before, after)
    forget = rise(before, after, "forget")
    assert forget > 2.0, (before, after)
    assert after["forget_truth_ratio"] - before["forget_truth_ratio"] > 0.05, (before, after)

    # Selective: the forget answers lose more than every control part, in or out of the retain term.
    controls = {part: rise(before, after, part) for part in ("retain_term", "retain_heldout", "ra", "wf")}
    assert forget > max(controls.values()) + 0.5, (forget, controls)
    assert forget > max(controls["retain_term"], controls["retain_heldout"]) + 2.0, (forget, controls)
    # The retain term keeps its own rows; the damage elsewhere is bounded, not small (see the module docstring).
    assert controls["retain_term"] < 0.3 and after["retain_term_Q_A_ROUGE"] >= 0.9 * before["retain_term_Q_A_ROUGE"]
    assert controls["retain_heldout"] < 3.0 and max(controls["ra"], controls["wf"]) < 6.0, controls

    again = demo(["--root", str(tmp_cwd / "demo"), "--quick"])
    assert again == columns, "a second run skips every stage and reports the same numbers"


def test_only_the_full_worlds_npo_reads_the_npo_settings(tmp_path: Path) -> None:
    def unlearn_args(method: str, quick: bool) -> list[str]:
        return next(s for s in stages(tmp_path, method, (128, 4), (64, 2), None, quick) if s.name == "unlearn").args

    npo = unlearn_args("NPO", quick=False)
    assert npo[npo.index(str(os.path.relpath(NPO_CONFIG))) - 1] == "--config", npo
    assert npo.index(os.path.relpath(NPO_CONFIG)) > npo.index("NPO"), "after --model NPO, so that its values stand"
    assert npo[npo.index("--data.retain_split") + 1] == "retain_perturbed[:200]", "the KL term's rows, as the file says"
    for method, quick in (("NPO", True), ("SimNPO", False), ("GD", False)):
        assert os.path.relpath(NPO_CONFIG) not in unlearn_args(method, quick), (method, quick)
    # The shared config sets no loss-specific hyper-parameter: SimNPO, UNDIAL, WGA, ... would take it as theirs.
    shared = yaml.safe_load((CONFIGS / "unlearn.yaml").read_text())["model"]["init_args"]
    assert not {"beta", "retain_loss"} & set(shared), shared
    calibrated = yaml.safe_load(NPO_CONFIG.read_text())
    assert calibrated["model"]["class_path"].endswith(".NPO") and calibrated["model"]["init_args"]["beta"] < 0.1
