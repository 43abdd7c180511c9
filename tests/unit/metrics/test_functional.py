"""Hand-computed checks of ``lightning_unlearn.metrics.functional``.

Logits are built as ``log(p)`` for a chosen distribution p (log-softmax of log p is log p), or as
scaled one-hot vectors when only the argmax matters, so every expected value is written out.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from lightning_unlearn.metrics import functional as F

LN2 = math.log(2.0)


def logits_from_probs(rows: list[list[list[float]]]) -> torch.Tensor:
    """[B][T][V] probabilities -> logits whose softmax is exactly those probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log()


def logits_from_argmax(preds: list[list[int]], vocab: int = 4) -> torch.Tensor:
    """[B][T] predicted tokens -> logits with that argmax at every position."""
    return torch.nn.functional.one_hot(torch.tensor(preds), vocab).to(torch.float64) * 10.0


UNIFORM = [0.25, 0.25, 0.25, 0.25]


# --- answer_token_stats -------------------------------------------------------------------------


def test_answer_token_stats_shifts_and_masks() -> None:
    # labels[t+1] is scored by logits[t]: p(2 | pos 0) = 0.5, p(0 | pos 1) = 0.25.
    logits = logits_from_probs([[[0.1, 0.2, 0.5, 0.2], UNIFORM, UNIFORM, UNIFORM]])
    labels = torch.tensor([[-100, 2, 0, -100]])
    stats = F.answer_token_stats(logits, labels)
    # sum = -ln 0.5 - ln 0.25 = ln 2 + 2 ln 2 = 3 ln 2, over 2 tokens.
    assert stats.sum_nll.tolist() == pytest.approx([3 * LN2])
    assert stats.n_tokens.tolist() == [2]
    assert stats.mean_nll.tolist() == pytest.approx([1.5 * LN2])
    assert stats.mask.tolist() == [[True, True, False]]
    assert stats.token_logprobs[0].tolist() == pytest.approx([-LN2, -2 * LN2, 0.0])


def test_answer_token_stats_ignores_logits_at_masked_positions() -> None:
    labels = torch.tensor([[-100, 1, -100], [-100, -100, 3]])
    logits = logits_from_probs(
        [[[0.1, 0.8, 0.05, 0.05], UNIFORM, UNIFORM], [UNIFORM, [0.1, 0.1, 0.1, 0.7], UNIFORM]]
    )
    changed = logits.clone()
    changed[0, 1:] = torch.randn(2, 4, dtype=torch.float64)  # row 0 only uses position 0
    changed[1, 0] = torch.randn(4, dtype=torch.float64)  # row 1 only uses position 1
    for lg in (logits, changed):
        stats = F.answer_token_stats(lg, labels)
        assert stats.mean_nll.tolist() == pytest.approx([-math.log(0.8), -math.log(0.7)])
        assert stats.n_tokens.tolist() == [1, 1]


def test_answer_token_stats_matches_hugging_face_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    stats = F.answer_token_stats(logits, labels)
    hf_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert stats.sum_nll.sum() / stats.n_tokens.sum() == pytest.approx(hf_loss.item(), rel=1e-6)


def test_answer_token_stats_without_answer_tokens_is_nan() -> None:
    stats = F.answer_token_stats(torch.zeros(1, 3, 4), torch.full((1, 3), -100))
    assert stats.n_tokens.tolist() == [0]
    assert math.isnan(stats.mean_nll.item())


def test_answer_token_stats_rejects_misaligned_shapes() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        F.answer_token_stats(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


def test_drop_last_answer_token() -> None:
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, -100, -100, -100], [1, 2, 3, 4, 9],
                           [8, -100, -100, -100, -100]])
    assert F.drop_last_answer_token(labels).tolist() == [
        [-100, 5, 6, -100, -100],
        [-100, -100, -100, -100, -100],
        [1, 2, 3, 4, -100],
        [-100, -100, -100, -100, -100],  # a lone answer token at position 0 is the last one too
    ]
    assert labels[0, 3] == 7  # input untouched


# --- exact memorization and extraction strength --------------------------------------------------


