"""An evaluation of a model whose logits are NaN says so in its summary file and on the console (issue 23, item 2).

The model is the tiny small model with one row of its output layer set to NaN, so every logit row holds a NaN, as
a broken checkpoint or an overflow would give. Before issue 23 its ``test`` exited 0 with a TOFU summary of
plausible numbers: Min-K% and Min-K%++ membership AUCs of 0.5 (sorting put the NaN last), exact memorization and
extraction strength from an argmax over NaN, ROUGE of the text that argmax generated, and model utility "missing".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.muse_world import build_muse_world
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[3]
TOFU_EVAL = str(ROOT / "configs" / "tests" / "tofu_eval.yaml")
MUSE_TEST = str(ROOT / "configs" / "tests" / "muse.yaml")
# Scored from logits (teacher forced) or generated text: each is NaN for a NaN model. forget_quality needs the
# forget truth ratios, privleak the Min-K% AUC, model utility the retain, real-authors and world-facts parts.
TOFU_NAN = {"forget_nll", "retain_nll", "forget_Q_A_Prob", "forget_truth_ratio", "forget_Q_A_ROUGE",
            "retain_Q_A_ROUGE", "ra_Q_A_ROUGE", "wf_Q_A_ROUGE", "exact_memorization", "extraction_strength",
            "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "forget_quality", "privleak", "model_utility",
            "model_utility_vs_retain", "ra_Q_A_Prob_normalised", "wf_Truth_Ratio"}


@pytest.fixture(scope="module")
def nan_model(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny small model with a NaN in its output layer: every position's logits hold a NaN."""
    folder = tmp_path_factory.mktemp("nan_model")
    model = load_causal_lm(tiny_world["small"], "float32")
    with torch.no_grad():
        model.lm_head.weight[7].fill_(math.nan)
    model.save_pretrained(folder)
    load_tokenizer(tiny_world["small"]).save_pretrained(folder)
    return str(folder)


def reference(folder: Path) -> Path:
    """A retain model's TOFU_EVAL.json with finite values, so that forget quality and privleak are computed."""
    path = folder / "RETAIN_TOFU_EVAL.json"
    path.write_text(json.dumps({"forget_truth_ratio": {"value_by_index": {str(i): {"score": 0.3 + 0.2 * i}
                                                                          for i in range(3)}},
                                "mia_min_k": {"agg_value": 0.45}, "model_utility": {"agg_value": 0.4}}))
    return path


def test_tofu_test_of_a_nan_model_flags_every_metric_in_summary_and_console(
        nan_model: str, tmp_cwd: Path, capsys: pytest.CaptureFixture) -> None:
    cli = main(["test", "--config", TOFU_EVAL, "--model", "GA", "--model.small_model", nan_model,
                "--model.large_model", "null", "--trainer.callbacks", "null",
                "--model.retain_reference", str(reference(tmp_cwd))])
    out = Path(cli.trainer.log_dir)
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    for key in TOFU_NAN:
        assert math.isnan(summary[key]), f"{key} = {summary[key]} from NaN logits"
    assert summary["all_finite"] is False
    flagged = summary["non_finite"]
    assert TOFU_NAN <= set(flagged["metrics"])
    assert flagged["metrics"]["forget_Q_A_Prob"] == 3 and flagged["metrics"]["mia_min_k"] == 6  # 3 forget + 3 holdout
    assert flagged["sets"] == ["forget", "holdout", "ra", "retain", "wf"]
    report = json.loads((out / "TOFU_EVAL.json").read_text())
    assert all(v["generation"] is None for v in report["forget_Q_A_ROUGE"]["value_by_index"].values())
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "TOFU evaluation: NON-FINITE results:" in printed
    assert "forget_Q_A_Prob (3 samples)" in printed and "mia_min_k (6 samples)" in printed
    assert "sets with non-finite scores: forget, holdout, ra, retain, wf" in printed
    assert "(all_finite: false; see non_finite)" in printed


