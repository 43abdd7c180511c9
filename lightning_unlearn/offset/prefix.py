"""Teacher-forced logits of rows that share a prefix, the prefix run once through every model.

A TOFU sample is scored on its answer, its paraphrased answer and its perturbed answers, all after the same
prompt; a multiple-choice item on each option after the same question. Run as independent rows, every row
pays for the prompt again (about a third of the tokens of a TOFU evaluation). Here each distinct prefix is
run once, with a KV cache per component (the same caches as offset decoding,
:mod:`~lightning_unlearn.offset.generation`); the cache rows are then repeated for the rows that continue each
prefix, and only the continuations run, giving logits at the continuation positions alone.

The values equal those of the whole rows up to float rounding: a continuation token attends to exactly its
prefix's keys and values and to the tokens before it, at the same positions (the prefix is left-padded and
masked, the positions skip the padding, the continuation's positions follow its own prefix's length).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .generation import (
    ComponentFn,
    LogitsComponent,
    as_component,
    combine_logits,
    position_ids_from_mask,
    select_cache_rows,
)

__all__ = ["continuation_logits", "supports_continuation"]

Continuation = tuple[Tensor, Tensor, Tensor]
"""``(prefix_of_row [R] long, input_ids [R, Tc], attention_mask [R, Tc])``: rows continuing the prefixes,
right-padded."""


def supports_continuation(fn: LogitsComponent | ComponentFn) -> bool:
    """Whether a component returns logits at every position of a multi-token step after its cache (a Hugging
    Face model does; a served model gives only the next token's and a bare callable promises nothing)."""
    return isinstance(fn, LogitsComponent) and fn.continues_cache()


def continuation_logits(
    components: Sequence[tuple[nn.Module | ComponentFn, float]],
    prefix_ids: Tensor,
    prefix_mask: Tensor,
    continuations: Sequence[Continuation],
    vocab_size: int | None = None,
) -> Iterator[Tensor]:
    """``sum_k w_k z_k`` (float32) at the continuation positions of each batch of ``continuations``, in turn.

    Args:
        components: ``(model or component, weight)`` pairs, as for
            :func:`~lightning_unlearn.offset.generation.greedy_generate`; each must
            :func:`supports_continuation`.
        prefix_ids, prefix_mask: the distinct prefixes ``[P, Tp]``, LEFT-padded, each at least one token.
        continuations: batches of rows ``(prefix_of_row [R], input_ids [R, Tc], attention_mask [R, Tc])``;
            ``prefix_of_row`` indexes the prefixes.
        vocab_size: logits are cut to it before summing (see :func:`~.generation.combine_logits`).

    Yields:
        For each batch, ``[R, Tc, V]`` float32: the logits at the continuation positions, as the whole rows
        (prefix then continuation) would give there. The prefixes run once; each batch but the last works on
        a copy of their caches.

    Raises:
        ValueError: a component that cannot continue a cache, or a prefix row without tokens.
    """
    fns = [as_component(model) for model, _ in components]
    if not all(supports_continuation(fn) for fn in fns):
        raise ValueError("every component must continue its KV cache over several tokens (a served large model "
                         "does not): score the whole rows instead.")
    if not bool(prefix_mask.bool().any(dim=1).all()):
        raise ValueError("every prefix needs at least one token.")
    weights = [float(w) for _, w in components]
    prefix_mask = prefix_mask.long()
    lengths = prefix_mask.sum(dim=1)
    with torch.no_grad():
        caches = [fn.new_cache() for fn in fns]
        position_ids = position_ids_from_mask(prefix_mask)
        for fn, cache in zip(fns, caches):
            fn.next_logits(prefix_ids, prefix_mask, position_ids, cache)  # only the cache is wanted
        for k, (rows, input_ids, attention_mask) in enumerate(continuations):
            last = k == len(continuations) - 1
            rows = rows.to(prefix_mask.device)
            mask = torch.cat([prefix_mask[rows], attention_mask.long()], dim=1)
            steps = torch.arange(input_ids.shape[1], device=input_ids.device)
            positions = lengths[rows].to(input_ids.device)[:, None] + steps
            logits = []
            for fn, cache in zip(fns, caches):
                own = cache if last else copy.deepcopy(cache)
                select_cache_rows(own, rows.cpu())
                logits.append(fn(input_ids, mask, positions, own))
            yield combine_logits(logits, weights, vocab_size)
