"""Turning a question/answer pair into token ids and labels, and where an answer ends.

The prompt is the tokenizer's chat template when it has one (how chat models were fine-tuned on
TOFU), else a plain template. Prompt and answer are tokenized separately and concatenated, so the
label boundary is exact whatever the tokenizer merges across it; labels are ``-100`` on the prompt and
on padding.

Where an answer ends is decided by the format, not by ``eos_token``. A chat template closes the
assistant turn with its own marker, which is often not ``eos_token``: Gemma's ``<end_of_turn>`` (eos
``<eos>``), Phi-3.5's ``<|end|>`` (eos ``<|endoftext|>``), Llama-3-Instruct's ``<|eot_id|>``, ChatML's
``<|im_end|>``. The labelled tokens are exactly what the template renders for the assistant turn: what
it writes between the generation prompt and the answer, the answer, and its end-of-turn marker, with no
token added or doubled (the template's BOS is not doubled by the tokenizer, no EOS is appended after the
template's own end of turn). Labelling ``eos_token`` instead teaches a chat model to end answers with a
token it never ends them with, and misprices every answer it did learn (the answer probability of a
memorised answer falls from 0.998 to 0.48 when only ``eos_token`` changes). Without a chat template the
answer ends with ``eos_token``.

Generation stops at the same places: :func:`stop_token_ids` gathers ``eos_token``, every id of the
models' ``generation_config.eos_token_id`` and the template's end-of-turn token (the rule of
``transformers``' own ``generate`` plus the template's marker), for every caller that decodes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
_QUESTION_MARK, _ANSWER_MARK = "QUESTIONMARK7F3A", "ANSWERMARK7F3A"


@dataclass
class Encoded:
    """One tokenized example: ``labels`` equals ``input_ids`` on the answer and its end, ``-100`` elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class ChatTurn:
    """How a chat template frames an assistant turn, read off the template itself.

    Attributes:
        opening: text the template writes after the generation prompt and before the answer (``" "`` for
            ``[INST]`` templates, usually empty); it is part of what the model generates, so it is labelled.
        closing_ids: the end-of-turn marker: the tokens the template writes after the answer up to and
            including its first control token (``<|eot_id|>``, ``<end_of_turn>``, ``</s>``...). What follows
            it (a newline, the next turn, a conversation-final EOS) belongs to no answer.
        end_token_id: that control token, where generation must stop.
    """

    opening: str
    closing_ids: tuple[int, ...]
    end_token_id: int


def _control_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of special and added tokens: the tokens a template writes as markers, never found inside text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {int(i) for i in added}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_turn(tokenizer: PreTrainedTokenizerBase) -> ChatTurn | None:
    """Analyse the tokenizer's chat template; ``None`` when it has none.

    Renders one exchange with marker strings for question and answer, with and without the generation
    prompt: the full conversation must begin with the prompt (else the prompt the model is asked with is not
    the one it was trained on), and the answer marker splits the rest into opening and closing.

    Raises:
        ValueError: the template renders the conversation without the generation prompt as its beginning, drops
            the answer, or writes no control token after it and the tokenizer has no ``eos_token``.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    user = [{"role": "user", "content": _QUESTION_MARK}]
    prompt = _render(tokenizer, user, True)
    full = _render(tokenizer, user + [{"role": "assistant", "content": _ANSWER_MARK}], False)
    if not full.startswith(prompt):
        raise ValueError(
            "The chat template renders a question with its answer without the generation prompt as its start "
            f"(prompt {prompt[-60:]!r}, full {full[:len(prompt) + 20][-80:]!r}), so the answer's tokens cannot be "
            "told apart from the prompt's: fix the template or set data.use_chat_template: false."
        )
    turn = full[len(prompt):]
    if turn.count(_ANSWER_MARK) != 1:
        raise ValueError(f"The chat template does not write the assistant's answer once in its turn ({turn!r}).")
    opening, after = turn.split(_ANSWER_MARK)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    controls = _control_ids(tokenizer)
    end = next((k for k, i in enumerate(ids) if i in controls), None)
    if end is not None:
        return ChatTurn(opening, tuple(ids[: end + 1]), ids[end])
    # A template that closes turns with plain text only: EOS marks where the answer ends, as without a template.
    if tokenizer.eos_token_id is None:
        raise ValueError(f"The chat template writes no end-of-turn token after an answer ({after!r}) and the "
                         "tokenizer has no eos_token: add one of them.")
    return ChatTurn(opening, (tokenizer.eos_token_id,), tokenizer.eos_token_id)


def _eos_ids(source: Any) -> list[int]:
    """``eos_token_id`` of a generation config, a model config, a model or a model directory, as a list."""
    if source is None:
        return []
    if isinstance(source, (str, Path)):
        path = Path(source) / "generation_config.json"
        if not path.is_file():
            path = Path(source) / "config.json"
        if not path.is_file():
            return []
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    else:
        config = getattr(source, "generation_config", None) or source
        value = getattr(config, "eos_token_id", None)
        if value is None and getattr(source, "config", None) is not None:
            value = getattr(source.config, "eos_token_id", None)
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, sources: Iterable[Any] = ()) -> list[int]:
    """Every id at which a generation ends, sorted: the answer ends at the first of them.

    The union of ``tokenizer.eos_token_id``, each source's ``eos_token_id`` (an int or a list, as
    ``generation_config.json`` writes it: Llama-3-Instruct lists ``<|end_of_text|>``, ``<|eom_id|>`` and
    ``<|eot_id|>``) and the chat template's end-of-turn token. ``sources`` are models, configs
    (``GenerationConfig`` or model config) or model directories; a model without ``generation_config``
    falls back to its config's ``eos_token_id``, as ``transformers`` does.

    Raises:
        ValueError: no stop id at all (no EOS, no template marker, no configured id): generation could only
            stop at ``max_new_tokens``.
    """
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for source in sources:
        ids.update(_eos_ids(source))
    try:
        turn = chat_turn(tokenizer)
    except (ValueError, TemplateError):  # a template the run does not use (data.use_chat_template: false)
        turn = None
    if turn is not None:
        ids.add(turn.end_token_id)
    if not ids:
        raise ValueError("The tokenizer has no eos_token, no chat template end-of-turn token, and no model lists an "
                         "eos_token_id: set tokenizer.eos_token so generations can end.")
    return sorted(ids)


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
        self.turn: ChatTurn | None = chat_turn(self.tokenizer) if self.chat else None
        if self.turn is None and self.tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no eos_token to end answers with and no chat template: set eos_token.")

    @property
    def end_ids(self) -> list[int]:
        """The tokens that end every answer: the template's end-of-turn marker, or EOS without a template."""
        return list(self.turn.closing_ids) if self.turn is not None else [self.tokenizer.eos_token_id]

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt, ending where the answer starts.

        A chat prompt is the template's text tokenized as written (the template writes BOS if the model wants
        one, so the tokenizer adds none); a plain prompt gets the tokenizer's usual special tokens, except an
        EOS some tokenizers append to every text, which would end the example before its answer.
        """
        if self.chat:
            text = _render(self.tokenizer, [{"role": "user", "content": question}], True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(self.template.format(question=question), add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if ids and ids[-1] == eos and eos != self.tokenizer.bos_token_id:
            ids = ids[:-1]
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the answer as the model must generate it, with the end that the format gives it."""
        text = self.turn.opening + answer if self.turn is not None else self.answer_prefix + answer
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.end_ids

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
