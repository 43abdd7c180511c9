"""Slow: the demo pipeline on a reduced tiny TOFU world forgets the forget author, more than anything else.

Training a tiny world is chaotic: another CPU, thread count or seed gives another trajectory (forget quality
1.1e-8 -> 9.5e-6 on one machine, 2.7e-4 -> 1.1e-3 on another). So the bounds are on statistics that move by
much more than they vary. ``--quick`` unlearns gently (``demo.QUICK``: NPO, retain weight 10, lr 3e-4, 10
epochs, the last one at alpha 1), so that forgetting is selective and model utility (retain, real authors,
world facts) keeps a floor. Measured with ``demo --quick --seed S`` on the shared 2-vCPU x86_64 machine
(tools: ``lightning_unlearn.demo.selectivity``; mean answer NLL in nats per token, before -> after; seed 0
gave the same numbers to the last digit at 1 and 2 threads). Seeds 0 and 1 under a load of 8-10; seeds 2-4
later (commit 0f2cf46, load about 2, ~4.5 min per world at 1 thread), when seed 0 was rerun from scratch and
gave its column again to the last digit. Seed 2 was rerun at 2 threads (dbbf3b5, ``OMP_NUM_THREADS=2``, which the CLI
leaves to torch; load 2-3, one core taken by another process for most of it) and gave its column to the last
digit: fine-tuning logged the same training loss to the last bit at every logged step (78, every 10 steps);
the evaluations' NLLs and probabilities differ only at about 1e-8 relative (float32 reductions), ROUGE not at all:

    statistic                               s0/1t=2t     s1/1t  s2/1t=2t     s3/1t     s4/1t
    forget ROUGE after/before                 0.0640    0.0995     0.129     0.178    0.0610
    forget NLL rise                             4.12      4.07      3.70      3.98      4.16
    forget truth ratio rise                   0.0703    0.0360    0.0454    0.0787    0.0748
    retain-term NLL rise                     0.00015   0.00022  -0.00838   0.00073  -0.00444
    retain-term ROUGE after/before                 1         1         1         1         1
    held-out retain NLL rise                  0.0911    0.0458    0.0766     0.115     0.102
    held-out retain ROUGE after/before         0.918     0.905     0.811     0.856     0.854
    real-authors NLL rise                      0.688     0.761     0.156     0.235     0.268
    world-facts NLL rise                        1.27     0.797     0.386     0.613     0.720
    forget rise - largest control rise          2.85      3.28      3.31      3.37      3.44
    forget rise - largest retain rise           4.03      4.03      3.62      3.86      4.05
    model utility before                       0.940     0.927     0.923     0.939     0.932
    model utility after                        0.783     0.725     0.871     0.876     0.790
    model utility after/before                 0.833     0.782     0.943     0.933     0.847

Every seed's fine-tuned model knows what the preconditions ask: forget ROUGE 0.962, held-out retain ROUGE
0.970, model utility 0.92-0.94. The fine-tuned worlds of seeds 0 and 1 are those of the earlier calibration
(seed 0 at 1 thread gave its 2-thread column to the last digit, also at the earlier unlearning: forget NLL rise
6.91, model utility 0.273 after), which also showed why the quick world's fine-tuning runs 60 epochs: with the
full world's 30, seed 2 stayed on a loss plateau and left the model half-trained (forget ROUGE 0.395, model
utility 0.52 before unlearning), which failed the precondition below; at 60 every seed memorises (0.962).

Bounds, each outside the spread of seeds 0-4 by a margin of about a third of the statistic or more unless said:
forget ROUGE ratio <= 0.3 (largest 0.178, seed 3); forget NLL rise > 2 nats (smallest 3.70, seed 2); forget
truth ratio rise > 0.01 (the smallest margin, 0.036 measured: the truth ratio moves least); forget rise > every
control rise + 1 (smallest 2.85) and > the retain author's rises + 2 (smallest 3.62); the retain term's rows
kept (NLL rise < 0.3, ROUGE >= 0.9x); the retain rows outside the retain term kept too (NLL rise < 0.5, largest
0.115; ROUGE >= 0.6x); real-author and world-fact rises < 2.5 nats (largest 1.27); model utility after >= 0.6x
the fine-tuned model's (0.78x-0.94x). The held-out ROUGE bound was 0.7x when seeds 0-1 gave 0.905x-0.918x;
seed 2 gave 0.811x, a margin of 0.11. Its 10 held-out rows move it in steps: a row that loses its answer (ROUGE
1 -> 0.2, as two rows did at seed 2) costs about 0.08, so 0.7x left room for one more such row. At 0.6x the
margin is 0.21 (a quarter of the statistic) and the bound still fails the harsher unlearnings tried on seed 0,
whose damage it is there to catch: 0.442x at retain weight 10 and lr 1e-3, 0.258x at retain weight 1 and lr
1e-3 (also held-out NLL rises of 0.57 and 1.14, over the 0.5 bound). That earlier quick unlearning (retain
weight 1, lr 1e-3) forgot harder (forget NLL +5.3 to +6.9, seeds 0-2) but cost the real authors and world facts
up to 4.5 nats and left model utility at 0.27-0.52, too close to zero for a floor.

Forget quality is left out: its p-values are tiny and move by orders of magnitude between runs.

The full demo's calibration (retain weight 10 at lr 1e-3, the epoch and alpha picked by the utility-floor
rule) does not carry over to this world: with its 10-row retain term, model utility was 0.54-0.68 from the
second epoch on (seed 0, 1 thread), so the rule would keep the first epoch, which has hardly forgotten (forget
NLL rise 0.7); at lr 3e-4 the last epoch is kept instead.
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
    assert after["forget_truth_ratio"] - before["forget_truth_ratio"] > 0.01, (before, after)

    # Selective: the forget answers lose more than every control part, in or out of the retain term.
    controls = {part: rise(before, after, part) for part in ("retain_term", "retain_heldout", "ra", "wf")}
    assert forget > max(controls.values()) + 1.0, (forget, controls)
    assert forget > max(controls["retain_term"], controls["retain_heldout"]) + 2.0, (forget, controls)
    # The retain term keeps its own rows, and retention carries to the retain rows it does not train on.
    assert controls["retain_term"] < 0.3 and after["retain_term_Q_A_ROUGE"] >= 0.9 * before["retain_term_Q_A_ROUGE"]
    assert controls["retain_heldout"] < 0.5, controls
    assert after["retain_heldout_Q_A_ROUGE"] >= 0.6 * before["retain_heldout_Q_A_ROUGE"], (before, after)
    # The real authors and world facts, outside every training term, are damaged boundedly: model utility (retain,
    # real authors and world facts together) keeps a floor (bounds from the spread in the module docstring).
    assert max(controls["ra"], controls["wf"]) < 2.5, controls
    assert after["model_utility"] >= 0.6 * before["model_utility"], (before["model_utility"], after["model_utility"])

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
