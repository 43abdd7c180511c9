"""Hand-computed checks of the torchmetrics classes in ``lightning_unlearn.metrics.tofu``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_unlearn.metrics import (
    AnswerProbability,
    ExactMemorization,
    ExtractionStrength,
    MembershipInferenceAUC,
    NormalisedAnswerProbability,
    RougeLRecall,
    TruthRatio,
)

LN2 = math.log(2.0)


def f64(values: list[float] | list[list[float]]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_answer_probability() -> None:
    metric = AnswerProbability()
    metric.update(f64([LN2, 2 * LN2]))  # probabilities 1/2 and 1/4
    assert metric.compute().item() == pytest.approx(0.375)
    assert metric.per_sample().tolist() == pytest.approx([0.5, 0.25])


def test_normalised_answer_probability() -> None:
    metric = NormalisedAnswerProbability()
    # p_true = 1/2, perturbed 1/4 and 1/4 -> 0.5 / 1.0; p_true = 1/4, perturbed 1/4 -> 0.5 / ...
    # second: 0.25 / (0.25 + 0.25 + 0.25) = 1/3
    metric.update(f64([LN2, 2 * LN2]), f64([[2 * LN2, 2 * LN2], [2 * LN2, 2 * LN2]]))
    assert metric.per_sample().tolist() == pytest.approx([0.5, 1 / 3])
    assert metric.compute().item() == pytest.approx((0.5 + 1 / 3) / 2)


def test_normalised_answer_probability_of_negligible_options_is_zero() -> None:
    # all probabilities ~e^-200: the 1e-10 in the denominator (as open-unlearning) dominates, so a
    # collapsed model scores ~0 rather than NaN or an arbitrary ratio of vanishing numbers
    metric = NormalisedAnswerProbability()
    metric.update(torch.tensor([200.0]), torch.tensor([[200.0]]))
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-60)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        # R = (e^-2, e): min(R, 1/R) = (e^-2, e^-1)
        ("forget", (math.exp(-2.0) + math.exp(-1.0)) / 2),
        # max(0, 1 - R) = (1 - e^-2, 0)
        ("true_better", (1.0 - math.exp(-2.0)) / 2),
    ],
)
def test_truth_ratio(aggregation: str, expected: float) -> None:
    metric = TruthRatio(aggregation)  # type: ignore[arg-type]
    metric.update(f64([1.0, 2.0]), f64([[2.0, 4.0], [1.0, 1.0]]))
    assert metric.compute().item() == pytest.approx(expected)
    assert metric.per_sample().tolist() == pytest.approx([math.exp(-2.0), math.e])


def test_truth_ratio_rejects_unknown_aggregation() -> None:
    with pytest.raises(ValueError, match="aggregation"):
        TruthRatio("closer_to_1")  # type: ignore[arg-type]


def test_rouge_l_recall_metric() -> None:
    metric = RougeLRecall()
    metric.update(["the cat sat on the mat", "the cat"], ["the cat is on the mat", "the cat sat"])
    # 5/6 and 2/3 (see the functional tests)
    assert metric.per_sample().tolist() == pytest.approx([5 / 6, 2 / 3])
    assert metric.compute().item() == pytest.approx((5 / 6 + 2 / 3) / 2)


@pytest.mark.parametrize("metric_cls", [ExactMemorization, ExtractionStrength])
def test_per_sample_mean_metrics(metric_cls: type) -> None:
    metric = metric_cls()
    metric.update(f64([1.0, 0.5, 0.0, 0.25]))
    assert metric.compute().item() == pytest.approx(0.4375)
    assert metric.per_sample().tolist() == [1.0, 0.5, 0.0, 0.25]


def test_membership_inference_auc_with_ties() -> None:
    metric = MembershipInferenceAUC()
    metric.update(f64([1.0, 2.0, 2.0, 3.0]), torch.tensor([False, False, True, True]))
    # forget (1, 2) vs holdout (2, 3): 1 + 1 + 0.5 + 1 over 4 pairs
    assert metric.compute().item() == pytest.approx(0.875)
    assert metric.per_sample().tolist() == [1.0, 2.0, 2.0, 3.0]
    assert metric.holdout_mask().tolist() == [False, False, True, True]


def test_membership_inference_auc_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="is_holdout"):
        MembershipInferenceAUC().update(f64([1.0, 2.0]), torch.tensor([True]))


Case = tuple[Callable[[], object], list[tuple[object, ...]]]

CASES: dict[str, Case] = {
    "answer_probability": (AnswerProbability, [(f64([0.1]),), (f64([0.7, 2.0]),)]),
    "normalised": (
        NormalisedAnswerProbability,
        [(f64([0.3]), f64([[1.0, 2.0]])), (f64([1.5, 0.2]), f64([[0.1, 0.4], [3.0, 0.5]]))],
    ),
    "truth_ratio": (
        lambda: TruthRatio("forget"),
        [(f64([0.3]), f64([[1.0, 2.0]])), (f64([1.5, 0.2]), f64([[0.1, 0.4], [3.0, 0.5]]))],
    ),
    "rouge": (RougeLRecall, [(["a b c"], ["a c"]), (["x", "b a"], ["x y", "a b"])]),
    "exact_memorization": (ExactMemorization, [(f64([0.2]),), (f64([0.9, 0.4]),)]),
    "extraction_strength": (ExtractionStrength, [(f64([1.0]),), (f64([0.0, 0.5]),)]),
    "mia": (
        MembershipInferenceAUC,
        [
            (f64([1.0, 4.0]), torch.tensor([False, True])),
            (f64([2.0, 3.0, 3.0]), torch.tensor([True, False, True])),
        ],
    ),
}


def _concat_batches(batches: list[tuple[object, ...]]) -> tuple[object, ...]:
    joined = []
    for parts in zip(*batches):
        if isinstance(parts[0], Tensor):
            joined.append(torch.cat(parts))  # type: ignore[arg-type]
        else:
            joined.append([item for part in parts for item in part])  # type: ignore[union-attr]
    return tuple(joined)


@pytest.mark.parametrize("name", list(CASES))
def test_two_batches_equal_one_batch(name: str) -> None:
    factory, batches = CASES[name]
    split, whole = factory(), factory()
    for batch in batches:
        split.update(*batch)  # type: ignore[attr-defined]
    whole.update(*_concat_batches(batches))  # type: ignore[attr-defined]
    assert split.compute().item() == pytest.approx(whole.compute().item())  # type: ignore[attr-defined]
    assert torch.equal(split.per_sample(), whole.per_sample())  # type: ignore[attr-defined]


def test_per_sample_follows_new_updates_and_reset() -> None:
    metric = ExactMemorization()
    metric.update(f64([1.0]))
    assert metric.compute().item() == 1.0
    metric.update(f64([0.0]))
    assert metric.per_sample().tolist() == [1.0, 0.0]
    assert metric.compute().item() == 0.5
    metric.reset()
    metric.update(f64([0.25]))
    assert metric.per_sample().tolist() == [0.25]


def _two_rank_gather(tensor: Tensor, group: object = None) -> list[Tensor]:
    """Stands in for all_gather: a second rank that saw a copy of this rank's data, plus one."""
    return [tensor, tensor + 1.0]


