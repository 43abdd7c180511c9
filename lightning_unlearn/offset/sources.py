"""Logit sources: where the frozen large model's contribution ``z_L`` to the offset comes from.

A *logit source* is a :class:`~lightning_unlearn.offset.generation.LogitsComponent`: called without a cache it
returns teacher-forced ``[B, T, V]`` values for a batch (training, evaluation, the frozen-logit cache); called
with the cache it made it returns the next token's ``[B, 1, V]`` (greedy offset decoding). Two kinds exist:

* a local Hugging Face model (:func:`large_source` wraps it as before:
  :class:`~lightning_unlearn.offset.generation.CausalLMComponent`, or
  :class:`~lightning_unlearn.offset.placement.DeviceComponent` on its own device);
* :class:`ServedLargeModel`: a model behind a vLLM server, of which only log-probabilities are seen. They
  stand in for the logits exactly (softmax is shift-invariant) except for the top-k fill of
  :mod:`lightning_unlearn.offset.topk`.

A served model is named by its address, ``--model.large_model http://HOST:PORT/v1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .generation import CausalLMComponent, LogitsComponent
from .placement import DeviceComponent
from .topk import dense_rows
from .vllm_client import VLLMClient, is_served

__all__ = ["PROBE_K", "PROBE_TEXTS", "ServedLargeModel", "TokenHistory", "check_served_context",
           "check_served_tokenizer", "is_served", "large_source"]

PROBE_TEXTS = (
    "Question: Who wrote 'The Silent Orchard'?\nAnswer: Basil Mahfouz Al-Kuwaiti, in 1987.",
    "  leading spaces, trailing tab\t and digits 0123456789 3.14159",
    "Ünïcödé, emoji \U0001F600 and CJK \u6f22\u5b57 text; punctuation !?@#$%^&*()[]{}<>",
)
"""Texts whose token ids the server must give exactly as the local tokenizer (with special tokens added and
without): prose in the TOFU format, whitespace, digits and bytes outside ASCII. The first is also the
sequence whose log-probabilities identify a served model's weights (:meth:`ServedLargeModel.probe`)."""

PROBE_K = 5
"""Top log-probabilities per position in a served model's probe (besides the actual token's)."""


