"""Unlearning losses defined per answer token on the full next-token distribution: UNDIAL, CE-U, WGA, SatImp, PDU.

Each function takes logits ``[B, T, V]`` (any float dtype; computed in float32) and labels ``[B, T]`` (int64,
``-100`` on prompt and padding) in the Hugging Face convention of :mod:`lightning_unlearn.losses.functional` (``logits[:, t]`` predicts
``labels[:, t + 1]``) and returns a float32 scalar: the mean of a per-token value over every labelled token of the
batch, like :func:`.functional.nll_mean`, so that the step-wide token means of
:func:`.functional.step_scale` apply unchanged. Where a per-token target is built from logits (UNDIAL's
teacher, CE-U's own distribution) or a weight from probabilities (WGA, SatImp), it is detached: it is a
target, never differentiated.

The open-unlearning implementations (``src/trainer/utils.py``, ``src/trainer/unlearn/{ceu,pdu}.py``) differ from
these in what they average over; each function says how.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import shift, token_nll


def _token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [B, T-1] over the labelled positions ``mask`` of the whole batch (0 with none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``-sum_v softmax(target)_v log softmax(logits)_v`` per position, the target detached. [..., V] -> [...]."""
    target = F.softmax(target_logits.detach().float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(target * logp).sum(dim=-1)


def undial_loss(logits: Tensor, ref_logits: Tensor, labels: Tensor, beta: float = 10.0) -> Tensor:
    """UNDIAL: self-distillation towards the reference's logits with the true token's logit lowered by ``beta``.

    ``L = mean_t CE(softmax(z_ref_t - beta * onehot(y_t)), softmax(z_t))`` over answer tokens; ``z_ref`` is the
    frozen original model (a teacher, detached). At ``z = z_ref`` the gradient pushes only the true token down,
    by a bounded amount: the target stays a proper distribution, unlike gradient ascent's.

    Source: Dong et al., "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large Language
    Models" (NAACL 2025, arXiv 2402.10052). open-unlearning (``compute_undial_loss``, beta 10) averages over
    every position, prompt and padding included; there ``-100`` labels index the vocabulary from its end, so
    the prompt positions are distilled towards a teacher with token ``V - 100`` lowered. Here, as in the
    paper, only the answer tokens count.

    Args:
        logits: logits of the model being unlearned, [B, T, V].
        ref_logits: the teacher's logits, [B, T, V].
        labels: [B, T], ``-100`` where no loss is taken.
        beta: how far the true token's logit is lowered in the target, in logit units (nats).
    """
    logits, targets, mask = shift(logits, labels)
    teacher = ref_logits[:, :-1].float()
    lowered = teacher - beta * F.one_hot(targets.clamp_min(0), teacher.shape[-1]).to(teacher.dtype)
    return _token_mean(_soft_cross_entropy(logits, lowered), mask)


def ceu_loss(logits: Tensor, labels: Tensor, ignore_first_answer_tokens: int = 1) -> Tensor:
    """CE-U: cross-entropy towards the model's own distribution with the true token removed.

    ``L = mean_t CE(softmax(sg(z_t) with z_t[y_t] = -inf), softmax(z_t))``. Its gradient in ``z_t`` is
    ``p_t - q_t``: the true token is pushed down by ``p_t(y_t)`` (vanishing once forgotten, unlike gradient
    ascent's ``1 - p``) and every other token keeps its relative share.

    Source: Yang, "CE-U: Cross Entropy Unlearning" (arXiv 2503.01224); the first answer token is left out, the
    paper's training-settings footnote (open-unlearning ``ignore_first_n_answer_tokens: 1``). The first
    ``ignore_first_answer_tokens`` labelled tokens of each sequence contribute 0 and the mean is over all
    answer tokens; open-unlearning averages over the kept tokens only, larger by ``n / (n - k)`` for a batch of
    ``n`` answer tokens and ``k`` left out (about 1.03 on TOFU's answers), so that a step's mean stays exact
    however it is split into micro-batches.

    Args:
        logits: [B, T, V]; the target is built from them, detached.
        labels: [B, T], ``-100`` where no loss is taken.
        ignore_first_answer_tokens: answer tokens at the start of each sequence that get no loss.

    Raises:
        ValueError: if ``ignore_first_answer_tokens`` is negative.
    """
    if ignore_first_answer_tokens < 0:
        raise ValueError(f"ignore_first_answer_tokens must be >= 0, got {ignore_first_answer_tokens}.")
    logits, targets, mask = shift(logits, labels)
    kept = mask & (mask.cumsum(dim=1) > ignore_first_answer_tokens)
    removed = logits.detach().float().scatter(-1, targets.clamp_min(0).unsqueeze(-1), float("-inf"))
    per_token = torch.where(kept, _soft_cross_entropy(logits, removed), 0.0)
    return _token_mean(per_token, mask)


def _weighted_ascent(logits: Tensor, labels: Tensor, weight: Callable[[Tensor], Tensor]) -> Tensor:
    """``mean_t w(p_t) * log p_t(y_t)`` with ``p_t(y_t)`` the true token's probability and ``w`` detached."""
    nll, mask = token_nll(logits, labels)
    return _token_mean(-weight(torch.exp(-nll.detach())) * nll, mask)


def wga_loss(logits: Tensor, labels: Tensor, beta: float = 1.0) -> Tensor:
    """WGA, weighted gradient ascent: ``L = mean_t p_t^beta * log p_t`` with ``p_t = p(y_t | x, y_<t)``, the
    weight detached.

    Ascent on each answer token's log-likelihood, weighted by its (detached) probability: tokens already
    forgotten stop contributing, so the loss saturates instead of running to ``-inf`` as gradient ascent does.

    Source: Wang et al., "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond" (ICLR
    2025, arXiv 2502.19301); open-unlearning ``compute_wga_loss`` (beta 1), the same token mean.

    Args:
        logits: [B, T, V]. labels: [B, T], ``-100`` where no loss is taken.
        beta: exponent of the weight (0 gives gradient ascent, ``-NLL_mean``).
    """
    return _weighted_ascent(logits, labels, lambda p: p.pow(beta))


def satimp_loss(logits: Tensor, labels: Tensor, beta1: float = 5.0, beta2: float = 1.0) -> Tensor:
    """SatImp: ``L = mean_t p_t^beta1 * (1 - p_t)^beta2 * log p_t``, the weight detached.

    ``p^beta1`` is the saturation weight (as in WGA: forgotten tokens stop counting), ``(1 - p)^beta2`` the
    importance weight (tokens the model is sure of, largely template and function words, count less).

    Source: Yang et al., "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning" (ICML 2025, arXiv
    2505.11953); open-unlearning ``compute_satimp_loss`` (beta1 5, beta2 1), the same token mean.

    Args:
        logits: [B, T, V]. labels: [B, T], ``-100`` where no loss is taken.
        beta1: saturation exponent. beta2: importance exponent.
    """
    return _weighted_ascent(logits, labels, lambda p: p.pow(beta1) * (1 - p).pow(beta2))


def logit_flattening_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """PDU's forget loss: ``L = mean_t (max_v z_t,v - mean_v z_t,v)^2`` at the positions predicting answer tokens.

    Zero exactly when every logit of a position is equal, i.e. the next-token distribution is uniform: it drives
    the answers towards maximal entropy without naming any token. In logit units squared, so it is large (a
    margin of 10 gives 100): the retain side needs a large weight.

    Source: Entesari et al., "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language Models"
    (arXiv 2506.05314). open-unlearning (``src/trainer/unlearn/pdu.py``) masks the logits with the unshifted
    labels, i.e. it takes the positions of the answer tokens (the last one predicting past the answer, the
    one predicting the first answer token left out); here the positions that predict answer tokens.

    Args:
        logits: [B, T, V]. labels: [B, T], ``-100`` where no loss is taken.
    """
    logits, _, mask = shift(logits, labels)
    logits = logits.float()
    margin = logits.max(dim=-1).values - logits.mean(dim=-1)
    return _token_mean(margin.square(), mask)