def test_exact_memorization_counts_answer_tokens_only() -> None:
    # answer = (2, 0, 3) at positions 2..4, scored by logits 1..3; logits 0 (prompt) is wrong.
    labels = torch.tensor([[-100, -100, 2, 0, 3]])
    logits = logits_from_argmax([[1, 2, 1, 3, 0]])
    # predictions for the answer: 2 (right), 1 (wrong), 3 (right) -> 2/3
    assert F.exact_memorization(logits, labels).tolist() == pytest.approx([2 / 3])


@pytest.mark.parametrize(
    ("answer_preds", "expected"),
    [
        ([1, 2, 3, 0], 1.0),  # all right: k = 0
        # nothing extractable: open-unlearning's search over k = 0..|y|-1 ends at k = 3, ES = 1/|y|
        ([0, 0, 0, 1], 0.25),
        ([1, 2, 3, 1], 0.25),  # only the last token wrong: the same 1/|y|
        ([1, 0, 3, 0], 0.5),  # tail from index 2 right: k = 2, 1 - 2/4
        ([3, 2, 3, 0], 0.75),  # only the first wrong: k = 1
        ([0, 0, 1, 0], 0.25),  # only the last right: k = 3
    ],
)
def test_extraction_strength(answer_preds: list[int], expected: float) -> None:
    labels = torch.tensor([[-100, 1, 2, 3, 0]])  # answer (1, 2, 3, 0), one prompt token
    logits = logits_from_argmax([answer_preds + [2]])  # last position predicts nothing
    assert F.extraction_strength(logits, labels).tolist() == pytest.approx([expected])


def test_extraction_strength_when_nothing_is_extractable_is_one_over_answer_length() -> None:
    # issue 10: a 5-token answer of which no token is predicted gave 0; open-unlearning gives 1/5.
    labels = torch.tensor([[-100, 1, 2, 3, 0, 1], [-100, 1, 2, -100, -100, -100]])
    logits = logits_from_argmax([[0, 0, 0, 1, 2, 0], [3, 3, 0, 0, 0, 0]])
    assert F.extraction_strength(logits, labels).tolist() == pytest.approx([0.2, 0.5])


def test_extraction_strength_and_exact_memorization_without_answer_tokens() -> None:
    # as open-unlearning: ES 0, EM undefined (NaN here, None there; left out of the mean)
    labels = torch.tensor([[-100, -100, -100]])
    logits = logits_from_argmax([[1, 2, 3]])
    assert F.extraction_strength(logits, labels).tolist() == [0.0]
    assert math.isnan(F.exact_memorization(logits, labels).item())


def test_extraction_strength_ignores_prompt_and_padding() -> None:
    labels = torch.tensor([[-100, -100, 1, 2, -100, -100]])
    # prompt position 0 and padding positions 3, 4 predict wrong tokens; answer right -> ES 1.
    logits = logits_from_argmax([[3, 1, 2, 3, 3, 3]])
    assert F.extraction_strength(logits, labels).tolist() == [1.0]
    assert F.exact_memorization(logits, labels).tolist() == [1.0]


# --- membership inference scores ---------------------------------------------------------------