class TokenHistory:
    """A served model's "KV cache" in greedy decoding: each row's tokens so far (the server keeps the keys and
    values; its prefix cache makes resending the prefix cheap)."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def extend(self, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Append each row's attended tokens of this step (the first step's left padding is dropped)."""
        new = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask[:, -input_ids.shape[1]:].cpu())]
        self.rows = new if not self.rows else [old + add for old, add in zip(self.rows, new)]

    def select_rows(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (indices, in order): finished sequences leave greedy decoding."""
        self.rows = [self.rows[i] for i in rows.tolist()] if self.rows else self.rows


class ServedLargeModel(LogitsComponent):
    """The large model behind a vLLM server, as a logit source returning log-probabilities.

    Args:
        url: ``http://HOST:PORT/v1``.
        vocab_size: the shared tokenizer's vocabulary size ``V``; every returned row has ``V`` entries.
        top_k: log-probabilities asked per position; ``None`` (or ``>= V``) asks for all ``V`` (exact; the
            server must run with ``--max-logprobs`` at least ``V``).
        client: a configured :class:`~lightning_unlearn.offset.vllm_client.VLLMClient` (timeouts, retries);
            one with defaults when omitted.
    """

    def __init__(self, url: str, vocab_size: int, top_k: int | None = None, client: VLLMClient | None = None) -> None:
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ValueError(f"large_logprobs must be at least 1 (or null for the whole vocabulary), got {top_k}.")
        self.url, self.vocab_size = url, vocab_size
        self.k = vocab_size if top_k is None else min(top_k, vocab_size)
        self.client = client or VLLMClient(url)

    def fingerprint(self) -> dict[str, Any]:
        """What the cached log-probabilities depend on that the server names: the served model's name and context
        length, and ``k``. (The address is left out: the same model moved to another host keeps its cache.)
        A name says nothing of the weights behind it: :meth:`probe` identifies those."""
        served = self.client.models()[0]
        return {"served": served.get("root") or served.get("id"), "max_model_len": served.get("max_model_len"),
                "top_k": self.k, "vocab_size": self.vocab_size}

    def probe(self) -> list[float]:
        """The served weights' identity as numbers: for every position of the first probe text (tokenized by the
        server), the top ``min(PROBE_K, k)`` log-probabilities (sorted) and the actual next token's, rounded to
        1e-6. Other weights behind the same name give other values; the disk logit cache compares them within
        a tolerance (:data:`~lightning_unlearn.offset.logit_cache.PROBE_ATOL`) at every run start.

        Raises:
            ServerError, ServerUnavailable, InvalidLogprobs: from the client.
        """
        ids = self.client.tokenize(PROBE_TEXTS[0])
        k = min(PROBE_K, self.k)
        values: list[float] = []
        for t, answer in enumerate(self.client.completion_logprobs(ids, k, prompt=True)):
            values += sorted(answer.values(), reverse=True)[:k]
            values += [answer[ids[t + 1]]] if t + 1 < len(ids) else []
        return [round(v, 6) for v in values]

    def max_model_len(self) -> int | None:
        """The longest sequence (prompt and answer tokens) the server takes, from ``/v1/models``; ``None`` when
        it does not say."""
        length = self.client.models()[0].get("max_model_len")
        return int(length) if length is not None else None

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
        past_key_values: TokenHistory | None = None,
    ) -> Tensor:
        """Log-probabilities, float32, on ``input_ids``' device.

        Without ``past_key_values``: teacher-forced ``[B, T, V]``, one request per row with its attended tokens
        (padding, left or right, is not sent; its positions are zero). With it (a :meth:`new_cache`): the next
        token's ``[B, 1, V]`` after everything sent so far, the batch's requests in flight together.
        ``position_ids`` is unused: the server numbers the tokens it is sent.

        Raises:
            ServerError, ServerUnavailable: from the client, after its retries.
        """
        if past_key_values is not None:
            past_key_values.extend(input_ids, attention_mask)
            answers = self.client.map(lambda ids: self.client.completion_logprobs(ids, self.k, prompt=False),
                                      past_key_values.rows)
            return torch.stack([dense_rows(a, self.vocab_size) for a in answers]).to(input_ids.device)
        mask = attention_mask.bool().cpu()
        rows = [ids[m].tolist() for ids, m in zip(input_ids.cpu(), mask)]
        answers = self.client.map(lambda ids: self.client.completion_logprobs(ids, self.k, prompt=True),
                                  [r for r in rows if r])
        out = torch.zeros(*input_ids.shape, self.vocab_size)
        answered = iter(answers)
        for b, row in enumerate(rows):
            if row:
                out[b, mask[b]] = dense_rows(next(answered), self.vocab_size)
        return out.to(input_ids.device)

    def new_cache(self) -> TokenHistory:  # type: ignore[override]  # the server holds the real cache
        return TokenHistory()

    def extra_repr(self) -> str:
        return f"url={self.url!r}, top_k={self.k}"


def check_served_tokenizer(client: VLLMClient, tokenizer: PreTrainedTokenizerBase, tokenizer_name: str,
                           texts: Sequence[str] = PROBE_TEXTS) -> None:
    """Refuse a server whose tokenizer gives other ids than ``tokenizer`` on probe texts, or another text for a
    spread of ids (a permuted vocabulary tokenizes alike but means other tokens).

    Raises:
        ValueError: naming the server's model and ``tokenizer_name``, with the first differing probe.
    """
    served = f"{client.model!r} at {client.root}"
    for text in texts:
        for special in (True, False):
            local = tokenizer(text, add_special_tokens=special)["input_ids"]
            remote = client.tokenize(text, add_special_tokens=special)
            if local != remote:
                raise ValueError(
                    f"The tokenizers of the served large model {served} and of {tokenizer_name!r} differ, so their "
                    f"log-probabilities cannot be combined: {text!r} (special tokens {'added' if special else 'not added'}) "
                    f"is {remote[:12]} there and {local[:12]} here. Serve a large model of the small pair's family.")
    n = len(tokenizer)
    sample = sorted({*range(0, n, max(1, n // 64)), n - 1})
    for i in sample:
        if client.detokenize([i]) != tokenizer.decode([i]):
            raise ValueError(f"The tokenizers of the served large model {served} and of {tokenizer_name!r} differ: "
                             f"token id {i} is {client.detokenize([i])!r} there and {tokenizer.decode([i])!r} here.")


def check_served_context(source: ServedLargeModel, max_length: int, where: str) -> None:
    """Refuse a server that cannot take sequences of ``max_length`` tokens: every request asks one token after
    its prompt, so vLLM needs ``max_model_len >= max_length + 1``, else each long sequence fails mid-run.

    Args:
        max_length: the longest sequence this run sends (``data.max_length``, or the deployed model's).
        where: the setting ``max_length`` came from, named in the error.

    Raises:
        ValueError: naming the server, both lengths and what to change.
    """
    limit = source.max_model_len()
    if limit is not None and limit < max_length + 1:
        raise ValueError(
            f"The served large model {source.client.model!r} at {source.client.root} takes at most {limit} tokens "
            f"(max_model_len in /v1/models), but {where} is {max_length} and each request needs one token more "
            f"({max_length + 1}). Restart the server with --max-model-len {max_length + 1} or more, or lower {where} "
            f"to {limit - 1}.")


def large_source(name: str, model: nn.Module | None, vocab_size: int, device: str | None = None,
                 top_k: int | None = None) -> LogitsComponent:
    """The large model as a logit source: served at ``name`` (an address), or the local ``model``, on
    ``device`` when given (inputs moved there, logits back)."""
    if is_served(name):
        return model if isinstance(model, ServedLargeModel) else ServedLargeModel(name, vocab_size, top_k)
    if model is None:
        raise ValueError(f"The local large model {name!r} is not loaded.")
    return CausalLMComponent(model) if device is None else DeviceComponent(model, device)
