"""Supervised fine-tuning in the same framework, to make the models that are later unlearned."""

from __future__ import annotations

from torch import Tensor

from ..losses.functional import nll_mean
from .base import PartOutput, RetainLoss, UnlearnModule


class SFT(UnlearnModule):
    """Supervised fine-tuning: ``L = NLL_mean(train)``, descending where GA ascends.

    TOFU's protocol unlearns models first fine-tuned on the fictitious authors, and compares them to a
    model fine-tuned on the retain authors only; this class makes both with the same data module (its
    ``forget_split`` is the training data here, one split or a list) and the same configs. It also
    serves to evaluate any model as is: ``main.py test --model SFT --model.small_model PATH``. Set
    ``model.export_dir`` to save the result as a Hugging Face directory for the next stage.
    """

    unlearns = False

    retain_loss: RetainLoss = "none"

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        return nll_mean(out["forget"].logits, out["forget"].labels)
