"""NaN in, NaN out: every metric and attack given one non-finite input returns NaN (or refuses), never a number.

Each test puts one NaN (or infinity) into otherwise ordinary inputs and checks that the result is NaN while the
finite samples keep their values. Before issue 23, sorting, ``argmax`` and ``nanmean`` turned such inputs into
plausible numbers: one NaN token log-prob gave a Min-K% membership AUC of 0.75.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_unlearn.evaluation.muse import MuseReference
from lightning_unlearn.evaluation.report import non_finite, non_finite_message
from lightning_unlearn.evaluation.selection import select, selection_score
from lightning_unlearn.evaluation.tofu import RetainReference, metric_sets
from lightning_unlearn.metrics import functional as F
from lightning_unlearn.metrics.rouge import RougeLF1, cut_answer, rouge_l_f1
from lightning_unlearn.metrics.tofu import (
    AnswerProbability,
    ExactMemorization,
    ExtractionStrength,
    MembershipInferenceAUC,
    NormalisedAnswerProbability,
    PerSampleMean,
    RougeLRecall,
    TruthRatio,
)

NAN, INF = math.nan, math.inf


def isnan(x: float | torch.Tensor) -> bool:
    return math.isnan(float(x))


# --- the example ----------------------------------------------------------------------------------------

# Token log-probs of two forget and two holdout answers (3 tokens each); the first holdout answer has a NaN.
FORGET_LOGPROBS = [[-1.0, -2.0, -3.0], [-0.5, -0.1, -0.2]]
HOLDOUT_LOGPROBS = [[NAN, -1.0, -1.0], [-4.0, -5.0, -6.0]]


def test_one_nan_token_makes_the_min_k_auc_nan_not_0_75() -> None:
    """Min-K% sorted the NaN last (as +inf fills the padding), scored the sample -inf-like (1.0, the mean of its
    finite lowest token) and the AUC came out 0.75."""
    logprobs = torch.tensor(FORGET_LOGPROBS + HOLDOUT_LOGPROBS)
    scores = F.min_k_score(logprobs, torch.ones(4, 3, dtype=torch.bool), k=0.4)
    assert scores[[0, 1, 3]].tolist() == pytest.approx([3.0, 0.5, 6.0])
    assert isnan(scores[2])
    assert isnan(F.mia_auc(scores[:2], scores[2:]))
    metric = MembershipInferenceAUC()
    metric.update(scores, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert isnan(metric.compute())


# --- per-sample functions of logits -----------------------------------------------------------------------------

LABELS = torch.tensor([[-100, 1, 2, 3], [-100, 1, 2, 3]])  # 3 answer tokens per row, predicted at positions 0-2


def logits_with(value: float, row: int = 1, position: int = 1, column: int = 0) -> torch.Tensor:
    """Two rows of logits whose argmax is the label everywhere; one entry of ``row`` replaced by ``value``."""
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3, 0]] * 2), 5).double() * 4.0
    logits[row, position, column] = value
    return logits


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_answer_token_stats_nan_for_a_non_finite_answer_row(value: float) -> None:
    clean = F.answer_token_stats(logits_with(0.0), LABELS)
    stats = F.answer_token_stats(logits_with(value), LABELS)
    assert stats.mean_nll[0] == pytest.approx(clean.mean_nll[0].item())
    assert isnan(stats.mean_nll[1]) and isnan(stats.sum_nll[1]) and isnan(stats.token_logprobs[1, 1])
    assert stats.token_logprobs[1, [0, 2]].tolist() == pytest.approx(clean.token_logprobs[1, [0, 2]].tolist())


def test_answer_token_stats_minus_inf_on_the_answer_token_is_nan_not_an_infinite_loss() -> None:
    stats = F.answer_token_stats(logits_with(-INF, column=2), LABELS)  # the label of position 1 is token 2
    assert isnan(stats.mean_nll[1])


def test_non_finite_logits_outside_the_answer_do_not_matter() -> None:
    logits = logits_with(NAN, position=3)  # position 3 predicts nothing (no label after it)
    stats = F.answer_token_stats(logits, LABELS)
    assert torch.isfinite(stats.mean_nll).all()
    assert F.exact_memorization(logits, LABELS).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_exact_memorization_and_extraction_strength_nan_for_a_non_finite_row(value: float) -> None:
    """``argmax`` over a row with NaN picks the NaN's position (column 0 here, a wrong token): EM was 2/3."""
    logits = logits_with(value)
    em, es = F.exact_memorization(logits, LABELS), F.extraction_strength(logits, LABELS)
    assert em[0].item() == 1.0 and es[0].item() == 1.0
    assert isnan(em[1]) and isnan(es[1])


