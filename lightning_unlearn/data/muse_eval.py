"""MUSE's evaluation sets and their batches (the data behind :mod:`lightning_unlearn.evaluation.muse`).

Five sets, read from a MUSE dataset (:mod:`lightning_unlearn.data.muse_sources`):

====================  ========================  ==============================================================
set                   split                     scored by
====================  ========================  ==============================================================
``verbmem_forget``    ``verbmem/forget``        a greedy continuation of ``prompt`` (ROUGE-L F1 vs ``gt``), and
                                                one teacher-forced pass over ``prompt + gt`` (extraction
                                                strength on ``gt``)
``knowmem_forget``    ``knowmem/forget_qa``     a greedy answer to the few-shot prompt (ROUGE-L F1 vs ``answer``)
``knowmem_retain``    ``knowmem/retain_qa``     the same (MUSE-Books: ``retain2_qa``)
``privleak_forget``   ``privleak/forget``       one pass over the text (its first ``max_length`` tokens): Min-K%
``privleak_holdout``  ``privleak/holdout``       the same
====================  ========================  ==============================================================

Prompts are raw text (MUSE's targets are base models, evaluated without a chat template), tokenized with the
tokenizer's usual special tokens (BOS) and left-padded for batched generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from .formatting import IGNORE_INDEX, Encoded, pad_batch
from .muse_sources import BUILD_HINT, FIELDS, retain_qa_split
from .rows import Record
from .sources import load_split
from .text import encode_document
from ..metrics.rouge import knowmem_prompt
from .tofu_eval import left_pad

Kind = Literal["verbmem", "knowmem", "privleak"]


@dataclass(frozen=True)
class MuseSetSpec:
    """One MUSE evaluation set.

    Attributes:
        name: the set's name (``verbmem_forget``, ``knowmem_retain``, ``privleak_holdout``...).
        split: its split, ``config/split``.
        kind: ``verbmem``, ``knowmem`` or ``privleak``: what items hold and how they are scored.
        icl_split: the knowmem set's in-context examples (``knowmem/forget_qa_icl``); ``None`` otherwise.
    """

    name: str
    split: str
    kind: Kind
    icl_split: str | None = None


def muse_eval_specs(dataset: str) -> list[MuseSetSpec]:
    """The five sets of MUSE's evaluation for ``dataset`` (a hub id or a folder in MUSE's layout)."""
    retain = retain_qa_split(dataset)
    return [
        MuseSetSpec("verbmem_forget", "verbmem/forget", "verbmem"),
        MuseSetSpec("knowmem_forget", "knowmem/forget_qa", "knowmem", "knowmem/forget_qa_icl"),
        MuseSetSpec("knowmem_retain", f"knowmem/{retain}", "knowmem", f"knowmem/{retain}_icl"),
        MuseSetSpec("privleak_forget", "privleak/forget", "privleak"),
        MuseSetSpec("privleak_holdout", "privleak/holdout", "privleak"),
    ]


def _joined(prompt: str, continuation: str) -> str:
    """The continuation as it follows the prompt: after a space when neither side has one at the boundary."""
    if prompt and continuation and not prompt[-1].isspace() and not continuation[0].isspace():
        return " " + continuation
    return continuation


class MuseEvalDataset(Dataset):
    """One MUSE set; items ``{"index", "reference", "input", "prompt"?: ids, "sequence"?: Encoded}``.

    ``prompt`` (verbmem, knowmem) is what generation continues; ``sequence`` (verbmem, privleak) the
    teacher-forced pass, labelled on ``gt`` (verbmem) or on every token but the first (privleak), cut to
    ``max_length`` tokens.
    """

    def __init__(self, spec: MuseSetSpec, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase,
                 max_length: int, icl: Sequence[Record] = ()) -> None:
        if not records:
            raise ValueError(f"MUSE evaluation split {spec.split!r} ({spec.name}) is empty.")
        self.spec, self.records, self.tokenizer, self.max_length = spec, list(records), tokenizer, max_length
        self.icl = [(r["question"], r["answer"]) for r in icl]

    @classmethod
    def load(cls, spec: MuseSetSpec, dataset: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
             subset: int | None = None) -> MuseEvalDataset:
        """Read the set (and its in-context examples), fields checked, the first ``subset`` rows if set.

        Raises:
            FileNotFoundError: the dataset lacks the split, with how to make a folder that has it.
            ValueError: a row lacks a field or holds something other than text in it.
        """
        fields = FIELDS[spec.split.split("/")[0]]
        try:
            records = load_split(dataset, spec.split, fields)
            icl = load_split(dataset, spec.icl_split, fields) if spec.icl_split else []
        except FileNotFoundError as err:
            raise FileNotFoundError(f"MUSE evaluation needs {spec.split} ({spec.name} set): {err} Set data.evaluation: "
                                    f"loss for a corpus without MUSE's evaluation files; {BUILD_HINT}.") from None
        return cls(spec, records[:subset] if subset else records, tokenizer, max_length, icl)

    @property
    def name(self) -> str:
        return self.spec.name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, kind = self.records[index], self.spec.kind
        if kind == "privleak":
            ids = encode_document(self.tokenizer, record["text"])[: self.max_length]
            return {"index": index, "reference": record["text"], "input": None,
                    "sequence": Encoded(ids, [IGNORE_INDEX] + ids[1:])}
        if kind == "knowmem":
            prompt = knowmem_prompt(record["question"], self.icl)
            return {"index": index, "reference": record["answer"], "input": record["question"],
                    "prompt": encode_document(self.tokenizer, prompt)}
        prompt_ids = encode_document(self.tokenizer, record["prompt"])
        gt_ids = self.tokenizer(_joined(record["prompt"], record["gt"]), add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + gt_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + gt_ids)[: self.max_length]
        return {"index": index, "reference": record["gt"], "input": record["prompt"], "prompt": prompt_ids,
                "sequence": Encoded(ids, labels)}


def collate_muse(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Group a batch of :class:`~.tofu_eval.EvalCollection` items by set: ``{"parts": [batch per set]}``, each with
    ``index`` [B], ``references``, ``inputs``, left-padded ``prompt`` and right-padded ``sequence`` when present."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(item["set"], []).append(item)
    parts = []
    for name, group in groups.items():
        part: dict[str, Any] = {"set": name, "index": torch.tensor([i["index"] for i in group]),
                                "references": [i["reference"] for i in group], "inputs": [i["input"] for i in group]}
        if "prompt" in group[0]:
            part["prompt"] = left_pad([i["prompt"] for i in group], pad_token_id)
        if "sequence" in group[0]:
            part["sequence"] = pad_batch([i["sequence"] for i in group], pad_token_id)
        parts.append(part)
    return {"parts": parts}
