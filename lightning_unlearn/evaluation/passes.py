"""Teacher-forced evaluation passes over rows of unequal length: sorted by length, cut by a token budget.

A TOFU batch of ``B`` samples holds ``B`` answers, ``B`` paraphrased answers and ``B * K`` perturbed answers;
padding each kind to its own longest row and running it ``B`` rows at a time makes a larger batch slower (more
padding) and a smaller one slower too (more forward calls). Here every row of every kind is pooled, sorted by
length (longest first) and cut into passes whose padded size, rows x longest row, stays within a token budget,
so a pass holds rows of similar length and the number of passes follows the tokens, not the rows. Each row's
values are scattered back to its place, so callers see the per-row results in their own order.

Padding changes no value beyond float rounding: a right-padded row attends only to its own tokens (causal mask
and attention mask), has the same positions whatever the padding after it, and every score reads only its
labelled positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby

import torch
from torch import Tensor

from ..metrics.functional import IGNORE_INDEX

LogitsFn = Callable[[Tensor, Tensor], Tensor]
Scorer = Callable[[Tensor, Tensor], dict[str, Tensor]]
"""``(logits [b, T, V], labels [b, T]) -> {name: per-row values [b]}``; must treat rows independently."""

__all__ = ["DEFAULT_TOKEN_BUDGET", "LogitsFn", "Scorer", "plan_passes", "row_lengths", "score_rows"]

DEFAULT_TOKEN_BUDGET = 2048
"""Padded tokens per pass when none is set. Half the largest pass of the data module's default evaluation batch
(8 rows) at its default ``max_length`` (512), so the logits never take more memory than they did; and larger
passes are not faster everywhere: on a CPU (tiny model, vocabulary 2048, 1 thread) 1024-2048 tokens per pass
were fastest and 16384 took 1.9x as long (``[tokens, V]`` float32 logits outgrow the caches)."""


def plan_passes(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Row indices grouped into passes: longest first, each pass's ``len(rows) * max(length)`` at most
    ``token_budget`` (a row longer than the budget alone in its pass).

    Sorting first keeps rows of similar length together, so little of each pass is padding; ties keep the
    rows' order, so the plan is deterministic.

    Raises:
        ValueError: ``token_budget`` below 1.
    """
    if token_budget < 1:
        raise ValueError(f"the evaluation token budget must be at least 1 token, got {token_budget}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    width = 0
    for i in order:
        if passes and (len(passes[-1]) + 1) * width <= token_budget:
            passes[-1].append(i)
        else:
            passes.append([i])
            width = lengths[i]
    return passes


def row_lengths(attention_mask: Tensor) -> list[int]:
    """Length of each right-padded row ``[N, T]``: one past its last attended position (0 for an empty row)."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.bool() * positions).max(dim=1).values.tolist()


def _gather(picks: list[tuple[dict[str, Tensor], int, int]], width: int) -> dict[str, Tensor]:
    """``(encoded, row, length)`` rows, right-padded to ``width`` (the padded ids are 0 and masked out)."""
    first = picks[0][0]
    batch = {key: first[key].new_full((len(picks), width), fill)
             for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    for k, (encoded, row, length) in enumerate(picks):
        for key, target in batch.items():
            target[k, :length] = encoded[key][row, :length]
    return batch


def score_rows(logits_fn: LogitsFn, groups: Sequence[tuple[dict[str, Tensor], Scorer]],
               token_budget: int) -> list[dict[str, Tensor]]:
    """Run every row of every group through ``logits_fn`` in length-sorted passes of at most ``token_budget``
    padded tokens, and score each row with its group's scorer.

    Args:
        logits_fn: ``(input_ids [b, T], attention_mask [b, T]) -> logits [b, T, V]`` (the module's forward).
        groups: ``(encoded, scorer)`` pairs; ``encoded`` is a right-padded batch ``{"input_ids",
            "attention_mask", "labels"}`` of ``[N_g, T_g]`` tensors (:func:`~lightning_unlearn.data.formatting.pad_batch`).
        token_budget: most padded tokens (rows x length) per forward pass.

    Returns:
        One dict per group, ``{name: [N_g]}``: the scorer's values for the group's rows in their order.
    """
    rows: list[tuple[int, int]] = []  # (group, row)
    lengths: list[int] = []
    for g, (encoded, _) in enumerate(groups):
        for r, n in enumerate(row_lengths(encoded["attention_mask"])):
            rows.append((g, r))
            lengths.append(max(n, 1))
    parts: list[dict[str, list[tuple[Tensor, Tensor]]]] = [{} for _ in groups]
    for members in plan_passes(lengths, token_budget):
        members.sort(key=lambda i: rows[i][0])  # each group's rows contiguous: its scorer reads a slice
        width = max(lengths[i] for i in members)
        batch = _gather([(groups[rows[i][0]][0], rows[i][1], lengths[i]) for i in members], width)
        logits = logits_fn(batch["input_ids"], batch["attention_mask"])
        start = 0
        for g, block in groupby(members, key=lambda i: rows[i][0]):
            block = list(block)
            stop = start + len(block)
            scores = groups[g][1](logits[start:stop], batch["labels"][start:stop])
            where = torch.tensor([rows[i][1] for i in block])
            for name, values in scores.items():
                parts[g].setdefault(name, []).append((where, values))
            start = stop
    out: list[dict[str, Tensor]] = []
    for g, (encoded, _) in enumerate(groups):
        size = encoded["input_ids"].shape[0]
        result: dict[str, Tensor] = {}
        for name, pieces in parts[g].items():
            values = torch.cat([v for _, v in pieces])
            where = torch.cat([w for w, _ in pieces]).to(values.device)
            result[name] = values.new_empty(size).index_copy_(0, where, values)
        out.append(result)
    return out