def test_min_k_score_lowest_fraction() -> None:
    token_logprobs = torch.tensor([[-1.0, -3.0, -2.0, -0.5, -4.0], [-1.0, -2.0, -50.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    # row 0: floor(0.4 * 5) = 2 lowest: -4, -3 -> -(-3.5); row 1: floor(0.8) = 0 -> 1 token: -2,
    # the masked -50 is not a candidate.
    assert F.min_k_score(token_logprobs, mask, k=0.4).tolist() == pytest.approx([3.5, 2.0])
    # k = 1 is the plain mean NLL: (1 + 3 + 2 + 0.5 + 4) / 5 = 2.1 and (1 + 2) / 2.
    assert F.min_k_score(token_logprobs, mask, k=1.0).tolist() == pytest.approx([2.1, 1.5])


def test_min_k_scores_without_answer_tokens_are_zero() -> None:
    # open-unlearning's attacks return 0 for a sample without tokens (not NaN, which would break the AUC)
    assert F.min_k_score(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool)).tolist() == [0.0]
    logits = logits_from_probs([[UNIFORM, UNIFORM, UNIFORM]])
    assert F.min_k_plus_plus_score(logits, torch.tensor([[-100, -100, -100]])).tolist() == [0.0]


def test_min_k_score_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        F.min_k_score(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), k=0.0)


def test_min_k_plus_plus_standardises_by_the_model_distribution() -> None:
    # With p = (0.8, 0.2): mu = 0.8 ln 0.8 + 0.2 ln 0.2, var = 0.8 * 0.2 * (ln 0.8 - ln 0.2)^2,
    # so sigma = 0.4 ln 4. Token 0: (ln 0.8 - mu) = 0.2 ln 4 -> z = 0.5;
    # token 1: (ln 0.2 - mu) = -0.8 ln 4 -> z = -2. A uniform position has var 0 (floored) and z 0.
    two_point, uniform = [0.8, 0.2], [0.5, 0.5]
    logits = logits_from_probs([[two_point, two_point, uniform, uniform]])
    labels = torch.tensor([[-100, 0, 1, 0]])  # z = (0.5, -2, 0)
    # k = 0.4: floor(1.2) = 1 lowest -> -(-2); k = 1: -(0.5 - 2 + 0) / 3 = 0.5
    assert F.min_k_plus_plus_score(logits, labels, k=0.4).tolist() == pytest.approx([2.0])
    assert F.min_k_plus_plus_score(logits, labels, k=1.0).tolist() == pytest.approx([0.5])


def test_min_k_plus_plus_uniform_is_neutral_unlike_min_k() -> None:
    # Under a uniform model every token is unlikely (log 1/4) but exactly as expected: z = 0.
    logits = logits_from_probs([[UNIFORM, UNIFORM, UNIFORM]])
    labels = torch.tensor([[-100, 3, 1]])
    assert F.min_k_plus_plus_score(logits, labels).tolist() == pytest.approx([0.0])
    stats = F.answer_token_stats(logits, labels)
    assert F.min_k_score(stats.token_logprobs, stats.mask).tolist() == pytest.approx([2 * LN2])


def test_zlib_score_divides_by_compressed_size() -> None:
    # Sizes from the zlib in use (its output length can change between zlib versions); UTF-8 bytes, not characters.
    texts = ["a" * 40, "The author was born in Paris.", "Zürich, naïve café — «déjà vu»"]
    sizes = [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    assert sizes[0] < sizes[1], "a repetitive text compresses to less"
    assert sizes[2] != len(zlib.compress(texts[2].encode("latin-1", "replace")))
    losses = [1.2, 3.7, 2.5]
    scores = F.zlib_score(torch.tensor(losses, dtype=torch.float64), texts)
    assert scores.tolist() == pytest.approx([loss / size for loss, size in zip(losses, sizes)], rel=1e-12)
    with pytest.raises(ValueError, match="texts"):
        F.zlib_score(torch.tensor([1.0]), texts)


# --- truth ratio and probabilities --------------------------------------------------------------


def test_truth_ratio_below_and_above_one() -> None:
    correct = torch.tensor([1.0, 2.0], dtype=torch.float64)
    perturbed = torch.tensor([[2.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    # R = exp(L_correct - mean_k L_pert): exp(1 - 3) = e^-2 (< 1), exp(2 - 1) = e (> 1)
    ratios = F.truth_ratio(correct, perturbed)
    assert ratios.tolist() == pytest.approx([math.exp(-2.0), math.e])


def test_truth_ratio_averages_perturbed_in_log_space() -> None:
    # perturbed probs 1 and 1/4: geometric mean 1/2 (not the arithmetic 5/8); correct prob 1.
    correct = torch.tensor([0.0], dtype=torch.float64)
    perturbed = torch.tensor([[0.0, 2 * LN2]], dtype=torch.float64)
    assert F.truth_ratio(correct, perturbed).tolist() == pytest.approx([0.5])


def test_truth_ratio_requires_perturbed_matrix() -> None:
    for ratio in (F.truth_ratio, F.truth_ratio_exact):
        with pytest.raises(ValueError, match="perturbed"):
            ratio(torch.zeros(2), torch.zeros(2))


def test_truth_ratio_of_a_collapsed_model_is_open_unlearnings() -> None:
    # issue 10: per-token NLLs of 25-40. Correct (paraphrased) answer 30, perturbed 25 and 27 (log-space mean 26).
    correct = torch.tensor([30.0], dtype=torch.float64)
    perturbed = torch.tensor([[25.0, 27.0]], dtype=torch.float64)
    # open-unlearning: exp(-26) / (exp(-30) + 1e-10) = 5.109e-12 / 1.000936e-10 = 0.05104
    expected = math.exp(-26.0) / (math.exp(-30.0) + 1e-10)
    assert expected == pytest.approx(0.05104, abs=1e-5)
    assert F.truth_ratio(correct, perturbed).tolist() == pytest.approx([expected], rel=1e-12)
    # the exact ratio, reported as *_exact: exp(30 - 26) = e^4 = 54.598 (what was reported before)
    assert F.truth_ratio_exact(correct, perturbed).tolist() == pytest.approx([54.598150033], rel=1e-9)
    # forget aggregates: min(R, 1/(R + 1e-10)) -> 0.05104 (open-unlearning) and 1/54.598 = 0.018316 (exact)
    assert F.truth_ratio_forget(F.truth_ratio(correct, perturbed)).item() == pytest.approx(expected, rel=1e-9)
    assert F.truth_ratio_forget(F.truth_ratio_exact(correct, perturbed)).item() == pytest.approx(0.0183156389, rel=1e-8)
    # retain aggregate max(0, 1 - R): 0.94896 with open-unlearning's R, 0 with the exact one
    assert F.truth_ratio_true_better(F.truth_ratio(correct, perturbed)).item() == pytest.approx(1 - expected)
    assert F.truth_ratio_true_better(F.truth_ratio_exact(correct, perturbed)).item() == 0.0


def test_truth_ratio_aggregations() -> None:
    ratios = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    # min(R, 1/R) = (0.5, 0.5, 1) -> 2/3; R and 1/R score the same
    assert F.truth_ratio_forget(ratios).item() == pytest.approx(2 / 3)
    ratios = torch.tensor([0.5, 2.0, 0.25], dtype=torch.float64)
    # max(0, 1 - R) = (0.5, 0, 0.75) -> 5/12; R > 1 clipped at 0
    assert F.truth_ratio_true_better(ratios).item() == pytest.approx(5 / 12)


def test_normalised_probability() -> None:
    p_true = torch.tensor([0.5, 0.3, 0.0], dtype=torch.float64)
    p_perturbed = torch.tensor([[0.25, 0.25, 0.0], [0.1, 0.2, 0.4], [0.0, 0.0, 0.0]])
    # 0.5 / (0.5 + 0.5) = 0.5; 0.3 / (0.3 + 0.7) = 0.3; all zero -> 0 thanks to the 1e-10
    result = F.normalised_probability(p_true, p_perturbed.double())
    assert result.tolist() == pytest.approx([0.5, 0.3, 0.0])


# --- ROUGE ---------------------------------------------------------------------------------------


def test_rouge_l_recall_known_pairs() -> None:
    predictions = ["the cat sat on the mat", "cats running", "the cat", "The cat sat on the mat.", ""]
    references = ["the cat is on the mat", "cat run", "the cat sat on the mat", "the cat", "a b"]
    # LCS "the cat on the mat" = 5 of 6 reference tokens; stemming makes cats/running = cat/run;
    # 2 of 6 reference tokens found (precision would be 1); a longer answer is not penalised;
    # an empty generation recalls nothing.
    assert F.rouge_l_recall(predictions, references) == pytest.approx([5 / 6, 1.0, 1 / 3, 1.0, 0.0])


def test_rouge_l_recall_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="predictions"):
        F.rouge_l_recall(["a"], ["a", "b"])


# --- aggregate scores ----------------------------------------------------------------------------


def test_forget_quality_identical_distributions_is_one() -> None:
    ratios = torch.tensor([0.2, 0.5, 0.9, 1.3])
    assert F.forget_quality(ratios, ratios.clone()) == pytest.approx(1.0)


def test_forget_quality_separated_samples() -> None:
    # KS statistic 1 for 3 vs 3 fully separated samples; exact p = 2 / C(6, 3) = 0.1
    assert F.forget_quality([1.0, 2.0, 3.0], [10.0, 11.0, 12.0]) == pytest.approx(0.1)


def _utility_values(**overrides: float) -> dict[str, float]:
    values = {key: 1.0 for key in F.MODEL_UTILITY_KEYS}
    values.update(overrides)
    return values


def test_model_utility_harmonic_mean() -> None:
    assert len(F.MODEL_UTILITY_KEYS) == 9
    values = _utility_values(retain_Q_A_ROUGE=0.5, wf_Truth_Ratio=0.25, unrelated=123.0)
    # 9 / (7 * 1 + 1/0.5 + 1/0.25) = 9 / 13; extra keys ignored
    assert F.model_utility(values) == pytest.approx(9 / 13)
    assert F.model_utility({key: 0.5 for key in F.MODEL_UTILITY_KEYS}) == pytest.approx(0.5)


def test_model_utility_zero_component_gives_zero() -> None:
    assert F.model_utility(_utility_values(ra_Q_A_ROUGE=0.0)) == 0.0


def test_model_utility_missing_name_is_reported() -> None:
    values = _utility_values()
    del values["ra_Truth_Ratio"]
    with pytest.raises(ValueError, match=r"^model_utility is missing ra_Truth_Ratio$"):
        F.model_utility(values)
    del values["retain_Q_A_Prob"]
    with pytest.raises(ValueError, match=r"^model_utility is missing retain_Q_A_Prob, ra_Truth_Ratio$"):
        F.model_utility(values)


def test_model_utility_rejects_negative_and_gives_nan_for_nan() -> None:
    """A NaN part is an unmeasured part: NaN (issue 23), not an error the evaluation turned into "missing"."""
    with pytest.raises(ValueError, match="wf_Q_A_ROUGE"):
        F.model_utility(_utility_values(wf_Q_A_ROUGE=-0.1))
    assert math.isnan(F.model_utility(_utility_values(retain_Q_A_Prob=math.nan)))


@pytest.mark.parametrize(
    ("forget", "holdout", "expected"),
    [
        ([1.0, 2.0], [3.0, 4.0], 1.0),  # holdout always less likely
        ([3.0, 4.0], [1.0, 2.0], 0.0),  # forget always less likely
        ([1.0, 2.0], [2.0, 3.0], 3.5 / 4),  # pairs: 1 + 1 + 0.5 (tie 2 vs 2) + 1
        ([5.0, 5.0, 5.0], [5.0, 5.0], 0.5),  # all tied
        ([0.0, 3.0, 5.0], [4.0, 6.0], 5 / 6),  # 4 beats 0 and 3, 6 beats all three
    ],
)
def test_mia_auc(forget: list[float], holdout: list[float], expected: float) -> None:
    assert F.mia_auc(forget, holdout) == pytest.approx(expected)


def test_mia_auc_needs_both_groups() -> None:
    for forget, holdout in (([], [1.0]), ([1.0], [])):
        with pytest.raises(ValueError, match=r"^mia_auc needs at least one forget and one holdout score$"):
            F.mia_auc(forget, holdout)


def test_privleak() -> None:
    assert F.privleak(0.5, 0.5) == pytest.approx(0.0)
    # ((1 - 0.25) - (1 - 0.5)) / (1 - 0.5) * 100 = 0.25 / 0.5 * 100
    assert F.privleak(0.25, 0.5) == pytest.approx(50.0)
    assert F.privleak(0.75, 0.5) == pytest.approx(-50.0)
    # A retain model at AUC 1 (1 - AUC = 0): open-unlearning's +1e-10 keeps the gap finite and its sign.
    assert F.privleak(0.5, 1.0) == pytest.approx(0.5 / 1e-10 * 100.0) and F.privleak(1.0, 1.0) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ranks_equal_scipy_rankdata_with_ties(seed: int) -> None:
    from scipy import stats

    values = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) / 2
    assert F.average_ranks(values).tolist() == stats.rankdata(values.numpy()).tolist()


def test_mia_auc_is_nan_with_a_nan_score() -> None:
    assert math.isnan(F.mia_auc([1.0, math.nan], [2.0]))
