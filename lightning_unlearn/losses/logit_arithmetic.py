"""Logit arithmetic for unlearning: ULD's filtered logit difference and WHP's generic targets, as pure functions.

Logits are ``[..., V]`` float tensors over the shared vocabulary; labels follow the Hugging Face convention of
:mod:`lightning_unlearn.losses.functional` (``logits[:, t]`` predicts ``labels[:, t + 1]``, ``-100`` where no loss is taken).

Sources:

* ULD: Ji et al., "Reversing the Forget-Retain Objectives: An Efficient LLM Unlearning Framework from Logit
  Difference", NeurIPS 2024 (arXiv 2406.08607); reference code UCSB-NLP-Chang/ULD (``ContrastLLM``).
* WHP: Eldan & Russinovich, "Who's Harry Potter? Approximate Unlearning in LLMs", 2023 (arXiv 2310.02238),
  section 3, the generic prediction ``v_generic = v_baseline - alpha * ReLU(v_reinforced - v_baseline)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import shift


def relative_top_mask(logits: Tensor, relative_top: float) -> Tensor:
    """Tokens the relative-top filter drops: ``True`` where ``log p(v) < min(log p_max + log tau, log p_(k))``.

    ``p = softmax(logits)`` over the last dimension, ``tau = relative_top``, ``log p_(k)`` the ``k``-th largest
    log-probability with ``k = max(1, floor(tau * V))``. The first bound is the plausibility constraint of
    contrastive decoding (Li et al. 2023, adopted by DoLa and by ULD): a token is kept when the model gives it at
    least ``tau`` times the probability of its favourite; the second keeps at least ``k`` tokens, as ULD's
    reference code does (``min_tokens_to_keep = int(tau * V)``).

    Args:
        logits: ``[..., V]`` logits of the model the filter reads (ULD: the target model).
        relative_top: ``tau`` in ``(0, 1]``; ``0`` drops nothing.

    Returns:
        A bool tensor shaped like ``logits``.

    Raises:
        ValueError: if ``relative_top`` is outside ``[0, 1]``.
    """
    if not 0.0 <= relative_top <= 1.0:
        raise ValueError(f"relative_top must be in [0, 1], got {relative_top}.")
    if relative_top == 0.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = max(1, int(relative_top * logp.shape[-1]))
    kth = logp.topk(k, dim=-1).values[..., -1]
    threshold = torch.minimum(logp.max(dim=-1).values + math.log(relative_top), kth)
    return logp < threshold.unsqueeze(-1)


def filtered_offset(z_large: Tensor, delta: Tensor, relative_top: float) -> Tensor:
    """``z_L + keep(z_L) * delta``: an offset applied only to the tokens the large model finds plausible.

    ``delta`` is the weighted offset, e.g. ``alpha * (z_S - z_S0)`` or, for ULD, ``-w * z_A``; ``keep`` is the
    complement of :func:`relative_top_mask` of ``z_L`` (every token when ``relative_top`` is 0, which gives the
    plain offset). Float32 result ``[..., V]``; differentiable in ``delta``.
    """
    keep = ~relative_top_mask(z_large, relative_top)
    return z_large.float() + delta.float() * keep


def uniform_kl_on_labelled(logits: Tensor, labels: Tensor) -> Tensor:
    """``KL(u || p)`` from the uniform distribution ``u`` over the ``V`` tokens, averaged over answer positions.

    ``KL(u || p) = -log V - mean_v log p(v)``: zero exactly when ``p`` is uniform. ULD's assistant is trained with it
    on retain data so that its logits carry no information there (its reference code's ``UniformLossFunc``,
    ``kl_div(log p, u, 'batchmean')``, averages over every position, prompt and padding included; here only the
    positions that predict answer tokens count, as for every term of this package). Float32 scalar, 0 without any
    labelled position.
    """
    logits, _, mask = shift(logits, labels)
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = -math.log(logp.shape[-1]) - logp.mean(dim=-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def whp_generic_logits(z_base: Tensor, z_reinforced: Tensor, z_reinforced_base: Tensor, a: float = 5.0) -> Tensor:
    """WHP's generic prediction ``v = z_base - a * ReLU(z_reinforced - z_reinforced_base)``.

    In the paper ``z_reinforced_base`` is ``z_base`` itself (the model before its reinforcement on the forget
    data): tokens whose logit the reinforcement raised are the ones tied to the forget data, and they are pushed
    down by ``a`` times the rise. Passing the rise measured on another pair (a small model and its reinforced copy)
    applies it to ``z_base`` of a larger model, as offset unlearning transfers a small model's change. Float32
    ``[..., V]``, no gradient needed (targets).
    """
    return z_base.float() - a * torch.relu(z_reinforced.float() - z_reinforced_base.float())


def soft_cross_entropy_on_labelled(logits: Tensor, target_logits: Tensor, labels: Tensor, hard: bool = True) -> Tensor:
    """Cross-entropy of ``logits`` against targets given as logits, averaged over the positions predicting answers.

    ``hard``: the target is ``argmax target_logits`` (WHP fine-tunes on the generic prediction's tokens);
    otherwise the full distribution ``softmax(target_logits)``, ``-sum_v q(v) log p(v)``. Float32 scalar.
    """
    logits, _, mask = shift(logits, labels)
    targets = target_logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    if hard:
        ce = -logp.gather(-1, targets.argmax(dim=-1, keepdim=True)).squeeze(-1)
    else:
        ce = -(F.softmax(targets.float(), dim=-1) * logp).sum(dim=-1)
    return (ce * mask).sum() / mask.sum().clamp_min(1)