def test_min_k_plus_plus_nan_for_a_non_finite_row() -> None:
    scores = F.min_k_plus_plus_score(logits_with(NAN), LABELS, k=0.4)
    assert math.isfinite(scores[0].item()) and isnan(scores[1])


def test_min_k_nan_for_a_non_finite_token_logprob_even_outside_the_lowest() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, INF], [-1.0, -2.0, -3.0]])
    scores = F.min_k_score(logprobs, torch.ones(2, 3, dtype=torch.bool), k=0.4)
    assert isnan(scores[0]) and scores[1].item() == pytest.approx(3.0)
    masked = torch.tensor([[True, True, False], [True, True, True]])  # a NaN at a masked-out position is no input
    assert F.min_k_score(torch.tensor([[-1.0, -2.0, NAN], [-1.0, -2.0, -3.0]]), masked, k=0.4)[0].item() == 2.0


# --- per-sample functions of losses -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_zlib_score_nan_for_a_non_finite_loss(value: float) -> None:
    scores = F.zlib_score(torch.tensor([1.0, value]), ["a", "b"])
    assert math.isfinite(scores[0].item()) and isnan(scores[1])


@pytest.mark.parametrize("ratio", [F.truth_ratio, F.truth_ratio_exact])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_truth_ratios_nan_for_a_non_finite_loss(ratio, value: float) -> None:
    correct = torch.tensor([1.0, value, 1.0])
    perturbed = torch.tensor([[2.0, 2.0], [2.0, 2.0], [2.0, value]])
    out = ratio(correct, perturbed)
    assert math.isfinite(out[0].item()) and isnan(out[1]) and isnan(out[2])


def test_truth_ratio_exact_overflow_stays_inf_not_nan() -> None:
    """An exponential that overflows from finite losses is a ratio, not a broken input."""
    assert F.truth_ratio_exact(torch.tensor([800.0]), torch.tensor([[0.0]])).item() == INF


@pytest.mark.parametrize("aggregate", [F.truth_ratio_forget, F.truth_ratio_true_better])
def test_truth_ratio_aggregates_nan_for_one_nan_ratio(aggregate) -> None:
    assert isnan(aggregate(torch.tensor([0.5, NAN, 2.0])))


def test_normalised_probability_nan_for_a_nan_probability() -> None:
    out = F.normalised_probability(torch.tensor([0.5, 0.5]), torch.tensor([[0.1, 0.1], [0.1, NAN]]))
    assert math.isfinite(out[0].item()) and isnan(out[1])


def test_rouge_of_a_missing_generation_is_nan() -> None:
    """``None``: a generation that read non-finite logits (its text is an argmax over NaN)."""
    recall = F.rouge_l_recall(["the cat sat", None], ["the cat sat", "a dog"])
    f1 = rouge_l_f1(["the cat sat", None], ["the cat sat", "a dog"])
    assert recall[0] == 1.0 and f1[0] == 1.0 and isnan(recall[1]) and isnan(f1[1])
    assert cut_answer(None) is None


# --- aggregates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_forget_quality_nan_for_a_non_finite_ratio(value: float) -> None:
    assert math.isfinite(F.forget_quality([0.5, 0.6, 0.7], [0.5, 0.6, 0.8]))
    assert isnan(F.forget_quality([0.5, value, 0.7], [0.5, 0.6, 0.8]))
    assert isnan(F.forget_quality([0.5, 0.6, 0.7], [0.5, value, 0.8]))


