"""What a method's loss hook receives and returns: one data part's logits (:class:`PartOutput`), the retain-term and
averaging choices, and the step-normalised loss (:func:`with_step_loss`).

Apart from :mod:`.base` so that the pieces methods build on (:mod:`.divergence`'s forget-NLL bound among them) can
name a part without importing the LightningModule that produces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

__all__ = ["MeanOver", "PartOutput", "RetainLoss", "with_step_loss"]

RetainLoss = Literal["none", "nll", "kl"]
MeanOver = Literal["tokens", "sequences"]


@dataclass
class PartOutput:
    """Logits of the model being unlearned on one data part, the reference logits, and the labels.

    ``token_scale`` and ``sequence_scale`` turn this micro-batch's token (sequence) mean into its share of the
    mean over the whole optimizer step (:func:`~lightning_unlearn.losses.functional.step_scale`); ``None``
    outside training or when the batch carries no step counts, where the micro-batch mean is the step's.
    """

    logits: Tensor
    ref_logits: Tensor | None
    labels: Tensor
    token_scale: Tensor | None = None
    sequence_scale: Tensor | None = None

    def step_share(self, mean: Tensor, over: MeanOver = "tokens") -> Tensor | None:
        """``mean`` (over this part's tokens or sequences) times its step factor; ``None`` without one."""
        scale = self.token_scale if over == "tokens" else self.sequence_scale
        return None if scale is None else mean * scale


def with_step_loss(
    losses: dict[str, Tensor], terms: list[tuple[Tensor, PartOutput, MeanOver]]
) -> dict[str, Tensor]:
    """Add ``step_loss = sum_i term_i * scale_i`` to ``losses`` when the parts carry step factors.

    Each term is a weighted mean over the tokens or sequences of one part; its factor (see
    :meth:`PartOutput.step_share`) makes the gradient averaged over the step's micro-batches and processes
    that of the mean over the whole step. ``losses`` is returned unchanged outside training.

    Raises:
        ValueError: if some parts carry step factors and others do not.
    """
    shares = [part.step_share(value, over) for value, part, over in terms]
    if all(share is None for share in shares):
        return losses
    if any(share is None for share in shares):
        raise ValueError("Some data parts of the batch carry the counts of their optimizer step and others do not.")
    return {**losses, "step_loss": sum(shares[1:], shares[0])}
