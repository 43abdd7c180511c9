"""Unlearning losses as pure functions of logits, labels and log-probabilities.

Logits follow the Hugging Face convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``, and
labels are ``-100`` where no loss is taken (prompt, padding). Formulas are those of the
method pages under ``docs/methods/``; each function is unit-tested against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align next-token logits with their labels: returns logits [B,T-1,V], labels [B,T-1], mask."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels, labels != IGNORE_INDEX


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy [B, T-1] (0 where unlabelled) and the label mask, in float32."""
    logits, labels, mask = shift(logits, labels)
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), labels.clamp_min(0).flatten(), reduction="none"
    ).view_as(labels)
    return nll * mask, mask


def nll_mean(logits: Tensor, labels: Tensor) -> Tensor:
    """``NLL_mean``: mean cross-entropy over every labelled token of the batch (HF's ``outputs.loss``)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp_min(1)


def sequence_logp(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``logp(y|x) = -sum_t CE_t`` per sequence [B] (not length-normalised), and the answer lengths [B]."""
    nll, mask = token_nll(logits, labels)
    return -nll.sum(dim=1), mask.sum(dim=1)


def kl_on_labelled(ref_logits: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """``KL(p_ref || p)`` per position, averaged over labelled positions only.

    Public implementations average over every position, prompt and padding included, which dilutes
    the term by the prompt length; here only the answer tokens count.
    """
    ref_logits, _, mask = shift(ref_logits, labels)
    logits = logits[:, :-1]
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def npo_loss(logp: Tensor, ref_logp: Tensor, beta: float = 0.1) -> Tensor:
    """NPO: ``-(2/beta) * mean logsigmoid(-beta * (logp - logp_ref))`` over forget sequences."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def dpo_loss(
    logp_preferred: Tensor, ref_logp_preferred: Tensor, logp_rejected: Tensor, ref_logp_rejected: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """DPO with a refusal preferred over the real answer (IdkDPO).

    ``-(2/beta) * mean logsigmoid(beta * ((logp - logp_ref)(y_idk) - (logp - logp_ref)(y)))``.
    """
    margin = (logp_preferred - ref_logp_preferred) - (logp_rejected - ref_logp_rejected)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def simnpo_loss(logp: Tensor, lengths: Tensor, beta: float = 4.5, margin: float = 0.0) -> Tensor:
    """SimNPO: ``-(2/beta) * mean logsigmoid(-(beta/|y|) * logp(y|x) - gamma_m)``; reference-free."""
    return -(2.0 / beta) * F.logsigmoid(-(beta / lengths.clamp_min(1)) * logp - margin).mean()


def step_scale(local_count: Tensor, step_count: Tensor, micro_batches: int) -> Tensor:
    """Factor that turns a mean over one micro-batch into its share of the mean over the whole optimizer step.

    An optimizer step back-propagates ``micro_batches = accumulate_grad_batches x world_size`` losses and
    averages their gradients (Lightning divides each loss by ``accumulate_grad_batches``, DDP averages over
    processes). The step's mean of per-token (or per-sequence) values ``x`` over its ``N`` tokens
    (sequences) is ``sum_all x / N = (1 / micro_batches) * sum_j mean_j(x) * n_j * micro_batches / N``, so
    multiplying micro-batch ``j``'s mean over its ``n_j`` items by ``n_j * micro_batches / N`` makes the
    averaged gradient that of the step's mean, however the step is split. With one micro-batch per step the
    factor is exactly 1. This is the fix Hugging Face's Trainer adopted for gradient accumulation (the
    ``num_items_in_batch`` normaliser, transformers 4.46).

    Args:
        local_count: labelled tokens (or sequences) of this micro-batch, scalar tensor.
        step_count: the same count over every micro-batch of the step on every process, scalar tensor.
        micro_batches: ``accumulate_grad_batches * world_size``.

    Returns:
        A float32 scalar (0 when the step has nothing to count, where the mean is 0 anyway).

    Raises:
        ValueError: if this micro-batch counts more than its whole step (a data plan that does not match).
    """
    local, step = local_count.float(), step_count.to(local_count.device).float()
    if bool(local > step):
        raise ValueError(f"A micro-batch has {int(local)} items to average but its whole optimizer step only "
                         f"{int(step)}: the step plan of the data does not match this batch.")
    return torch.where(step > 0, local * micro_batches / step.clamp_min(1), torch.zeros_like(local))
