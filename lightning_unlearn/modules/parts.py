"""What a method's loss hook receives and returns: one data part's logits (:class:`PartOutput`), the retain-term and
averaging choices, and the step-normalised loss (:func:`with_step_loss`).

Apart from :mod:`.base` so that the pieces methods build on (:mod:`.divergence`'s forget-NLL bound among them) can
name a part without importing the LightningModule that produces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..losses.functional import IGNORE_INDEX, step_scale

__all__ = ["MeanOver", "PartOutput", "RetainLoss", "step_scales", "with_step_loss"]

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


def step_scales(part: dict[str, Tensor], accumulate: int, world_size: int) -> tuple[Tensor | None, Tensor | None]:
    """The factors of a training part's token and sequence means that make them shares of the optimizer step's means.

    They need the step's counts, which the data module's training batches carry (``step_tokens``,
    ``step_sequences``), and the trainer's ``accumulate_grad_batches x world_size``; ``(None, None)`` without counts
    (plain means over the micro-batch).

    Raises:
        RuntimeError: if the data was planned for another number of micro-batches per step than the trainer runs
            (e.g. ``accumulate_grad_batches`` changed by a scheduler during the epoch).
    """
    if "step_tokens" not in part:
        return None, None
    micro_batches = accumulate * world_size
    planned = int(part["step_micro_batches"])
    if planned != micro_batches:
        raise RuntimeError(
            f"The training batches were planned for {planned} micro-batches per optimizer step, but the trainer "
            f"runs {micro_batches} (accumulate_grad_batches x devices): token means over the step would be "
            "wrong. Keep accumulate_grad_batches fixed during an epoch."
        )
    labels = part["labels"]
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
    sequences = torch.tensor(labels.shape[0], device=labels.device)
    return (step_scale(tokens, part["step_tokens"], micro_batches),
            step_scale(sequences, part["step_sequences"], micro_batches))