def test_model_utility_nan_for_a_nan_part_even_beside_a_zero() -> None:
    values = {key: 0.5 for key in F.MODEL_UTILITY_KEYS}
    assert isnan(F.model_utility({**values, "retain_Q_A_Prob": NAN}))
    assert isnan(F.model_utility({**values, "retain_Q_A_Prob": NAN, "wf_Q_A_ROUGE": 0.0}))
    assert isnan(F.model_utility({**values, "ra_Truth_Ratio": INF}))


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_mia_auc_nan_for_one_non_finite_score(value: float) -> None:
    assert F.mia_auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert isnan(F.mia_auc([1.0, 2.0], [3.0, value]))
    assert isnan(F.mia_auc([value, 2.0], [3.0, 4.0]))


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_privleak_nan_for_a_non_finite_auc(value: float) -> None:
    assert isnan(F.privleak(value, 0.5)) and isnan(F.privleak(0.5, value))


def test_average_ranks_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN has no rank"):
        F.average_ranks(torch.tensor([1.0, NAN]))


# --- torchmetrics classes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [PerSampleMean, ExtractionStrength], ids=["mean", "extraction_strength"])
def test_per_sample_means_nan_for_one_nan(metric) -> None:
    m = metric()
    m.update(torch.tensor([0.5, NAN, 0.25]), torch.tensor([0, 1, 2]))
    assert isnan(m.compute())


def test_answer_probability_nan_for_a_non_finite_loss() -> None:
    """``exp(-inf) = 0`` would have been a finite probability."""
    m = AnswerProbability()
    m.update(torch.tensor([0.1, INF]))
    assert isnan(m.compute())


def test_normalised_probability_metric_nan_for_a_nan_loss() -> None:
    m = NormalisedAnswerProbability()
    m.update(torch.tensor([0.1, 0.2]), torch.tensor([[1.0, 1.0], [1.0, NAN]]))
    assert isnan(m.compute())


@pytest.mark.parametrize("aggregation", ["forget", "true_better"])
@pytest.mark.parametrize("exact", [False, True])
def test_truth_ratio_metric_nan_for_one_nan_loss(aggregation: str, exact: bool) -> None:
    m = TruthRatio(aggregation, exact=exact)
    m.update(torch.tensor([1.0, NAN]), torch.tensor([[2.0], [2.0]]))
    assert isnan(m.compute())
    assert math.isfinite(m.per_sample()[0].item())


def test_exact_memorization_metric_nan_for_a_nan_sample_but_skips_samples_without_answer() -> None:
    """Today's ``nanmean`` dropped the NaN of a sample scored from NaN logits and reported the others' mean."""
    m = ExactMemorization()
    m.update(torch.tensor([1.0, NAN, 0.5]), torch.tensor([0, 1, 2]), has_answer=torch.tensor([True, True, True]))
    assert isnan(m.compute())
    undefined = ExactMemorization()  # the NaN of a sample without answer tokens is left out, as open-unlearning
    undefined.update(torch.tensor([1.0, NAN, 0.5]), torch.tensor([0, 1, 2]),
                     has_answer=torch.tensor([True, False, True]))
    assert undefined.compute().item() == pytest.approx(0.75)
    assert undefined.defined().tolist() == [True, False, True]
    strict = ExactMemorization()  # without has_answer every sample counts
    strict.update(torch.tensor([1.0, NAN]))
    assert isnan(strict.compute())


@pytest.mark.parametrize("metric", [RougeLRecall, RougeLF1], ids=["recall", "f1"])
def test_rouge_metrics_nan_for_a_missing_generation(metric) -> None:
    m = metric()
    m.update(["the cat sat", None], ["the cat sat", "a dog"], torch.tensor([0, 1]))
    assert isnan(m.compute())


# --- references, selection, the summary's flag ------------------------------------------------------------------


def test_a_retain_reference_with_nan_ratios_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "TOFU_EVAL.json"
    report = {"forget_truth_ratio": {"value_by_index": {"0": {"score": 0.5}, "1": {"score": NAN}}},
              "mia_min_k": {"agg_value": 0.5}}
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"TOFU_EVAL.json: forget_truth_ratio.value_by_index holds 1 values"):
        RetainReference.from_file(path)
    report["forget_truth_ratio"]["value_by_index"]["1"]["score"] = 0.7
    report["mia_min_k"]["agg_value"] = NAN
    path.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="mia_min_k"):
        RetainReference.from_file(path)
    muse = tmp_path / "MUSE_EVAL.json"
    muse.write_text(json.dumps({"mia_min_k": {"agg_value": NAN}}))
    with pytest.raises(ValueError, match="not a finite number"):
        MuseReference.from_file(muse)


