"""The offset logits ``z = z_L + alpha * (z_S - z_S0)`` of a training step, with as little new memory as possible.

At vocabulary size every ``[batch, tokens, vocab]`` float32 tensor is large (8 x 128 x 32k = 128 MB), and on
CPU a fresh one costs about a pass over it in page faults alone before anything is computed. Written with
autograd's operators the offset allocates three such tensors in the forward pass and a fourth in the
backward (alpha times the gradient, even for alpha = 1); next to a small model that is a visible share of
the step. The two functions here allocate nothing batch-sized:

* :func:`offset_logits` writes into the memory of ``z_S0``, a temporary of the step;
* :func:`cached_offset_logits` writes into the small model's logits, reading the logit cache's stored rows
  one sequence at a time (each row's conversion to float32 goes through a one-row buffer, small enough for
  the allocator to reuse), when the loss does not also need ``z_L`` as a whole tensor.

Both are exact where ``z_S`` equals ``z_S0``: the difference is computed first and is exactly zero there, so
the result is exactly ``z_L`` (the identity at initialisation). Arithmetic is in float32 throughout; mixed
dtype operations take a slow path in PyTorch (several times slower than converting first), so stored
float16 rows are converted, never combined directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["cached_offset_logits", "offset_logits"]


def _scaled(grad: Tensor, alpha: float) -> Tensor:
    return grad if alpha == 1 else grad * alpha


class _OffsetLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z_small: Tensor, z_large: Tensor, z_ref: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        if z_ref.dtype == torch.float32 and not z_ref._is_view():
            ctx.mark_dirty(z_ref)
            out = z_ref
        else:  # e.g. a slice of wider logits (padded embeddings): not ours to overwrite
            out = torch.empty(z_small.shape, dtype=torch.float32, device=z_small.device)
        torch.sub(z_small, z_ref, out=out)
        return torch.add(z_large.float(), out, alpha=alpha, out=out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _scaled(grad, ctx.alpha), None, None, None


def offset_logits(z_small: Tensor, z_large: Tensor, z_ref: Tensor, alpha: float) -> Tensor:
    """``z_L + alpha * (z_S - z_S0)`` in float32, differentiable in ``z_S``.

    The result is written into ``z_ref`` when it is a float32 tensor of its own, so ``z_ref`` must not be
    read afterwards; ``z_large`` should already be float32 (it is converted otherwise).
    """
    return _OffsetLogits.apply(z_small, z_large, z_ref, float(alpha))


class _CachedOffsetLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z_small: Tensor, rows: Sequence[Tensor], mask: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        if z_small.dtype == torch.float32 and not z_small._is_view() and not (z_small.is_leaf and z_small.requires_grad):
            ctx.mark_dirty(z_small)  # the small model's logits are a temporary: nothing reads them afterwards
            out = z_small
        else:
            out = z_small.detach().float().clone()
        batch, width, vocab = out.shape
        scratch = torch.empty(width, vocab, dtype=torch.float32, device=out.device)  # one row, reused
        for b, value in enumerate(rows):  # value: [attended positions, (z_L, z_S0), vocab] in the cache's dtype
            attended = mask[b]
            n = value.shape[0]
            if bool(attended[:n].all()):  # right padding: the stored positions are a prefix
                row, stored = out[b, :n], scratch[:n]
                stored.copy_(value[:, 1])
                row.sub_(stored)
                stored.copy_(value[:, 0])
            else:
                positions = attended.nonzero().squeeze(1).to(out.device)
                row, stored = out[b], scratch
                stored.zero_().index_copy_(0, positions, value[:, 1].to(out.device, torch.float32))
                row.sub_(stored)
                stored.zero_().index_copy_(0, positions, value[:, 0].to(out.device, torch.float32))
            torch.add(stored, row, alpha=alpha, out=row)
            if row.shape[0] < width and alpha != 1:  # nothing stored past the end: z_L = z_S0 = 0 there
                out[b, n:].mul_(alpha)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _scaled(grad, ctx.alpha), None, None, None


def cached_offset_logits(z_small: Tensor, rows: Sequence[Tensor], attention_mask: Tensor, alpha: float) -> Tensor:
    """``z_L + alpha * (z_S - z_S0)`` from the logit cache's rows (one ``[positions, 2, vocab]`` tensor per
    sequence of the batch, ``z_L`` then ``z_S0``, stored for the attended positions only; unattended positions
    count as zero), written into ``z_small``'s memory when it is a float32 tensor of its own (the small
    model's logits, which nothing reads afterwards): no new batch-sized tensor at all."""
    return _CachedOffsetLogits.apply(z_small, list(rows), attention_mask.detach().bool().cpu(), float(alpha))