def test_compute_and_per_sample_use_values_gathered_across_ranks() -> None:
    metric = AnswerProbability(
        dist_sync_fn=_two_rank_gather, distributed_available_fn=lambda: True
    )
    metric.update(f64([0.0]))
    metric.update(f64([LN2]))
    # rank 0: probabilities (1, 1/2); the fake rank 1 holds (2, 3/2)
    assert metric.per_sample().tolist() == pytest.approx([1.0, 0.5, 2.0, 1.5])
    assert metric.compute().item() == pytest.approx(1.25)
    # local state is restored after the synced compute
    assert torch.cat(metric.values).tolist() == pytest.approx([1.0, 0.5])


def test_membership_inference_auc_gathers_labels_with_scores() -> None:
    def gather(tensor: Tensor, group: object = None) -> list[Tensor]:
        return [tensor, tensor.clone()]

    metric = MembershipInferenceAUC(dist_sync_fn=gather, distributed_available_fn=lambda: True)
    metric.update(f64([1.0, 2.0]), torch.tensor([False, True]))
    # forget (1, 1) vs holdout (2, 2): every pair ordered -> AUC 1
    assert metric.compute().item() == pytest.approx(1.0)
    assert metric.holdout_mask().tolist() == [False, True, False, True]


# --- dataset indices: repeated samples count once ------------------------------------------------


