"""TOFU evaluation sets and their batches.

Each sample is scored by teacher-forced passes over several answers to the same question (the answer,
a paraphrase, perturbed wrong answers) and by a greedy generation from the prompt. A batch carries all of
them, already padded, so the module runs each model once per answer variant and once to generate.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .formatting import Encoded, PromptFormatter, pad_batch
from .rows import Record
from .sources import load_split, require_fields


@dataclass(frozen=True)
class EvalSetSpec:
    """How one TOFU set is scored.

    Attributes:
        name: short name used in metric names (``forget``, ``retain``, ``ra``, ``wf``, ``holdout``).
        split: split file to read.
        correct_key: the answer that counts as correct in the truth ratio (None: no truth ratio).
        perturbed_key: the list of wrong answers (None: no truth ratio).
        generate: whether greedy generations are scored with ROUGE.
    """

    name: str
    split: str
    correct_key: str | None
    perturbed_key: str | None
    generate: bool


def tofu_eval_specs(forget_split: str, eval_forget_split: str | None, holdout_split: str | None) -> list[EvalSetSpec]:
    """The sets of the TOFU protocol: forget, retain, real authors, world facts, and holdout for MIA."""
    forget_eval = eval_forget_split or f"{forget_split}_perturbed"
    specs = [
        EvalSetSpec("forget", forget_eval, "paraphrased_answer", "perturbed_answer", True),
        EvalSetSpec("retain", "retain_perturbed", "paraphrased_answer", "perturbed_answer", True),
        EvalSetSpec("ra", "real_authors_perturbed", "answer", "perturbed_answer", True),
        EvalSetSpec("wf", "world_facts_perturbed", "answer", "perturbed_answer", True),
    ]
    if holdout_split is None:
        digits = re.search(r"(\d+)", forget_split)
        holdout_split = f"holdout{digits.group(1)}" if digits else None
    if holdout_split:
        specs.append(EvalSetSpec("holdout", holdout_split, None, None, False))
    return specs


def _text_fields(spec: EvalSetSpec, question_key: str, answer_key: str) -> tuple[str, ...]:
    """Fields of an evaluation row that must hold text: question, answer and the answer counted as correct."""
    return tuple(k for k in (question_key, answer_key, spec.correct_key) if k)


def _list_fields(spec: EvalSetSpec) -> tuple[str, ...]:
    """Fields that must hold a non-empty list of texts: the perturbed (wrong) answers of the truth ratio."""
    return (spec.perturbed_key,) if spec.perturbed_key else ()


class EvalDataset(Dataset):
    """One evaluation set: every item holds the encodings of all the answers it is scored on."""

    def __init__(
        self, spec: EvalSetSpec, records: Sequence[Record], formatter: PromptFormatter,
        question_key: str = "question", answer_key: str = "answer",
    ) -> None:
        # Rows read from a file were checked (and empty texts warned about) with their file and line on loading.
        require_fields(records, _text_fields(spec, question_key, answer_key), f"evaluation split {spec.split!r}",
                       _list_fields(spec), warn_empty=False)
        if spec.perturbed_key:
            counts = {len(r[spec.perturbed_key]) for r in records}
            if len(counts) != 1:
                raise ValueError(f"{spec.split}: every row needs the same number of perturbed answers, found {counts}.")
        self.spec, self.records, self.formatter = spec, list(records), formatter
        self.q, self.a = question_key, answer_key

    @classmethod
    def load(cls, spec: EvalSetSpec, dataset: str, formatter: PromptFormatter, subset: int | None = None,
             question_key: str = "question", answer_key: str = "answer") -> EvalDataset:
        try:
            records = load_split(dataset, spec.split, _text_fields(spec, question_key, answer_key), _list_fields(spec))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"TOFU evaluation needs split {spec.split!r} ({spec.name} set): {err} Set data.evaluation: loss "
                "for data without the TOFU evaluation files, or name the split with data.eval_forget_split / "
                "data.eval_holdout_split."
            ) from None
        return cls(spec, records[:subset] if subset else records, formatter, question_key, answer_key)

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, spec, fmt = self.records[index], self.spec, self.formatter
        question, answer = record[self.q], record[self.a]
        item: dict[str, Any] = {
            "index": index, "question": question, "answer_text": answer,
            "prompt": fmt.prompt_ids(question), "answer": fmt.encode(question, answer),
        }
        if spec.correct_key and spec.correct_key != self.a:
            item["correct"] = fmt.encode(question, record[spec.correct_key])
        if spec.perturbed_key:
            item["perturbed"] = [fmt.encode(question, wrong) for wrong in record[spec.perturbed_key]]
        return item


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation (new tokens then line up at the right edge)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq):] = torch.tensor(seq)
        attention_mask[row, length - len(seq):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_eval(items: list[dict[str, Any]], set_name: str, pad_token_id: int) -> dict[str, Any]:
    """Batch of one evaluation set: padded answer variants, left-padded prompts, texts and indices."""
    batch: dict[str, Any] = {
        "set": set_name,
        "index": torch.tensor([i["index"] for i in items]),
        "questions": [i["question"] for i in items],
        "answer_texts": [i["answer_text"] for i in items],
        "prompt": left_pad([i["prompt"] for i in items], pad_token_id),
        "answer": pad_batch([i["answer"] for i in items], pad_token_id),
    }
    if "correct" in items[0]:
        batch["correct"] = pad_batch([i["correct"] for i in items], pad_token_id)
    if "perturbed" in items[0]:
        flat: list[Encoded] = [e for i in items for e in i["perturbed"]]
        batch["perturbed"] = pad_batch(flat, pad_token_id)
        batch["num_perturbed"] = len(items[0]["perturbed"])
    return batch


class AnswerDataset(Dataset):
    """The answers of one split with their indices, for ``data.evaluation: loss`` (answer NLL only); a text
    window (an :class:`Encoded`) is scored on all its labelled tokens.

    Items ``{"index": i, "answer": Encoded}``; the index lets results gathered from DDP ranks count each
    sample once (the distributed sampler repeats samples to even out the ranks).
    """

    def __init__(self, name: str, records: Sequence[Record | Encoded], formatter: PromptFormatter,
                 question_key: str = "question", answer_key: str = "answer") -> None:
        self.name, self.records, self.formatter = name, list(records), formatter
        self.q, self.a = question_key, answer_key

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if isinstance(record, Encoded):  # a text window: every token labelled already
            return {"index": index, "answer": record}
        return {"index": index, "answer": self.formatter.encode(record[self.q], record[self.a])}


def collate_answers(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Group a batch of :class:`AnswerDataset` items (through :class:`EvalCollection`) by set."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item["set"], []).append(item)
    return {"parts": [
        {"set": name, "index": torch.tensor([i["index"] for i in group]),
         "answer": pad_batch([i["answer"] for i in group], pad_token_id)}
        for name, group in groups.items()
    ]}


class EvalCollection(Dataset):
    """All evaluation sets behind one index, so validation/test is a single dataloader.

    One loader keeps Lightning's result table to one column and lets any sampler (DDP's included)
    split the work; :func:`collate_collection` (or :func:`collate_answers`) regroups each batch by set.
    Each item keeps its index within its own set, by which the metrics de-duplicate under DDP and order
    their per-sample values.

    With ``sort_by_length`` every item is built (tokenized) once, here, and each set's items are served
    longest first (by :func:`item_length`), so that a batch holds prompts of similar length and little of a
    generation batch is padding. Only the order in which items are served changes: the sets stay in their
    order, every item keeps its own index, and the results (ordered by index) are those of the dataset order.
    A distributed sampler shards this collection like any other.
    """

    def __init__(self, datasets: Sequence[EvalDataset | AnswerDataset], sort_by_length: bool = False) -> None:
        self.datasets = list(datasets)
        self.offsets = [0]
        for d in self.datasets:
            self.offsets.append(self.offsets[-1] + len(d))
        self.items: list[list[dict[str, Any]]] | None = None
        if sort_by_length:
            self.items = []
            for dataset in self.datasets:
                items = [dataset[i] for i in range(len(dataset))]
                self.items.append(sorted(items, key=lambda item: -item_length(item)))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        for position, dataset in enumerate(self.datasets):
            if index < self.offsets[position + 1]:
                local = index - self.offsets[position]
                item = dataset[local] if self.items is None else self.items[position][local]
                return {"set": dataset.name, **item}
        raise IndexError(index)


def item_length(item: dict[str, Any]) -> int:
    """Tokens of an evaluation item's generation prompt, else of its teacher-forced sequence (``answer`` or
    ``sequence``): what sorting by length groups."""
    if "prompt" in item:
        return len(item["prompt"])
    encoded = item.get("answer", item.get("sequence"))
    return len(encoded.input_ids) if encoded is not None else 0


def collate_collection(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Group a batch by evaluation set: ``{"parts": [batch of set A, batch of set B, ...]}``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item["set"], []).append(item)
    return {"parts": [collate_eval(group, name, pad_token_id) for name, group in groups.items()]}
