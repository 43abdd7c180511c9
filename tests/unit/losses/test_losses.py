"""Each unlearning loss against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_unlearn.losses.functional import (
    dpo_loss,
    kl_on_labelled,
    nll_mean,
    npo_loss,
    sequence_logp,
    simnpo_loss,
    step_scale,
)

LN = math.log


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences over a 2-token vocabulary with known next-token probabilities.

    Row 0 labels tokens 1 and 0 at positions 1 and 2: p = 3/4 (logits [0, ln 3]) and p = 1/2.
    Row 1 labels token 1 at position 2 only: p = 1/5 (logits [ln 4, 0]). Position 0 of row 1 has
    extreme logits that must be ignored because its next label is -100.
    """
    logits = torch.tensor(
        [
            [[0.0, LN(3)], [0.0, 0.0], [9.0, -9.0]],
            [[50.0, -50.0], [LN(4), 0.0], [3.0, 1.0]],
        ]
    )
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    return logits, labels


def test_nll_mean_is_a_token_mean_over_the_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    expected = (LN(4 / 3) + LN(2) + LN(5)) / 3
    assert nll_mean(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_nll_mean_matches_hugging_face_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert nll_mean(logits, labels).item() == pytest.approx(hf.item(), rel=1e-6)


def test_sequence_logp_sums_without_length_normalisation(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    logp, lengths = sequence_logp(logits, labels)
    assert logp.tolist() == pytest.approx([LN(3 / 4) + LN(1 / 2), LN(1 / 5)], rel=1e-6)
    assert lengths.tolist() == [2, 1]


def test_kl_averages_over_labelled_positions_only() -> None:
    ref = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    logits = torch.tensor([[[0.0, LN(3)], [30.0, -30.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100]])
    expected = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    assert kl_on_labelled(ref, logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_identical_distributions(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, labels = batch
    assert kl_on_labelled(logits, logits.clone(), labels).item() == pytest.approx(0.0, abs=1e-7)


def test_npo_loss_by_hand() -> None:
    logp, ref = torch.tensor([-2.0, -4.0]), torch.tensor([-3.0, -3.0])
    expected = -(2 / 0.5) * (logsigmoid(-0.5) + logsigmoid(0.5)) / 2
    assert npo_loss(logp, ref, beta=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_npo_gradient_tends_to_gradient_ascent_as_beta_vanishes() -> None:
    """d/dlogp of NPO -> 1/N, the gradient of mean(logp), i.e. of -NLL summed per sequence."""
    logp = torch.tensor([-2.0, -7.0, -1.0], requires_grad=True)
    npo_loss(logp, torch.tensor([-3.0, -3.0, -3.0]), beta=1e-4).backward()
    assert logp.grad.tolist() == pytest.approx([1 / 3] * 3, rel=1e-3)


def test_dpo_loss_by_hand() -> None:
    win, win_ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    lose, lose_ref = torch.tensor([-5.0]), torch.tensor([-4.0])
    margin = (-1.0 + 2.0) - (-5.0 + 4.0)
    expected = -(2 / 0.1) * logsigmoid(0.1 * margin)
    assert dpo_loss(win, win_ref, lose, lose_ref, beta=0.1).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_at_reference_is_2_ln2_over_beta() -> None:
    x = torch.tensor([-3.0, -1.0])
    assert dpo_loss(x, x, x, x, beta=0.25).item() == pytest.approx(2 / 0.25 * LN(2), rel=1e-6)


def test_simnpo_loss_by_hand() -> None:
    loss = simnpo_loss(torch.tensor([-6.0, -1.0]), torch.tensor([3, 2]), beta=1.5, margin=0.5)
    expected = -(2 / 1.5) * (logsigmoid(1.5 * 6 / 3 - 0.5) + logsigmoid(1.5 * 1 / 2 - 0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_step_scale_turns_micro_batch_means_into_the_step_mean(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Row 0 (2 tokens) and row 1 (1 token) as two accumulated micro-batches: the scaled means, averaged as
    Lightning averages accumulated losses, are the token mean over both rows: (ln 4/3 + ln 2 + ln 5) / 3."""
    logits, labels = batch
    step_tokens = torch.tensor(3)
    shares = []
    for row in (0, 1):
        part_logits, part_labels = logits[row : row + 1], labels[row : row + 1]
        local = (part_labels[:, 1:] != -100).sum()
        shares.append(nll_mean(part_logits, part_labels) * step_scale(local, step_tokens, micro_batches=2))
    assert (sum(shares) / 2).item() == pytest.approx((LN(4 / 3) + LN(2) + LN(5)) / 3, rel=1e-6)
    assert (sum(shares) / 2).item() == pytest.approx(nll_mean(logits, labels).item(), rel=1e-6)
    assert step_scale(torch.tensor(3), step_tokens, micro_batches=1).item() == 1.0  # one micro-batch: a plain mean
    assert step_scale(torch.tensor(0), torch.tensor(0), micro_batches=2).item() == 0.0
    with pytest.raises(ValueError, match="4 items to average but its whole optimizer step only 3"):
        step_scale(torch.tensor(4), step_tokens, micro_batches=2)


def test_default_hyper_parameters_are_the_papers() -> None:
    """Called without them, the functions use the published defaults: NPO and IdkDPO beta 0.1 (Zhang et al.
    2024; Maini et al. 2024), SimNPO beta 4.5 and margin 0 (Fan et al. 2024, open-unlearning's TOFU config)."""
    logp, ref = torch.tensor([-6.0]), torch.tensor([-2.0])
    assert npo_loss(logp, ref).item() == pytest.approx(-(2 / 0.1) * logsigmoid(0.1 * 4.0), rel=1e-6)
    assert dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), logp, ref).item() == pytest.approx(
        -(2 / 0.1) * logsigmoid(0.1 * (2.0 + 4.0)), rel=1e-6)
    lengths = torch.tensor([3])
    assert simnpo_loss(logp, lengths).item() == pytest.approx(-(2 / 4.5) * logsigmoid(4.5 * 6.0 / 3), rel=1e-6)


def test_simnpo_normalises_a_one_token_answer_by_one() -> None:
    """A one-token answer is divided by its length 1 (the clamp only guards empty answers, whose logp is 0)."""
    logp = torch.tensor([-0.5, 0.0])
    got = simnpo_loss(logp, torch.tensor([1, 0]), beta=2.0, margin=0.25).item()
    want = -(2 / 2.0) * (logsigmoid(2.0 * 0.5 - 0.25) + logsigmoid(-0.25)) / 2
    assert got == pytest.approx(want, rel=1e-6)
