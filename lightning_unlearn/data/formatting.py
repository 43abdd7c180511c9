"""Turning a question/answer pair into token ids and labels.

The prompt is the tokenizer's chat template when it has one (how chat models were fine-tuned on
TOFU), else a plain template. Prompt and answer are tokenized separately and concatenated, so the
label boundary is exact whatever the tokenizer merges across it; labels are ``-100`` on the prompt and
on padding, and EOS is appended and labelled so a model learns (and unlearns) where an answer stops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass
class Encoded:
    """One tokenized example: ``labels`` equals ``input_ids`` on the answer and EOS, ``-100`` elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class PromptFormatter:
    """Encodes question/answer pairs for one tokenizer.

    Attributes:
        tokenizer: the tokenizer shared by every model of the run.
        max_length: longest sequence; a longer example keeps its whole prompt and a truncated answer.
        template: plain prompt template with a ``{question}`` field, used without a chat template.
        answer_prefix: text put before the answer with the plain template (a space after ``Answer:``).
        use_chat_template: ``None`` uses the chat template when the tokenizer has one.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 512
    template: str = DEFAULT_TEMPLATE
    answer_prefix: str = " "
    use_chat_template: bool | None = None
    _warned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if "{question}" not in self.template:
            raise ValueError(f"The prompt template {self.template!r} needs a '{{question}}' field.")
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template is true but the tokenizer has no chat template; set it to null.")
        self.chat = has_template if self.use_chat_template is None else self.use_chat_template

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt, ending where the answer starts."""
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            return list(ids)
        return self.tokenizer(self.template.format(question=question), add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the answer followed by EOS."""
        text = answer if self.chat else self.answer_prefix + answer
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def encode(self, question: str, answer: str) -> Encoded:
        """Encode one pair, truncating the answer (with one warning per formatter) past ``max_length``."""
        prompt, target = self.prompt_ids(question), self.answer_ids(answer)
        room = self.max_length - len(prompt)
        if room < 1:
            raise ValueError(
                f"The prompt alone is {len(prompt)} tokens, at least max_length={self.max_length}: raise "
                f"max_length or shorten the question {question[:60]!r}..."
            )
        if len(target) > room:
            if not self._warned:
                warnings.warn(
                    f"An example is {len(prompt) + len(target)} tokens, longer than max_length={self.max_length}: "
                    "its answer is truncated (further truncations are not reported). Raise max_length to keep "
                    "whole answers.",
                    stacklevel=2,
                )
                self._warned = True
            target = target[:room]
        return Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target)


def pad_batch(examples: list[Encoded], pad_token_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad examples to ``length`` (default: the longest) into input_ids, attention_mask, labels."""
    length = length or max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_parts(items: list[dict[str, Encoded | list[Encoded]]], pad_token_id: int) -> dict[str, Any]:
    """Collate items made of named parts (``forget``, ``retain``, ...) padded to one common length.

    One length for every part lets the module run forget and retain examples through each model in a
    single batched forward pass. A part may hold a list of examples per item (LLMU's K random answers of
    one question): the lists are flattened in item order, so that part has ``B * K`` rows, item ``b``'s
    at rows ``b*K`` to ``b*K + K - 1``.
    """
    parts = list(items[0])
    rows = {p: [e for item in items for e in (item[p] if isinstance(item[p], list) else [item[p]])] for p in parts}
    length = max(len(e.input_ids) for examples in rows.values() for e in examples)
    return {p: pad_batch(rows[p], pad_token_id, length) for p in parts}
