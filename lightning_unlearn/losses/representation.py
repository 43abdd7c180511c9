"""RMU's representation losses as pure functions of hidden states.

Source: Li et al., "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", ICML 2024
(arXiv 2403.03218), section 5 (RMU, representation misdirection for unlearning); reference code
centerforaisafety/wmdp ``rmu/unlearn.py`` and open-unlearning's ``RMU`` trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import IGNORE_INDEX


def control_vector(dim: int, steering_coeff: float, generator: torch.Generator | None = None) -> Tensor:
    """``c * u / ||u||`` with ``u`` uniform on ``[0, 1)^dim``: RMU's fixed random target for forget activations.

    The WMDP code draws ``u`` with ``torch.rand`` (entries in ``[0, 1)``, not a Gaussian direction) and normalises
    it; ``steering_coeff`` ``c`` sets the norm. Float32 ``[dim]``.
    """
    u = torch.rand(dim, generator=generator)
    return steering_coeff * u / u.norm()


def answer_positions(labels: Tensor) -> Tensor:
    """Positions of answer tokens ``[B, T]`` (bool), the first position excluded: the tokens whose hidden states RMU
    moves, counted exactly as the step's token means count answer tokens (``labels[:, 1:]``)."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


def activation_mse(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``mean_{t in mask} (1/d) ||h_t - target_t||^2``: squared error averaged over the hidden size, then over the
    masked tokens of the whole batch.

    Args:
        hidden: ``[B, T, d]`` activations of the model being trained.
        target: ``[B, T, d]`` or broadcastable (RMU's forget target is one ``[d]`` vector).
        mask: ``[B, T]`` bool, the tokens that count.

    Returns:
        Float32 scalar (0 when nothing is masked in). The WMDP code averages over every token of its raw-text
        batches; open-unlearning averages per sequence then over sequences; here tokens of the batch (of the whole
        optimizer step during training) weigh equally, as for every token mean of this package.
    """
    per_token = (hidden.float() - target.float()).pow(2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)
