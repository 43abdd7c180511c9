"""Gradient ascent with each answer token weighted by its own (detached) probability: WGA and SatImp.

Plain gradient ascent keeps pushing tokens that are already forgotten, the cause of its collapse; weighting
each token's log-likelihood by ``p^beta`` lets forgotten tokens drop out, so the forget term saturates. Both are
token means over the forget answers, on ``z_L + alpha (z_S - z_S0)`` in offset mode and on the model in direct
mode. Formulas and sources: :mod:`lightning_unlearn.losses.per_token`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.functional import nll_mean
from ..losses.per_token import satimp_loss, wga_loss
from .base import PartOutput, RetainLoss
from .divergence import ForgetNLLBound
from .likelihood import _WithRetainChoice


class _WeightedAscent(ForgetNLLBound, _WithRetainChoice):
    """Shared wiring: the retain choice and ``stop_forget_nll`` (the forget NLL is computed only when bounded)."""

    def __init__(self, retain_loss: RetainLoss = "nll", stop_forget_nll: float | None = None,
                 **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, **kwargs)

    def weighted(self, forget: PartOutput) -> Tensor:
        raise NotImplementedError

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        forget = out["forget"]
        if self.hparams.get("stop_forget_nll") is not None:
            self.note_forget_nll(forget, nll_mean(forget.logits.detach(), forget.labels))
        return self.weighted(forget)


class WGA(_WeightedAscent):
    """Weighted gradient ascent (Wang et al., ICLR 2025): ``L_forget = mean_t p_t^beta * log p_t`` (weight
    detached), with a retain NLL by default (open-unlearning: beta 1, gamma 1, retain weight 1, lr 1e-5,
    5 epochs).

    Args:
        beta: exponent of the token weight ``p^beta`` (0 is gradient ascent).
        retain_loss: retain term: ``none``, ``nll`` or ``kl``.
        stop_forget_nll: stop once the forget NLL of an optimizer step exceeds this (as in :class:`.losses.GA`);
            ``null``: no bound (the weights already make the loss saturate).
    """

    def __init__(self, beta: float = 1.0, retain_loss: RetainLoss = "nll", stop_forget_nll: float | None = None,
                 **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, stop_forget_nll=stop_forget_nll, **kwargs)
        self.beta = beta

    def weighted(self, forget: PartOutput) -> Tensor:
        return wga_loss(forget.logits, forget.labels, self.beta)


class SatImp(_WeightedAscent):
    """SatImp (Yang et al., ICML 2025): ``L_forget = mean_t p_t^beta1 (1 - p_t)^beta2 log p_t`` (weight detached).

    Defaults beta1 5, beta2 1, gamma 1, retain weight 0.1 (the paper's forget:retain ratio of 10, and
    open-unlearning's class defaults and method notes; its ``configs/trainer/SatImp.yaml`` swaps them, gamma
    0.1 and alpha 1: the paper is followed here), lr 1e-5, 5 epochs.

    Args:
        beta1: saturation exponent (weight ``p^beta1``).
        beta2: importance exponent (weight ``(1 - p)^beta2``).
        retain_loss: retain term: ``none``, ``nll`` or ``kl``.
        stop_forget_nll: as in :class:`WGA`.
    """

    def __init__(self, beta1: float = 5.0, beta2: float = 1.0, retain_weight: float = 0.1,
                 retain_loss: RetainLoss = "nll", stop_forget_nll: float | None = None,
                 **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, stop_forget_nll=stop_forget_nll, retain_weight=retain_weight,
                         **kwargs)
        self.beta1, self.beta2 = beta1, beta2

    def weighted(self, forget: PartOutput) -> Tensor:
        return satimp_loss(forget.logits, forget.labels, self.beta1, self.beta2)
