"""The two white-box / reference membership-inference scores open-unlearning adds to LOSS, ZLib, Min-K% and Min-K%++.

Both are loss-like, as the four in :mod:`lightning_unlearn.metrics.functional`: higher means "less likely a member",
and the AUC is taken with forget labelled 0 and holdout 1 (:func:`~lightning_unlearn.metrics.functional.mia_auc`).

Definitions (open-unlearning, ``src/evals/metrics/mia/gradnorm.py`` and ``reference.py``):

* GradNorm (Maini et al. 2024, "LLM Dataset Inference", arXiv:2402.17012): the per-sample loss is the mean answer
  NLL (without the final answer token, as open-unlearning's token-wise log-probs and Min-K%); its gradient is
  taken with respect to every parameter that receives one; the score is the *mean over those parameter tensors* of each tensor's p-norm (p = 2 by default; 1 and inf allowed). Members sit near a minimum of
  the loss, so their gradients are small.
* Reference (Carlini et al. 2021, "difficulty calibration"): ``mean NLL under the target - mean NLL under a
  reference model`` (open-unlearning's reference is the retain model). A sample the target finds easy only because
  it is easy for any model scores near 0; one it memorised scores below 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GRADNORM_P", "gradnorm_scores", "reference_scores"]

GRADNORM_P = (1.0, 2.0, math.inf)
"""The p-norms open-unlearning's GradNorm attack accepts."""


def gradnorm_scores(losses: Sequence[Tensor], parameters: Sequence[nn.Parameter], p: float = 2.0) -> Tensor:
    """GradNorm score of each sample, float32 ``[B]``.

    Args:
        losses: one scalar per sample (its mean answer NLL), each still attached to the graph of ``parameters``.
        parameters: the parameters the attacker differentiates (the whole model in direct mode; the trainable
            small offset in offset mode, the only one the combined model's loss has a gradient for).
        p: the norm of each parameter tensor's gradient: 1, 2 or inf.

    Returns the mean over the parameter tensors that get a gradient of ``||d loss_b / d theta||_p``; NaN for a
    sample with a non-finite loss. Uses :func:`torch.autograd.grad`, so ``.grad`` of the parameters is left as it
    was (open-unlearning zeroes and overwrites it).

    Raises:
        ValueError: ``p`` not one of 1, 2, inf; no parameter to differentiate; a loss that is not a scalar.
    """
    if float(p) not in GRADNORM_P:
        raise ValueError(f"GradNorm's p must be 1, 2 or inf (open-unlearning's choices), got {p}.")
    params = [q for q in parameters if q.requires_grad]
    if not params:
        raise ValueError("GradNorm needs parameters that require a gradient: unfreeze the attacked model's "
                         "trainable part first.")
    scores = []
    for i, loss in enumerate(losses):
        if loss.dim() != 0:
            raise ValueError(f"loss {i} has shape {tuple(loss.shape)}; GradNorm takes one scalar loss per sample.")
        if not bool(torch.isfinite(loss)):
            scores.append(torch.tensor(math.nan))
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=i + 1 < len(losses), allow_unused=True)
        norms = [g.detach().float().norm(p=float(p)) for g in grads if g is not None]
        scores.append(torch.stack(norms).mean() if norms else torch.tensor(math.nan))
    return torch.stack(scores).float() if scores else torch.zeros(0)


def reference_scores(target_mean_nll: Tensor, reference_mean_nll: Tensor) -> Tensor:
    """Reference score ``target NLL - reference NLL`` per sample, ``[B]`` (both mean NLL per answer token, nats).

    Raises:
        ValueError: the two do not have the same shape.
    """
    if target_mean_nll.shape != reference_mean_nll.shape:
        raise ValueError(f"target NLL {tuple(target_mean_nll.shape)} and reference NLL "
                         f"{tuple(reference_mean_nll.shape)} must have one value per sample each.")
    return target_mean_nll.float() - reference_mean_nll.float().to(target_mean_nll.device)
