"""Map-style datasets over question/answer records, and the sampler that pairs forget with retain.

A training item is one forget example with the parts a loss needs: a random retain example (GD, KL,
NPO+retain...), a random refusal as the preferred answer (IdkDPO), the forget question with K random
answers from a pool of normal answers (LLMU). The randomness comes from a number
drawn by the sampler per item and epoch, so the pairing changes every epoch, is the same on every
run with the same seed, and survives DDP and resumption (the sampler is the only state).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler

from .formatting import Encoded, PromptFormatter
from .rows import Record
from .sources import describe, require_fields

PARTS = ("forget", "retain", "forget_idk", "forget_random")
QA_ONLY_PARTS = {"forget_idk": "a refusal answer to each forget question (IdkDPO)",
                 "forget_random": "random answers to each forget question (LLMU's random-answer term)"}


class QuestionsNeeded(ValueError):
    """A method that needs questions (a refusal or random answers to each) given a raw-text forget split; the
    command line adds the methods that run on text (the data layer does not know the methods)."""


Example = Record | Encoded
"""A training example: a question/answer row, encoded per item, or a window of a text corpus, already encoded."""


class PairedDataset(Dataset):
    """Items ``{part: Encoded}`` built from one forget example and the random draws of its index.

    An example is a question/answer record (encoded here by the formatter) or a text window (an
    :class:`~.formatting.Encoded` from :mod:`.text`, used as it is: every token labelled, no prompt).

    ``forget_random`` is a list of ``num_random_answers`` examples (the forget question with distinct
    answers drawn from ``answer_pool``), flattened by :func:`~.formatting.collate_parts`.
    """

    def __init__(
        self,
        forget: Sequence[Example],
        retain: Sequence[Example],
        formatter: PromptFormatter,
        parts: Sequence[str],
        refusals: Sequence[str] = (),
        question_key: str = "question",
        answer_key: str = "answer",
        answer_pool: Sequence[str] = (),
        num_random_answers: int = 5,
    ) -> None:
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"Unknown data parts {sorted(unknown)}; known parts are {PARTS}.")
        if any(isinstance(e, Encoded) for e in forget):
            for part in set(parts) & set(QA_ONLY_PARTS):
                raise QuestionsNeeded(
                    f"This loss needs {QA_ONLY_PARTS[part]}, but the forget split is raw text, which has no questions. "
                    "On text use a method that needs none of the parts "
                    f"{sorted(QA_ONLY_PARTS)}, or give question/answer rows.")
        if "retain" in parts and not retain:
            raise ValueError("This loss needs retain data but the retain split is empty or unset: set data.retain_split.")
        if "forget_idk" in parts and not refusals:
            raise ValueError("This loss needs refusal answers (idontknow.jsonl) but none were loaded.")
        if "forget_random" in parts and len(answer_pool) < num_random_answers:
            raise ValueError(
                f"This loss pairs each forget question with {num_random_answers} distinct random answers but the "
                f"answer pool holds {len(answer_pool)}: set data.retain_split or data.answer_pool_split."
            )
        # Files are checked with their lines when read; records built in code are checked here (types only).
        require_fields([e for e in forget if not isinstance(e, Encoded)], (question_key, answer_key),
                       "forget records", warn_empty=False)
        if "retain" in parts:
            require_fields([e for e in retain if not isinstance(e, Encoded)], (question_key, answer_key),
                           "retain records", warn_empty=False)
        for name, texts in (("answer pool", answer_pool), ("refusals", refusals)):
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                raise ValueError(f"{name}, item {bad}: {describe(texts[bad])}, not text.")
        self.forget, self.retain, self.refusals = forget, retain, refusals
        self.answer_pool, self.num_random_answers = answer_pool, num_random_answers
        self.formatter, self.parts = formatter, tuple(parts)
        self.q, self.a = question_key, answer_key

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, index: tuple[int, int] | int) -> dict[str, Encoded | list[Encoded]]:
        forget_index, draw = index if isinstance(index, tuple) else (index, index)
        rng = random.Random(draw)
        record = self.forget[forget_index]
        item: dict[str, Encoded | list[Encoded]] = {}
        for part in self.parts:
            if part == "forget":
                item[part] = self.encode(record)
            elif part == "retain":
                item[part] = self.encode(self.retain[rng.randrange(len(self.retain))])
            elif part == "forget_random":
                picks = rng.sample(range(len(self.answer_pool)), self.num_random_answers)
                item[part] = [self.formatter.encode(record[self.q], self.answer_pool[i]) for i in picks]
            else:
                item[part] = self.formatter.encode(record[self.q], self.refusals[rng.randrange(len(self.refusals))])
        return item


    def encode(self, example: Example) -> Encoded:
        """A text window as it is; a question/answer record through the formatter."""
        return example if isinstance(example, Encoded) else self.formatter.encode(example[self.q], example[self.a])


class PairingSampler(DistributedSampler):
    """Yields ``(forget_index, draw)`` pairs: a shuffled pass over the forget set, one random draw each.

    It is a ``DistributedSampler`` so Lightning keeps it under DDP (instead of wrapping it) and calls
    ``set_epoch``; each rank takes every ``num_replicas``-th pair of the same global order, padded by
    wrapping around, like the stock sampler.

    :meth:`resume_at` makes the next pass start mid-epoch: a run resumed from a mid-epoch checkpoint gets a
    fresh iterator from Lightning, which would otherwise replay the epoch's first batches and drop its last.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def resume_at(self, epoch: int, skip: int) -> None:
        """Make the next pass be epoch ``epoch`` without its first ``skip`` pairs of this rank (used once).

        The epoch is set here, not only by Lightning's ``set_epoch``, because with DataLoader workers the
        indices are drawn when the iterator is created, which on resumption happens before ``set_epoch``.
        """
        self.set_epoch(epoch)
        self.skip = skip

    def epoch_pairs(self) -> list[tuple[int, int]]:
        """The epoch's global order of ``(forget_index, draw)`` pairs, padded by wrapping around to a multiple
        of ``num_replicas``; rank ``r`` takes pairs ``r, r + num_replicas, ...``."""
        n = len(self.dataset)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        draws = torch.randint(0, 2**62, (n,), generator=generator)
        pairs = list(zip(order.tolist(), draws.tolist()))
        total = math.ceil(n / self.num_replicas) * self.num_replicas
        return (pairs * math.ceil(total / n))[:total]  # a set smaller than the world size is repeated whole

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        skip, self.skip = self.skip, 0
        return iter(self.epoch_pairs()[self.rank :: self.num_replicas][skip:])
