"""UNDIAL, CE-U, WGA, SatImp and PDU's losses against values worked out by hand on tiny tensors.

Two sequences over a 3-token vocabulary; three answer tokens with known next-token distributions:

- ``a`` (row 0, position 0, true token 0): logits ``[ln 2, 0, 0]``, p = (1/2, 1/4, 1/4);
- ``b`` (row 0, position 1, true token 1): logits ``[0, 0, ln 2]``, p = (1/4, 1/4, 1/2);
- ``c`` (row 1, position 1, true token 1, the row's first answer token): logits ``[0, ln 3, 0]``, p = (1/5, 3/5, 1/5).

Every other position has extreme logits that must be ignored. Row 0 has two answer tokens and row 1 one, so a
mean over the batch's tokens (1/3 each) differs from a mean of per-sequence means.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_unlearn.losses.per_token import ceu_loss, logit_flattening_loss, satimp_loss, undial_loss, wga_loss

LN = math.log
P = {"a": (1 / 2, 1 / 4, 1 / 4), "b": (1 / 4, 1 / 4, 1 / 2), "c": (1 / 5, 3 / 5, 1 / 5)}
TRUE = {"a": 0, "b": 1, "c": 1}
POSITION = {"a": (0, 0), "b": (0, 1), "c": (1, 1)}


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([
        [[LN(2), 0.0, 0.0], [0.0, 0.0, LN(2)], [9.0, -9.0, 0.0]],
        [[50.0, -50.0, 0.0], [0.0, LN(3), 0.0], [-7.0, 7.0, 0.0]],
    ], requires_grad=True)
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 1]])
    return logits, labels


def true_p(token: str) -> float:
    return P[token][TRUE[token]]


def grad_at(logits: torch.Tensor, token: str) -> list[float]:
    row, position = POSITION[token]
    return logits.grad[row, position].tolist()


def onehot(token: str) -> list[float]:
    return [1.0 if v == TRUE[token] else 0.0 for v in range(3)]


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_wga_is_the_probability_weighted_log_likelihood(batch, beta: float) -> None:
    logits, labels = batch
    loss = wga_loss(logits, labels, beta)
    expected = sum(true_p(t) ** beta * LN(true_p(t)) for t in "abc") / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()  # the weight is a constant: d/dz = w (onehot - p) / 3
    for t in "abc":
        want = [true_p(t) ** beta * (o - p) / 3 for o, p in zip(onehot(t), P[t])]
        assert grad_at(logits, t) == pytest.approx(want, abs=1e-6), t
    assert logits.grad[0, 2].abs().sum() == 0 and logits.grad[1, 0].abs().sum() == 0


def test_wga_defaults_to_the_sources_beta_of_one(batch) -> None:
    logits, labels = batch  # open-unlearning's compute_wga_loss: beta 1, weight p_t
    assert wga_loss(logits, labels).item() == pytest.approx(sum(true_p(t) * LN(true_p(t)) for t in "abc") / 3)


def test_wga_with_beta_zero_is_gradient_ascent(batch) -> None:
    logits, labels = batch
    from lightning_unlearn.losses.functional import nll_mean

    assert wga_loss(logits, labels, 0.0).item() == pytest.approx(-nll_mean(logits, labels).item(), rel=1e-6)


@pytest.mark.parametrize(("beta1", "beta2"), [(1.0, 1.0), (5.0, 1.0), (2.0, 3.0)])
def test_satimp_weights_saturation_times_importance(batch, beta1: float, beta2: float) -> None:
    logits, labels = batch
    loss = satimp_loss(logits, labels, beta1, beta2)
    weight = {t: true_p(t) ** beta1 * (1 - true_p(t)) ** beta2 for t in "abc"}
    assert loss.item() == pytest.approx(sum(weight[t] * LN(true_p(t)) for t in "abc") / 3, rel=1e-6)
    loss.backward()
    for t in "abc":
        assert grad_at(logits, t) == pytest.approx([weight[t] * (o - p) / 3 for o, p in zip(onehot(t), P[t])],
                                                   abs=1e-6), t


def test_satimp_at_beta1_1_beta2_1_by_hand(batch) -> None:
    """Weights p(1 - p): 1/4, 3/16 and 6/25 for a, b, c."""
    logits, labels = batch
    expected = (-(1 / 4) * LN(2) - (3 / 16) * LN(4) + (6 / 25) * LN(3 / 5)) / 3
    assert satimp_loss(logits, labels, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_ceu_removes_the_true_token_from_the_models_own_distribution(batch) -> None:
    """Targets without the true token: a (0, 1/2, 1/2), b (1/3, 0, 2/3), c (1/2, 0, 1/2)."""
    logits, labels = batch
    ce = {"a": LN(4), "b": (1 / 3) * LN(4) + (2 / 3) * LN(2), "c": LN(5)}
    assert ceu_loss(logits, labels, 0).item() == pytest.approx(sum(ce.values()) / 3, rel=1e-6)
    # The first answer token of each row (a and c) is left out but still counts in the mean's denominator.
    loss = ceu_loss(logits, labels, 1)
    assert loss.item() == pytest.approx(ce["b"] / 3, rel=1e-6)
    loss.backward()  # the target is a constant: d/dz = (p - q) / 3
    assert grad_at(logits, "b") == pytest.approx([(1 / 4 - 1 / 3) / 3, (1 / 4) / 3, (1 / 2 - 2 / 3) / 3], abs=1e-6)
    assert grad_at(logits, "a") == pytest.approx([0, 0, 0]) and grad_at(logits, "c") == pytest.approx([0, 0, 0])
    assert ceu_loss(logits, labels, 2).item() == 0.0
    with pytest.raises(ValueError, match="ignore_first_answer_tokens"):
        ceu_loss(logits, labels, -1)


def test_undial_distils_the_teacher_with_the_true_token_lowered(batch) -> None:
    """beta = ln 4; lowered teacher targets: a uniform, b (1/2, 1/4, 1/4), c uniform."""
    logits, labels = batch
    ref = torch.tensor([
        [[LN(4), 0.0, 0.0], [LN(2), LN(4), 0.0], [3.0, 1.0, -2.0]],
        [[-4.0, 8.0, 1.0], [0.0, LN(4), 0.0], [5.0, 5.0, 5.0]],
    ], requires_grad=True)
    loss = undial_loss(logits, ref, labels, beta=LN(4))
    ce = {"a": (LN(2) + 2 * LN(4)) / 3, "b": 0.5 * LN(4) + 0.25 * LN(4) + 0.25 * LN(2),
          "c": (LN(5) + LN(5 / 3) + LN(5)) / 3}
    assert loss.item() == pytest.approx(sum(ce.values()) / 3, rel=1e-6)
    loss.backward()
    assert grad_at(logits, "b") == pytest.approx([(1 / 4 - 1 / 2) / 3, 0.0, (1 / 2 - 1 / 4) / 3], abs=1e-6)
    assert ref.grad is None or ref.grad.abs().sum() == 0, "the teacher is a target, not trained"
    # beta = 0: plain distillation, minimal (the teacher's entropy) when the student is the teacher.
    same = undial_loss(ref.detach(), ref.detach(), labels, beta=0.0)
    entropy = -(torch.softmax(ref.detach(), -1) * torch.log_softmax(ref.detach(), -1)).sum(-1)
    assert same.item() == pytest.approx(((entropy[0, 0] + entropy[0, 1] + entropy[1, 1]) / 3).item(), rel=1e-6)


def test_logit_flattening_is_the_squared_margin_over_the_mean(batch) -> None:
    logits, labels = batch
    expected = ((2 / 3 * LN(2)) ** 2 + (2 / 3 * LN(2)) ** 2 + (2 / 3 * LN(3)) ** 2) / 3
    loss = logit_flattening_loss(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()  # d/dz of (max - mean)^2 = 2 m (onehot(argmax) - 1/V); at a the margin is 2/3 ln 2
    m = 2 / 3 * LN(2)
    assert grad_at(logits, "a") == pytest.approx([2 * m * (1 - 1 / 3) / 3, -2 * m / 9, -2 * m / 9], abs=1e-6)
    flat = torch.zeros(1, 3, 4)
    assert logit_flattening_loss(flat, torch.tensor([[-100, 2, 3]])).item() == 0.0, "uniform: nothing to flatten"


# --- one batch against open-unlearning's computation (src/trainer/utils.py, src/trainer/unlearn/{ceu,pdu}.py) ---
# Re-derived from reading that code, on a batch with prompt and padding positions and a 128-token vocabulary
# (its UNDIAL indexes the vocabulary with the -100 labels, so V > 100). Where this project follows the paper
# instead, the test shows the two agree on what both count and differ where the docstrings say.


@pytest.fixture
def reference_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 7, 128, generator=generator)
    ref_logits = 3 * torch.randn(2, 7, 128, generator=generator)
    labels = torch.randint(0, 128, (2, 7), generator=generator)
    labels[0, :2] = -100  # prompt
    labels[1, :3] = -100
    labels[1, 6] = -100  # padding
    return logits, ref_logits, labels


def reference_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = labels[:, 1:].flatten()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted, ignore_index=-100, reduction="none"), shifted


def test_wga_and_satimp_equal_open_unlearnings(reference_batch) -> None:
    """``compute_wga_loss`` / ``compute_satimp_loss``: ``-(w * CE)[labelled].mean()``, w from ``exp(-CE)``."""
    logits, _, labels = reference_batch
    ce, shifted = reference_token_ce(logits, labels)
    p = torch.exp(-ce)
    labelled = shifted != -100
    assert wga_loss(logits, labels, 1.0).item() == pytest.approx(-(p * ce)[labelled].mean().item(), rel=1e-5)
    satimp = -((p ** 5.0) * (1 - p) ** 1.0 * ce)[labelled].mean()
    assert satimp_loss(logits, labels, 5.0, 1.0).item() == pytest.approx(satimp.item(), rel=1e-5)


def test_undial_equals_open_unlearnings_on_the_answer_tokens(reference_batch) -> None:
    """``compute_undial_loss`` averages over every position; on the answer positions the per-token values agree."""
    logits, ref_logits, labels = reference_batch
    shifted = labels[:, 1:]
    mask = torch.zeros(2, 6, 128)
    mask[torch.arange(2).view(-1, 1, 1), torch.arange(6).view(1, -1, 1), shifted.unsqueeze(-1)] = 1.0  # -100 -> 28
    soft = F.softmax(ref_logits[:, :-1] - 10.0 * mask, dim=-1)
    per_position = F.cross_entropy(logits[:, :-1].flatten(0, 1), soft.flatten(0, 1), reduction="none").view(2, 6)
    answer = shifted != -100
    ours = undial_loss(logits, ref_logits, labels, beta=10.0)
    assert ours.item() == pytest.approx(per_position[answer].mean().item(), rel=1e-5)
    assert abs(ours.item() - per_position.mean().item()) > 1e-2, "theirs also averages prompt and padding"


def test_ceu_equals_open_unlearnings_up_to_the_documented_normalisation(reference_batch) -> None:
    """``compute_batch_ceu``: the first answer token masked, CE towards the -inf target, mean over kept tokens."""
    logits, _, labels = reference_batch
    valid = labels != -100
    first = (valid.cumsum(dim=-1) <= 1) & valid
    kept_labels = labels.masked_fill(first, -100)[:, 1:]
    flat_logits, flat_labels = logits[:, :-1][kept_labels != -100], kept_labels[kept_labels != -100]
    target = flat_logits.clone().scatter(-1, flat_labels.unsqueeze(-1), float("-inf")).softmax(-1)
    theirs = F.cross_entropy(flat_logits, target)
    answer_tokens, kept_tokens = int((labels[:, 1:] != -100).sum()), int(flat_labels.numel())
    ours = ceu_loss(logits, labels, 1)
    assert ours.item() * answer_tokens / kept_tokens == pytest.approx(theirs.item(), rel=1e-5)


def test_flattening_differs_from_open_unlearnings_only_by_its_unshifted_mask(reference_batch) -> None:
    """``PDU.compute_loss`` masks unshifted logits with unshifted labels; with the shift the two agree."""
    logits, _, labels = reference_batch

    def theirs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        value = (flat.max(dim=-1)[0] - flat.mean(dim=-1)) ** 2
        mask = (labels != -100).reshape(-1)
        return (value * mask).sum() / mask.sum()

    ours = logit_flattening_loss(logits, labels)
    assert ours.item() == pytest.approx(theirs(logits[:, :-1], labels[:, 1:]).item(), rel=1e-5)
    assert abs(ours.item() - theirs(logits, labels).item()) > 1e-2


def test_a_single_answer_token_is_its_own_mean_and_no_answer_token_gives_zero() -> None:
    """WGA with beta 0 on one labelled token is exactly that token's log-probability (the mean divides by 1), and a
    batch with no labelled token gives 0 rather than NaN."""
    logits = torch.tensor([[[2.0, 0.5, -1.0], [0.3, 1.2, 0.1]]])
    labels = torch.tensor([[-100, -100]])
    labels_one = torch.tensor([[-100, 1]])  # position 0 predicts labels[:, 1]
    expected = F.log_softmax(logits[0, 0], dim=-1)[1]
    assert wga_loss(logits, labels_one, beta=0.0).item() == pytest.approx(expected.item(), abs=1e-6)
    assert wga_loss(logits, labels, beta=0.0).item() == 0.0