def test_tofu_test_of_a_sound_model_is_all_finite(tiny_world: dict, tmp_cwd: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cli = main(["test", "--config", TOFU_EVAL, "--model", "GA", "--model.small_model", tiny_world["small"],
                "--model.large_model", "null", "--trainer.callbacks", "null"])
    summary = json.loads((Path(cli.trainer.log_dir) / "TOFU_SUMMARY.json").read_text())
    assert summary["all_finite"] is True and summary["non_finite"] == {"metrics": {}, "sets": []}
    assert "NON-FINITE" not in capsys.readouterr().out


def test_validation_of_a_nan_model_flags_its_history_and_warns(nan_model: str, tmp_cwd: Path) -> None:
    """The per-epoch history (what checkpoint selection and the epoch plot read) carries the flag too. (``fit`` of
    this model stops at its first step: the loss is NaN; ``validate`` runs the validation alone.)"""
    with pytest.warns(UserWarning, match="TOFU evaluation: NON-FINITE results: .* \\(validation at epoch 0\\)"):
        cli = main(["validate", "--config", TOFU_EVAL, "--model", "GA", "--model.small_model", nan_model,
                    "--model.large_model", "null", "--trainer.callbacks", "null"])
    history = json.loads((Path(cli.trainer.log_dir) / "TOFU_HISTORY.json").read_text())
    assert history[0]["all_finite"] is False and "forget_Q_A_Prob" in history[0]["non_finite"]["metrics"]


def test_muse_test_of_a_nan_model_flags_every_metric(nan_model: str, tiny_world: dict, tmp_cwd: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    world = build_muse_world(tmp_cwd / "world", icl=1)
    main(["test", "--config", MUSE_TEST, "--data.dataset", str(world), "--model", "GA", "--model.small_model",
          nan_model, "--model.large_model", "null", "--trainer.fast_dev_run", "false", "--data.eval_subset", "3",
          "--trainer.default_root_dir", "muse"])
    summary = json.loads((tmp_cwd / "muse" / "MUSE_SUMMARY.json").read_text())
    measured = {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "extraction_strength",
                "mia_min_k"}
    assert all(math.isnan(summary[key]) for key in measured)
    assert summary["all_finite"] is False and measured <= set(summary["non_finite"]["metrics"])
    assert summary["non_finite"]["sets"] == ["knowmem_forget", "knowmem_retain", "privleak_forget",
                                             "privleak_holdout", "verbmem_forget"]
    assert "MUSE evaluation: NON-FINITE results:" in " ".join(capsys.readouterr().out.split())


def test_lm_eval_of_a_nan_model_reports_nan_not_an_accuracy(nan_model: str) -> None:
    """lm-eval ranks choices with ``argmax``, which takes a NaN for the largest: a NaN model scored every item whose
    gold answer comes first as right. Its accuracy is NaN now, and the result says how many requests were NaN."""
    from lightning_unlearn.harness.model import UnlearnedLM
    from lightning_unlearn.harness.run import evaluate, flat_metrics

    results = evaluate(UnlearnedLM(nan_model, batch_size=8), ["tofu_world_facts_mc"], limit=4, bootstrap_iters=0)
    metrics = flat_metrics(results)
    assert {"tofu_world_facts_mc/acc", "tofu_world_facts_mc/acc_norm"} <= set(metrics)
    assert all(math.isnan(v) for v in metrics.values())
    assert results["non_finite_requests"] == 16  # 4 items x 4 choices


def test_greedy_generation_flags_exactly_the_rows_that_read_non_finite_logits() -> None:
    """A component whose next-token logits are NaN after token 3: the row that reaches 3 is flagged, the other is
    not, and the tokens are those of decoding without the flag (its argmax over NaN is what ROUGE must not score).
    """
    from lightning_unlearn.offset.generation import greedy_generate

    def component(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object) -> torch.Tensor:
        logits = torch.nn.functional.one_hot((ids + 1) % 10, 10).float() * 5.0  # next token: this one + 1
        logits[ids == 3] = math.nan
        return logits

    prompts = torch.tensor([[5, 4], [5, 2]])  # row 0: 5, 6, 7, 8, 9 (end); row 1: 3, then NaN logits
    flags = torch.zeros(2, dtype=torch.bool)
    kwargs = {"max_new_tokens": 6, "eos_token_id": 9, "pad_token_id": 0}
    tokens = greedy_generate([(component, 1.0)], prompts, torch.ones_like(prompts), nonfinite=flags, **kwargs)
    assert flags.tolist() == [False, True]
    assert tokens[0].tolist()[:5] == [5, 6, 7, 8, 9]
    assert torch.equal(tokens, greedy_generate([(component, 1.0)], prompts, torch.ones_like(prompts), **kwargs))