def test_selection_never_picks_a_non_finite_summary() -> None:
    assert selection_score(INF, 0.95, floor=0.9) == -INF and selection_score(0.5, INF, floor=0.9) == -INF
    broken = [{"forget_quality": NAN, "model_utility_vs_retain": 1.0},
              {"forget_quality": 0.5, "model_utility_vs_retain": NAN}]
    assert select(broken) is None, "no summary was measured: none is selected (not the first)"
    assert select([*broken, {"forget_quality": 0.01, "model_utility_vs_retain": 0.95}])["forget_quality"] == 0.01


def test_non_finite_names_metrics_samples_and_sets() -> None:
    summary = {"forget_Q_A_Prob": NAN, "retain_Q_A_Prob": 0.5, "model_utility": NAN, "forget_quality": None,
               "mia_min_k": NAN, "arc_easy/acc": 0.3}
    report = {"forget_Q_A_Prob": {"agg_value": NAN, "value_by_index": {"0": {"prob": 0.5}, "1": {"prob": NAN}}},
              "retain_Q_A_Prob": {"agg_value": 0.5, "value_by_index": {"0": {"prob": 0.5}}},
              "exact_memorization": {"agg_value": 0.5, "value_by_index": {"0": {"score": 0.5}, "1": {"score": None}}},
              "mia_min_k": {"agg_value": NAN, "forget": {"value_by_index": {"0": {"score": 1.0}}},
                            "holdout": {"value_by_index": {"0": {"score": NAN}, "1": {"score": NAN}}}},
              "model_utility": {"agg_value": NAN}}
    found = non_finite(summary, report, metric_sets)
    assert found == {"metrics": {"forget_Q_A_Prob": 1, "model_utility": 0, "mia_min_k": 2},
                     "sets": ["forget", "holdout"]}
    message = non_finite_message("TOFU", found)
    assert message is not None and "NON-FINITE" in message and "forget_Q_A_Prob (1 samples)" in message
    assert non_finite({"a": 0.5, "b": None}, {}, metric_sets) == {"metrics": {}, "sets": []}
    assert non_finite_message("TOFU", {"metrics": {}, "sets": []}) is None


def test_plots_skip_non_finite_points_instead_of_failing(tmp_path: Path) -> None:
    """A validation whose forget quality was NaN at the first epoch made the epoch plot fail (NaN axis limits),
    and with it the run."""
    from lightning_unlearn.evaluation.report import plot_history
    from lightning_unlearn.evaluation.tradeoff_plot import save_tradeoff, series_figure

    points = [{"epoch": 0, "forget_quality": NAN, "model_utility": 0.5, "x": NAN},
              {"epoch": 1, "forget_quality": 0.3, "model_utility": 0.4, "x": 0.2}]
    figure = series_figure(points, "epoch", "t")
    assert [p.label for p in figure.points] == ["epoch 1"] and figure.skipped == ["epoch 0"]
    assert save_tradeoff(figure, tmp_path / "a.png") == tmp_path / "a.png"
    assert plot_history(points, "x", "model_utility", "epoch", tmp_path / "b.png", "t") == tmp_path / "b.png"
    assert save_tradeoff(series_figure(points[:1], "epoch", "t"), tmp_path / "c.png") is None


def test_comparison_lists_cells_whose_results_are_not_finite() -> None:
    from lightning_unlearn.compare.table import markdown, rows

    broken = {"forget_quality": NAN, "model_utility": NAN, "all_finite": False,
              "non_finite": {"metrics": {"model_utility": 0, "forget_quality": 0}, "sets": ["forget"]}}
    table = rows([{"method": "GA", "mode": "direct", "status": "ok", "summary": broken}],
                 {"fine-tuned": {"forget_quality": 0.1, "all_finite": True, "non_finite": {"metrics": {}, "sets": []}}})
    assert table[0]["non_finite"] is None and table[1]["non_finite"] == ["forget_quality", "model_utility"]
    assert "- GA direct: forget_quality, model_utility" in markdown(table, "# t")
