"""RMU's representation losses, ULD's filter and uniform term, WHP's generic targets: against values computed by hand.

References: the relative-top filter and the uniform KL follow ULD's paper and code (UCSB-NLP-Chang/ULD,
``relative_top_filter`` and ``UniformLossFunc``, re-derived; this package averages over answer positions only);
WHP's targets follow Eldan & Russinovich 2023, section 3; RMU's losses the WMDP paper (section 5) and its code.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_unlearn.losses.logit_arithmetic import (
    filtered_offset, relative_top_mask, soft_cross_entropy_on_labelled, uniform_kl_on_labelled, whp_generic_logits,
)
from lightning_unlearn.losses.representation import activation_mse, answer_positions, control_vector

P = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(("tau", "dropped"), [
    (0.2, [False, False, False, True]),   # p < 0.2 * 0.5 = 0.1; k = max(1, int(0.8)) = 1 keeps the bound
    (0.5, [False, False, True, True]),    # p < 0.25; k = 2 would keep only p >= 0.3, the looser 0.25 wins
    (0.75, [False, False, False, True]),  # p < 0.375 would drop 2 and 3, but k = 3 keeps p >= 0.15
    (0.0, [False, False, False, False]),  # no filter
])
def test_relative_top_keeps_tokens_within_tau_of_the_top_and_at_least_k(tau: float, dropped: list[bool]) -> None:
    logits = P.log() + 3.0  # a shift changes nothing: the filter reads probabilities
    assert relative_top_mask(logits, tau).tolist() == dropped


def test_relative_top_refuses_a_tau_outside_0_1() -> None:
    with pytest.raises(ValueError, match="relative_top"):
        relative_top_mask(P.log(), 1.5)


def test_filtered_offset_adds_the_offset_only_where_the_large_model_keeps_the_token() -> None:
    z_large = P.log()
    delta = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert filtered_offset(z_large, delta, 0.2).tolist() == pytest.approx((z_large + torch.tensor([1, 2, 3, 0])).tolist())
    assert filtered_offset(z_large, delta, 0.0).tolist() == pytest.approx((z_large + delta).tolist())


def test_uniform_kl_is_taken_at_positions_predicting_answer_tokens() -> None:
    logits = torch.zeros(1, 3, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # p = (1/4, 3/4): KL(u || p) = 0.5 ln 2 + 0.5 ln(2/3)
    logits[0, 1] = torch.tensor([5.0, -5.0])  # predicts an unlabelled position: ignored
    labels = torch.tensor([[-100, 1, -100]])
    assert float(uniform_kl_on_labelled(logits, labels)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    uniform = torch.zeros(1, 3, 2)
    assert float(uniform_kl_on_labelled(uniform, labels)) == pytest.approx(0.0, abs=1e-7)


def test_whp_targets_lower_what_the_reinforcement_raised() -> None:
    base, reinforced, before = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 5.0]), torch.ones(3)
    # rise = ReLU(R - R0) = (1, 0, 4); v = base - 2 * rise
    assert whp_generic_logits(base, reinforced, before, a=2.0).tolist() == [-1.0, 2.0, -5.0]
    # the default a is the paper's alpha, 5 (Eldan & Russinovich 2023, appendix): v = base - 5 * rise
    assert whp_generic_logits(base, reinforced, before).tolist() == [-4.0, 2.0, -17.0]


def test_cross_entropy_towards_hard_and_soft_targets() -> None:
    logits = torch.zeros(1, 2, 2)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0)])  # log p = (ln 1/4, ln 3/4)
    labels = torch.tensor([[-100, 1]])
    targets = torch.zeros(1, 2, 2)
    targets[0, 0] = torch.tensor([2.0, 1.0])  # argmax 0: CE = ln 4, whatever the label says
    assert float(soft_cross_entropy_on_labelled(logits, targets, labels, hard=True)) == pytest.approx(math.log(4))
    targets[0, 0] = torch.tensor([0.0, 0.0])  # soft: q = (1/2, 1/2)
    want = -0.5 * (math.log(0.25) + math.log(0.75))
    assert float(soft_cross_entropy_on_labelled(logits, targets, labels, hard=False)) == pytest.approx(want)


def test_control_vector_has_norm_c_and_non_negative_entries_and_is_seeded() -> None:
    first = control_vector(64, 6.5, torch.Generator().manual_seed(3))
    assert float(first.norm()) == pytest.approx(6.5) and bool((first >= 0).all())
    assert torch.equal(first, control_vector(64, 6.5, torch.Generator().manual_seed(3)))


def test_activation_mse_averages_over_hidden_size_then_masked_tokens() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [3.0, 2.0]]])
    target = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[False, True, True]])
    # token 1: (1 + 0) / 2 = 0.5; token 2: (4 + 4) / 2 = 4; token 0 masked out
    assert float(activation_mse(hidden, target, mask)) == pytest.approx(2.25)


def test_answer_positions_are_the_labelled_tokens_but_never_the_first() -> None:
    assert answer_positions(torch.tensor([[-100, 5, 6, -100]])).tolist() == [[False, True, True, False]]
    assert answer_positions(torch.tensor([[7, 5, -100]])).tolist() == [[False, True, False]]
