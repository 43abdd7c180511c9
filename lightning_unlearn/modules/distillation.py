"""Unlearning by distillation towards a target distribution without the true token: UNDIAL and CE-U.

Both replace gradient ascent's unbounded push by a cross-entropy towards a proper distribution at every answer
token, so their forget terms are bounded below and stop pushing once the true token is unlikely. The targets
are built from logits and detached: UNDIAL's from the original model (the reference: ``z_L`` in offset mode, the
frozen copy ``S0`` in direct mode), CE-U's from the logits being trained (``z_L + alpha (z_S - z_S0)`` in offset
mode). Formulas and sources: :mod:`lightning_unlearn.losses.per_token`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..losses.per_token import ceu_loss, undial_loss
from .base import PartOutput, RetainLoss
from .likelihood import _WithRetainChoice


class UNDIAL(_WithRetainChoice):
    """UNDIAL (Dong et al., NAACL 2025): ``L_forget = mean_t CE(softmax(z_ref - beta * onehot(y)), softmax(z))``.

    Self-distillation with the true token's logit lowered by ``beta`` in the original model's logits, on
    forget answer tokens. The paper uses no retain set (open-unlearning: ``alpha: 0``, beta 10, lr 1e-4,
    10 epochs, LoRA rank 8 in the paper); ``retain_loss`` adds one.

    Args:
        beta: how far the true token's logit is lowered in the teacher's logits (3-30 in the paper's search).
        retain_loss: retain term: ``none`` (the paper), ``nll`` or ``kl``.
    """

    needs_reference = True

    def __init__(self, beta: float = 10.0, retain_loss: RetainLoss = "none", **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, **kwargs)
        self.beta = beta

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        forget = out["forget"]
        return undial_loss(forget.logits, forget.ref_logits, forget.labels, self.beta)


class CEU(_WithRetainChoice):
    """CE-U (Yang 2025): ``L_forget = mean_t CE(softmax(sg(z) with z[y] = -inf), softmax(z))`` (``--model CEU``).

    Cross-entropy towards the model's own next-token distribution with the true token removed, the first
    answer token of each sequence left out (the paper's setting). No reference model; open-unlearning trains
    the forget term alone (``retain_loss: none``), lr 1e-5.

    Args:
        ignore_first_answer_tokens: answer tokens at the start of each sequence that get no loss.
        retain_loss: retain term: ``none`` (the reference implementation), ``nll`` or ``kl``.
    """

    aliases = ("CE-U",)

    def __init__(self, ignore_first_answer_tokens: int = 1, retain_loss: RetainLoss = "none",
                 **kwargs: Any) -> None:  # pragma: no mutate block
        if ignore_first_answer_tokens < 0:
            raise ValueError(f"ignore_first_answer_tokens must be >= 0, got {ignore_first_answer_tokens}.")
        super().__init__(retain_loss=retain_loss, **kwargs)
        self.ignore_first_answer_tokens = ignore_first_answer_tokens

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        forget = out["forget"]
        return ceu_loss(forget.logits, forget.labels, self.ignore_first_answer_tokens)
