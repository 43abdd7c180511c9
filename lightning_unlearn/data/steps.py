"""Training batches that know their optimizer step: the counts that make token means independent of the split.

A token mean (GA, GD, KL, the ``nll``/``kl`` retain terms, SFT, LLMU, EUL) or a sequence mean (NPO, DPO,
SimNPO) taken over each micro-batch weighs the step's tokens differently when the same examples are split
into another number of micro-batches (``accumulate_grad_batches``) or devices. The exact mean over the
step needs, before the first micro-batch is back-propagated, the number of labelled tokens and sequences
of the whole step on every process. The pairing sampler is seeded, so every process can compute every
process's share of an epoch: :class:`StepSampler` tags each index with the ``(forget_index, draw)`` pairs of
its whole step, :class:`StepDataset` encodes them to count their labels, and :func:`collate_steps` attaches
the counts to each part of the batch (``step_tokens``, ``step_sequences``) for
:func:`~lightning_unlearn.losses.functional.step_scale`.

Every process encodes the examples of every process (tokenization only, once per step and worker): the cost
of exact counts without a collective before each step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .datasets import PairedDataset, PairingSampler
from .formatting import IGNORE_INDEX, Encoded, collate_parts

STEP_KEY = "step_counts"
Pair = tuple[int, int]


class StepIndex(NamedTuple):
    """One training item and the plan of its optimizer step.

    Attributes:
        forget_index: the forget example.
        draw: its random draw (retain partner, refusal, random answers).
        group: every ``(forget_index, draw)`` of the optimizer step, all micro-batches of all processes.
        micro_batches: ``accumulate_grad_batches * num_replicas`` the plan was made for.
    """

    forget_index: int
    draw: int
    group: tuple[Pair, ...] | None
    micro_batches: int


def num_batches(length: int, limit: int | float) -> int:
    """Batches Lightning runs in an epoch of ``length`` batches under ``limit_train_batches`` (an int caps the
    count, a float keeps that fraction rounded down), as Lightning's ``_parse_num_batches`` computes it."""
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"limit_train_batches must be an int or a float, got {limit!r}.")
    return min(length, limit) if isinstance(limit, int) else int(length * limit)


class StepSampler(PairingSampler):
    """A :class:`PairingSampler` whose indices carry the ``(forget_index, draw)`` pairs of their optimizer step.

    The steps follow Lightning's accumulation: batch ``b`` of an epoch (on every process) belongs to step
    ``b // accumulate_grad_batches``, and the last step of an epoch takes the batches that remain, Lightning
    stepping on the epoch's final batch. Positions count from the start of the epoch, also when a resumed run
    skips the batches it already trained (checkpoints fall between steps).

    Args:
        dataset: the paired training dataset.
        num_replicas: processes.
        rank: this process.
        shuffle: shuffle the forget set every epoch.
        seed: seed of the order and the draws.
        batch_size: forget examples per micro-batch and process.
        accumulate_grad_batches: micro-batches per optimizer step (the trainer's).
        limit_train_batches: the trainer's limit on batches per epoch (int or fraction).

    Raises:
        ValueError: if ``batch_size`` or ``accumulate_grad_batches`` is below 1.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
        batch_size: int = 1, accumulate_grad_batches: int = 1, limit_train_batches: int | float = 1.0,
    ) -> None:
        if batch_size < 1 or accumulate_grad_batches < 1:
            raise ValueError(f"batch_size and accumulate_grad_batches must be at least 1, got {batch_size} and "
                             f"{accumulate_grad_batches}.")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size, self.accumulate = batch_size, accumulate_grad_batches
        self.limit = limit_train_batches

    def __iter__(self) -> Iterator[StepIndex]:  # type: ignore[override]
        skip, self.skip = self.skip, 0
        pairs = self.epoch_pairs()
        shares = [pairs[r :: self.num_replicas] for r in range(self.num_replicas)]
        batches = num_batches(math.ceil(len(shares[0]) / self.batch_size), self.limit)
        per_step, trained = self.accumulate * self.batch_size, batches * self.batch_size
        groups = [tuple(pair for share in shares for pair in share[start : min(start + per_step, trained)])
                  for start in range(0, trained, per_step)]
        micro_batches = self.accumulate * self.num_replicas
        return iter([  # items past Lightning's limit on batches are never trained: they get no plan
            StepIndex(forget_index, draw, groups[position // per_step] if position < trained else None, micro_batches)
            for position, (forget_index, draw) in enumerate(shares[self.rank])
        ][skip:])


def label_count(example: Encoded) -> int:
    """Tokens a loss is taken on: labelled positions after the next-token shift (the first is never one)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


class StepDataset(Dataset):
    """The paired dataset, its items given the label counts of their optimizer step under ``STEP_KEY``.

    The counts are ``{part: (labelled tokens, sequences, micro_batches)}`` over the whole step; the last step's
    are kept, since its micro-batches arrive one after the other.
    """

    def __init__(self, dataset: PairedDataset) -> None:
        self.dataset = dataset
        self._last: tuple[tuple[Pair, ...] | None, dict[str, tuple[int, int]]] = (None, {})

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: StepIndex | Pair | int) -> dict[str, Any]:
        if not isinstance(index, StepIndex):
            return self.dataset[index]
        item: dict[str, Any] = dict(self.dataset[(index.forget_index, index.draw)])
        if index.group is not None:
            counts = self.step_counts(index.group)
            item[STEP_KEY] = {part: (*count, index.micro_batches) for part, count in counts.items()}
        return item

    def step_counts(self, group: tuple[Pair, ...]) -> dict[str, tuple[int, int]]:
        """``{part: (labelled tokens, sequences)}`` summed over the items of ``group``."""
        if self._last[0] != group:
            totals: dict[str, tuple[int, int]] = {}
            for pair in group:
                for part, value in self.dataset[pair].items():
                    examples = value if isinstance(value, list) else [value]
                    tokens, sequences = totals.get(part, (0, 0))
                    totals[part] = (tokens + sum(label_count(e) for e in examples), sequences + len(examples))
            self._last = (group, totals)
        return self._last[1]


def collate_steps(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """:func:`~.formatting.collate_parts`, with each part given its step's counts as 0-d int64 tensors
    ``step_tokens``, ``step_sequences`` and ``step_micro_batches`` (when the items carry them).

    Raises:
        RuntimeError: if the items of one batch belong to different optimizer steps (a batch size that does
            not match the sampler's).
    """
    counts = [item.get(STEP_KEY) for item in items]
    batch = collate_parts([{k: v for k, v in item.items() if k != STEP_KEY} for item in items], pad_token_id)
    if counts[0] is None:
        return batch
    if any(c != counts[0] for c in counts[1:]):
        raise RuntimeError("A training batch spans two optimizer steps: the loader's batch size differs from the "
                           "step sampler's.")
    for part, (tokens, sequences, micro_batches) in counts[0].items():
        batch[part]["step_tokens"] = torch.tensor(tokens)
        batch[part]["step_sequences"] = torch.tensor(sequences)
        batch[part]["step_micro_batches"] = torch.tensor(micro_batches)
    return batch
