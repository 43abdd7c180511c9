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

from collections.abc import Callable, Iterator, Sequence
from itertools import groupby

import torch
from torch import Tensor

from ..metrics.functional import IGNORE_INDEX

LogitsFn = Callable[[Tensor, Tensor], Tensor]
ContinuationFn = Callable[[Tensor, Tensor, Sequence[tuple[Tensor, Tensor, Tensor]]], Iterator[Tensor]]
"""``(prefix_ids [P, Tp], prefix_mask [P, Tp], [(prefix_of_row [R], input_ids [R, Tc], attention_mask [R, Tc]),
...]) -> logits [R, Tc, V] per batch``: :func:`~lightning_unlearn.offset.prefix.continuation_logits` over the
module's components (left-padded prefixes, right-padded continuations)."""
Scorer = Callable[[Tensor, Tensor], dict[str, Tensor]]
"""``(logits [b, T, V], labels [b, T]) -> {name: per-row values [b]}``; must treat rows independently."""

__all__ = ["DEFAULT_TOKEN_BUDGET", "ContinuationFn", "LogitsFn", "Scorer", "answer_starts", "continuation_fn_of",
           "plan_passes", "row_lengths", "score_rows"]

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


def _gather(picks: list[tuple[dict[str, Tensor], int, int, int]], width: int) -> dict[str, Tensor]:
    """``(encoded, row, start, stop)``: columns ``start:stop`` of rows, right-padded to ``width`` (the padded
    ids are 0 and masked out)."""
    first = picks[0][0]
    batch = {key: first[key].new_full((len(picks), width), fill)
             for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    for k, (encoded, row, start, stop) in enumerate(picks):
        for key, target in batch.items():
            target[k, :stop - start] = encoded[key][row, start:stop]
    return batch


def answer_starts(labels: Tensor) -> list[int]:
    """Each row's first labelled position ``[N, T] -> N`` (``T`` for a row without labels)."""
    labelled = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(labelled, positions, labels.shape[1]).min(dim=1).values.tolist()


class _Results:
    """Per-row scores of each group, gathered pass by pass and put back in the rows' order."""

    def __init__(self, groups: Sequence[tuple[dict[str, Tensor], Scorer]]) -> None:
        self.groups = groups
        self.parts: list[dict[str, list[tuple[Tensor, Tensor]]]] = [{} for _ in groups]

    def score(self, members: list[tuple[int, int]], logits: Tensor, labels: Tensor) -> None:
        """Score the pass's rows ``(group, row)`` (each group's rows contiguous) from ``[b, T, V]`` logits."""
        start = 0
        for g, block in groupby(members, key=lambda m: m[0]):
            block = list(block)
            stop = start + len(block)
            scores = self.groups[g][1](logits[start:stop], labels[start:stop])
            where = torch.tensor([r for _, r in block])
            for name, values in scores.items():
                self.parts[g].setdefault(name, []).append((where, values))
            start = stop

    def collect(self) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = []
        for (encoded, _), parts in zip(self.groups, self.parts):
            size = encoded["input_ids"].shape[0]
            result: dict[str, Tensor] = {}
            for name, pieces in parts.items():
                values = torch.cat([v for _, v in pieces])
                where = torch.cat([w for w, _ in pieces]).to(values.device)
                result[name] = values.new_empty(size).index_copy_(0, where, values)
            out.append(result)
        return out


def score_rows(logits_fn: LogitsFn, groups: Sequence[tuple[dict[str, Tensor], Scorer]],
               token_budget: int, continuation_fn: ContinuationFn | None = None) -> list[dict[str, Tensor]]:
    """Run every row of every group through the model in length-sorted passes of at most ``token_budget``
    padded tokens, and score each row with its group's scorer.

    With ``continuation_fn``, rows whose answer starts at position 2 or later are split before the token
    that predicts their first answer token: each distinct prefix runs once and only the continuations are
    scored (:func:`_score_continuations`); the scorers then see the continuation columns alone, which hold
    every labelled position, so their values are the whole rows' up to float rounding. Other rows, and
    every row without ``continuation_fn``, run whole through ``logits_fn``.

    Args:
        logits_fn: ``(input_ids [b, T], attention_mask [b, T]) -> logits [b, T, V]`` (the module's forward).
        groups: ``(encoded, scorer)`` pairs; ``encoded`` is a right-padded batch ``{"input_ids",
            "attention_mask", "labels"}`` of ``[N_g, T_g]`` tensors (:func:`~lightning_unlearn.data.formatting.pad_batch`).
        token_budget: most padded tokens (rows x length) per forward pass.
        continuation_fn: the module's shared-prefix scoring (:attr:`~lightning_unlearn.modules.base.UnlearnModule.
            continuation_fn`), or ``None``.

    Returns:
        One dict per group, ``{name: [N_g]}``: the scorer's values for the group's rows in their order.
    """
    rows: list[tuple[int, int]] = []  # (group, row)
    lengths: list[int] = []
    starts: list[int] = []
    for g, (encoded, _) in enumerate(groups):
        group_starts = answer_starts(encoded["labels"]) if continuation_fn is not None else None
        for r, n in enumerate(row_lengths(encoded["attention_mask"])):
            rows.append((g, r))
            lengths.append(max(n, 1))
            starts.append(group_starts[r] if group_starts is not None else 0)
    results = _Results(groups)
    shared = [2 <= start < length for start, length in zip(starts, lengths)]
    split = [i for i, s in enumerate(shared) if s]
    whole = [i for i, s in enumerate(shared) if not s]
    for members in plan_passes([lengths[i] for i in whole], token_budget):
        picked = sorted((whole[k] for k in members), key=lambda i: rows[i][0])  # each group's rows contiguous
        width = max(lengths[i] for i in picked)
        batch = _gather([(groups[rows[i][0]][0], rows[i][1], 0, lengths[i]) for i in picked], width)
        results.score([rows[i] for i in picked], logits_fn(batch["input_ids"], batch["attention_mask"]),
                      batch["labels"])
    if split:
        assert continuation_fn is not None
        _score_continuations(continuation_fn, groups, [(rows[i], starts[i] - 1, lengths[i]) for i in split],
                             token_budget, results)
    return results.collect()


def _score_continuations(continuation_fn: ContinuationFn, groups: Sequence[tuple[dict[str, Tensor], Scorer]],
                         split: list[tuple[tuple[int, int], int, int]], token_budget: int, results: _Results) -> None:
    """Rows ``((group, row), cut, length)`` as prefix ``[:cut]`` and continuation ``[cut:length]``.

    Identical prefixes are run once. The prefixes are cut into chunks by :func:`plan_passes` (longest first, a
    chunk's prefix pass within ``token_budget``); each chunk's continuations run in length-sorted passes within
    the budget, all after the chunk's one prefix pass.
    """
    ids_of = {(g, r): groups[g][0]["input_ids"][r] for (g, r), _, _ in split}
    prefix_key: dict[tuple[int, ...], int] = {}
    prefixes: list[tuple[int, int, int]] = []  # (group, row, cut) of a row holding the prefix
    users: list[list[int]] = []  # rows of split continuing each prefix
    for k, ((g, r), cut, _) in enumerate(split):
        key = tuple(ids_of[(g, r)][:cut].tolist())
        if key not in prefix_key:
            prefix_key[key] = len(prefixes)
            prefixes.append((g, r, cut))
            users.append([])
        users[prefix_key[key]].append(k)
    for chunk in plan_passes([cut for _, _, cut in prefixes], token_budget):
        cuts = [prefixes[p][2] for p in chunk]
        first = groups[prefixes[chunk[0]][0]][0]["input_ids"]
        prefix_ids = first.new_zeros((len(chunk), max(cuts)))
        prefix_mask = torch.zeros_like(prefix_ids)
        for j, p in enumerate(chunk):
            g, r, cut = prefixes[p]
            prefix_ids[j, prefix_ids.shape[1] - cut:] = ids_of[(g, r)][:cut]
            prefix_mask[j, prefix_ids.shape[1] - cut:] = 1
        members = [(k, j) for j, p in enumerate(chunk) for k in users[p]]
        spans = [split[k][2] - split[k][1] for k, _ in members]
        passes, batches = [], []
        for picks in plan_passes(spans, token_budget):
            picks = sorted(picks, key=lambda m: split[members[m][0]][0][0])  # each group's rows contiguous
            chosen = [members[m] for m in picks]
            batch = _gather([(groups[split[k][0][0]][0], split[k][0][1], split[k][1], split[k][2])
                             for k, _ in chosen], max(spans[m] for m in picks))
            passes.append(([split[k][0] for k, _ in chosen], batch["labels"]))
            batches.append((torch.tensor([j for _, j in chosen]), batch["input_ids"], batch["attention_mask"]))
        for (picked, labels), logits in zip(passes, continuation_fn(prefix_ids, prefix_mask, batches)):
            results.score(picked, logits, labels)


def continuation_fn_of(logits_fn: object) -> ContinuationFn | None:
    """The shared-prefix scoring a logits function offers (a module's ``continuation_fn``), or ``None``."""
    return getattr(logits_fn, "continuation_fn", None)