def test_repeated_indices_count_once_in_index_order() -> None:
    # what a padded distributed sampler produces: index 0 twice (its value may differ in the last bits)
    metric = AnswerProbability()
    metric.update(f64([LN2, 0.0]), index=torch.tensor([2, 0]))
    metric.update(f64([2 * LN2, 0.0 + 1e-12]), index=torch.tensor([1, 0]))
    assert metric.sample_index() == [0, 1, 2]
    assert metric.per_sample().tolist() == pytest.approx([1.0, 0.25, 0.5])
    assert metric.compute().item() == pytest.approx(1.75 / 3)  # not (1 + 0.25 + 0.5 + 1) / 4


def test_index_on_some_updates_only_is_refused() -> None:
    metric = ExactMemorization()
    metric.update(f64([1.0]), index=torch.tensor([0]))
    metric.update(f64([0.0]))
    with pytest.raises(ValueError, match="index with every update"):
        metric.compute()
    with pytest.raises(ValueError, match="2 values but 1 indices"):
        ExactMemorization().update(f64([1.0, 0.0]), index=torch.tensor([0]))


def test_exact_memorization_mean_leaves_out_samples_without_tokens() -> None:
    """Said by ``has_answer``: any other NaN (non-finite logits) makes the mean NaN (tests/metrics/test_non_finite)."""
    metric = ExactMemorization()
    metric.update(f64([1.0, math.nan, 0.5]), has_answer=torch.tensor([True, False, True]))
    assert metric.compute().item() == pytest.approx(0.75)


def test_truth_ratio_metric_reports_open_unlearnings_ratio_and_the_exact_one() -> None:
    # the collapsed case of issue 10: L_correct 30, perturbed 25 and 27
    correct, perturbed = f64([30.0]), f64([[25.0, 27.0]])
    ours, exact = TruthRatio("forget"), TruthRatio("forget", exact=True)
    ours.update(correct, perturbed, index=torch.tensor([0]))
    exact.update(correct, perturbed, index=torch.tensor([0]))
    assert ours.per_sample().tolist() == pytest.approx([math.exp(-26.0) / (math.exp(-30.0) + 1e-10)])
    assert ours.compute().item() == pytest.approx(0.05104, abs=1e-5)
    assert exact.per_sample().tolist() == pytest.approx([math.exp(4.0)])
    assert exact.compute().item() == pytest.approx(math.exp(-4.0))


def test_membership_inference_keys_samples_by_group_and_index() -> None:
    # forget 0 and holdout 0 are different samples; forget 1 arrives twice
    metric = MembershipInferenceAUC()
    metric.update(f64([1.0, 4.0, 2.0]), torch.tensor([False, True, False]), index=torch.tensor([0, 0, 1]))
    metric.update(f64([2.0, 3.0]), torch.tensor([False, True]), index=torch.tensor([1, 1]))
    assert metric.per_sample().tolist() == [1.0, 2.0, 4.0, 3.0]
    assert metric.holdout_mask().tolist() == [False, False, True, True]
    assert metric.sample_index() == [0, 1, 0, 1]
    assert metric.compute().item() == pytest.approx(1.0)
