"""An exported unlearned model, loaded back as one object for use outside training.

Training ends with a Hugging Face directory per run (``model.export_dir``). In offset mode that directory
is not a usable model by itself: the unlearned model is ``z_L + alpha (z_S - z_S0)``, three models whose
logits are summed at every step. :class:`UnlearnedModel` loads the three (or, for several composed
deletion requests, ``L``, ``S0`` and every ``S_i``), and answers the questions one asks of a language
model -- logits, log-probabilities of answers, greedy generations -- with the prompts formatted exactly
as during training (:class:`~lightning_unlearn.data.formatting.PromptFormatter`), so that what the model
forgot in training is what it has forgotten here.

The models are held by one :class:`~lightning_unlearn.offset.combined.CombinedModel` (``combined``), the class the
training module holds, so an export computes what training measured. Generation keeps one KV cache per model
(:func:`~lightning_unlearn.offset.generation.greedy_generate`): a shared cache would make each model attend to the
others' keys and values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.formatting import (
    DEFAULT_TEMPLATE,
    PromptFormatter,
    pad_batch,
    stop_token_ids,
)
from ..data.tofu_eval import left_pad
from ..losses.functional import sequence_logp, token_nll
from ..offset.sources import ServedLargeModel, check_served_context, check_served_tokenizer, is_served
from ..offset.combined import CombinedModel
from ..offset.generation import StopFn, decode_answers, position_ids_from_mask
from ..offset.filtered import FilteredCombined
from ..models.loading import DType, check_same_tokenizer, freeze, load_causal_lm
from ..data.tokenizer import load_tokenizer
from ..models.lora import AdapterComponent, adapter_base_model, attach_adapters
from .manifest import Composition, PathLike, compose

__all__ = ["UnlearnedModel"]

DEFAULT_MAX_LENGTH = 2048
"""Longest prompt + answer :meth:`UnlearnedModel.log_probs` scores when not told (a served model's may be less)."""


def _load_offsets(
    composition: Composition, reference: nn.Module | None, dtype: DType, trust_remote_code: bool
) -> tuple[list[nn.Module], nn.Module | None]:
    """The offsets' models, and the reference to use with them.

    LoRA exports are adapters on the reference ``S0``: they are all loaded onto the one reference model
    already in memory, each selected by name when its component runs, and the reference becomes that same
    model with every adapter off. Composing ``n`` LoRA requests thus costs one small model, not ``n + 1``.
    A direct LoRA export is loaded onto the base model its ``adapter_config.json`` names.
    """
    unknown = {o.adapter for o in composition.offsets} - {None, "lora"}
    if unknown:
        raise ValueError(f"Unknown adapter kinds {sorted(unknown)} in the manifests; only 'lora' is supported.")
    adapters = {f"offset{i}": o.path for i, o in enumerate(composition.offsets) if o.adapter}
    if composition.is_direct:
        (offset,) = composition.offsets
        if not offset.adapter:
            return [freeze(load_causal_lm(offset.path, dtype, trust_remote_code))], None
        base = freeze(load_causal_lm(adapter_base_model(offset.path), dtype, trust_remote_code))
        return [attach_adapters(base, adapters)], None
    if not adapters:
        return [freeze(load_causal_lm(o.path, dtype, trust_remote_code)) for o in composition.offsets], reference
    shared = attach_adapters(reference, adapters)
    offsets = [AdapterComponent(shared, f"offset{i}") if o.adapter else freeze(load_causal_lm(o.path, dtype,
                                                                                                trust_remote_code))
               for i, o in enumerate(composition.offsets)]
    return offsets, AdapterComponent(shared, None)


def _batches(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}.")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class UnlearnedModel(nn.Module):
    """The unlearned model of one or several exports: ``z_L + sum_i alpha_i (z_S_i - z_S0)``, or ``z_S``.

    Build it with :meth:`from_export`. Every model is frozen and in eval mode; logits are float32 and
    sliced to the tokenizer's vocabulary, as in training.

    Attributes:
        composition: what was loaded (paths, alphas, large and reference model); ``save_manifest``
            writes it so the same composed model can be reloaded from one path.
        tokenizer: the shared tokenizer (saved in every export).
        formatter: turns questions into the prompts used in training.
        stop_ids: where generated answers end: EOS, every model's ``generation_config.eos_token_id`` and the
            chat template's end-of-turn token (:func:`~lightning_unlearn.data.formatting.stop_token_ids`).
    """

    def __init__(
        self,
        composition: Composition,
        tokenizer: PreTrainedTokenizerBase,
        offsets: Sequence[nn.Module],
        large: PreTrainedModel | ServedLargeModel | None = None,
        reference: nn.Module | None = None,
        formatter: PromptFormatter | None = None,
    ) -> None:
        super().__init__()
        if (large is None) != composition.is_direct or (reference is None) != (composition.reference_model is None):
            raise ValueError("An offset composition needs a large model and the reference its manifests name (none "
                             "for ULD's reference-free offsets); a direct one neither.")
        if len(offsets) != len(composition.offsets):
            raise ValueError(f"{len(offsets)} models for {len(composition.offsets)} composition entries.")
        self.composition = composition
        self.tokenizer = tokenizer
        self.formatter = formatter or PromptFormatter(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, [m for m in (large, *offsets) if m is not None])
        self.combined = self._combine(offsets, large, reference)

    def _combine(self, offsets: Sequence[nn.Module], large: nn.Module | None,
                 reference: nn.Module | None) -> CombinedModel:
        """The one combined model training also uses: ULD's filtered offsets, a weighted sum, or the model alone."""
        vocab, c = len(self.tokenizer), self.composition
        if c.is_direct:
            return CombinedModel(offsets, vocab_size=vocab)
        if reference is None or c.relative_top > 0:  # ULD: the filter is not a weighted sum
            return FilteredCombined(offsets, c.alphas, large=large, reference=reference, vocab_size=vocab,
                                    relative_top=c.relative_top)
        return CombinedModel(offsets, c.alphas, large=large, reference=reference, vocab_size=vocab)

    @property
    def large(self) -> nn.Module | None:
        """The large model (``None`` for a direct model)."""
        return self.combined.large

    @property
    def reference(self) -> nn.Module | None:
        """The reference ``S0`` (a LoRA composition's: the shared base with every adapter off)."""
        return self.combined.reference

    @property
    def offsets(self) -> nn.ModuleList:
        """The offsets' models, in the composition's order (a direct model's one)."""
        return self.combined.offsets

    # --- loading --------------------------------------------------------------------------------------------

    @classmethod
    def from_export(
        cls,
        exports: PathLike | Sequence[PathLike],
        alphas: Sequence[float] | None = None,
        *,
        large_model: str | None = None,
        reference_model: str | None = None,
        large_dtype: DType | None = None,
        small_dtype: DType | None = None,
        device: str | torch.device = "cpu",
        template: str = DEFAULT_TEMPLATE,
        use_chat_template: bool | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        large_logprobs: int | None = None,
    ) -> UnlearnedModel:
        """Load one export, several offset exports to compose, or a ``composition.json``.

        Args:
            exports: export directories (``model.export_dir`` of ``fit``) or composition manifests.
            alphas: one strength per offset, replacing those recorded at training time.
            large_model: where the large model is now, if it moved since training (the manifests keep
                the path or id used then); ``http://HOST:PORT/v1`` for a vLLM server serving it.
            reference_model: likewise for the frozen small reference.
            large_dtype: dtype of the large model; ``None``: the one the manifests record (training's), else
                ``bfloat16``.
            small_dtype: dtype of the small models (reference and offsets); ``None``: the one the manifests (or a
                direct export's ``config.json``) record, else ``float32``.
            device: where to put every model.
            template: the plain prompt template used in training (``data.template``), for tokenizers
                without a chat template.
            use_chat_template: as ``data.use_chat_template``; ``None`` uses the chat template if any.
            max_length: longest prompt + answer scored by :meth:`log_probs` (longer answers are truncated
                with a warning); ``None``: 2048, or with a served large model at most its ``max_model_len`` less
                one. A served model that cannot take ``max_length`` (+ 1) tokens is refused (``ValueError``).
            trust_remote_code: allow models whose code lives on the hub.
            large_logprobs: with a served large model, the top-k log-probabilities asked per step (``None``: the
                whole vocabulary, exact; :mod:`lightning_unlearn.offset.topk`).

        Raises:
            FileNotFoundError: an export, or a file of one (named), is missing.
            ValueError: exports that do not compose, a non-finite alpha (in ``alphas`` or a manifest), or a
                ``large_model``/``reference_model`` that is itself an offset export.
        """
        composition = compose(exports, alphas, large_dtype=large_dtype, small_dtype=small_dtype,
                              source="the alphas argument").with_models(large_model, reference_model)
        large_dtype = composition.large_dtype or "bfloat16"
        small_dtype = composition.small_dtype or "float32"
        paths = [o.path for o in composition.offsets]
        tokenizer = load_tokenizer(paths[0], trust_remote_code)
        for path in paths[1:]:
            check_same_tokenizer(tokenizer, load_tokenizer(path, trust_remote_code), paths[0], path)
        large = reference = None
        if not composition.is_direct:
            if is_served(composition.large_model):
                large = ServedLargeModel(composition.large_model, len(tokenizer), large_logprobs)
                check_served_tokenizer(large.client, tokenizer, paths[0])
                if max_length is None:
                    max_length = min(DEFAULT_MAX_LENGTH, (large.max_model_len() or DEFAULT_MAX_LENGTH + 1) - 1)
                check_served_context(large, max_length, "max_length")
            else:
                check_same_tokenizer(load_tokenizer(composition.large_model, trust_remote_code), tokenizer,
                                     composition.large_model, paths[0])
                large = freeze(load_causal_lm(composition.large_model, large_dtype, trust_remote_code,
                                              "the large model"))
            if composition.reference_model is not None:
                reference = freeze(load_causal_lm(composition.reference_model, small_dtype, trust_remote_code,
                                                  "the reference model"))
        offsets, reference = _load_offsets(composition, reference, small_dtype, trust_remote_code)
        formatter = PromptFormatter(tokenizer, max_length=max_length or DEFAULT_MAX_LENGTH, template=template,
                                    use_chat_template=use_chat_template)
        return cls(composition, tokenizer, offsets, large, reference, formatter).to(device)

    def set_alphas(self, alphas: Sequence[float]) -> None:
        """Change the offsets' strengths without reloading (``alpha = 0`` is the large model alone).

        Raises:
            ValueError: not one finite alpha per offset.
        """
        self.composition = self.composition.with_alphas(alphas, "set_alphas")
        self.combined.alphas = self.composition.alphas

    def save_manifest(self, path: PathLike) -> Path:
        """Write ``composition.json`` listing the offsets and alphas; :meth:`from_export` reloads it."""
        if self.composition.is_direct:
            raise ValueError("A direct export is already one directory; it needs no composition manifest.")
        return self.composition.save(path)

    def train(self, mode: bool = True) -> UnlearnedModel:
        """Stay in eval mode: dropout would make scores noisy and greedy decoding stochastic."""
        return super().train(False)

    # --- scoring --------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Combined next-token logits ``[B, T, V]``, float32.

        Position ids skip left padding, so a prompt scores the same padded or not; on a right-padded
        batch (as in training) every unpadded position equals the training module's ``forward``.
        """
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        return self.combined(input_ids, attention_mask, position_ids_from_mask(attention_mask))

    forward = logits

    def encode(self, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer and its end) as in training."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers.")
        examples = [self.formatter.encode(q, a) for q, a in zip(prompts, answers)]
        return pad_batch(examples, self.tokenizer.pad_token_id)

    def log_probs(self, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8) -> Tensor:
        """``log p(answer + end | prompt)`` per pair ``[N]`` (end: the template's end of turn, else EOS), summed over
        tokens (divide by the token count from :meth:`token_log_probs` for a per-token mean, ``exp(-mean)`` for
        perplexity)."""
        out = []
        for part in _batches(len(prompts), batch_size):
            batch = self.encode(prompts[part], answers[part])
            logits = self.logits(batch["input_ids"], batch["attention_mask"])
            out.append(sequence_logp(logits, batch["labels"].to(self.device))[0])
        return torch.cat(out)

    def token_log_probs(self, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 8) -> list[Tensor]:
        """Log-probability of each answer token (the end-of-turn or EOS token last), one 1-D tensor per pair."""
        out: list[Tensor] = []
        for part in _batches(len(prompts), batch_size):
            batch = self.encode(prompts[part], answers[part])
            logits = self.logits(batch["input_ids"], batch["attention_mask"])
            nll, mask = token_nll(logits, batch["labels"].to(self.device))
            out.extend(-row[keep] for row, keep in zip(nll, mask))
        return out

    # --- generation -----------------------------------------------------------------------------------------

    def prompt_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask, formatted as in training."""
        batch = left_pad([self.formatter.prompt_ids(q) for q in prompts], self.tokenizer.pad_token_id)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def generate_ids(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int = 200,
                     stop: StopFn | None = None) -> Tensor:
        """Greedy new tokens ``[B, n]`` for a LEFT-padded batch; a row ends at its first of :attr:`stop_ids`
        (kept) or when ``stop`` says so (see :func:`~lightning_unlearn.offset.generation.greedy_generate`), and is
        padded after it."""
        return self.combined.generate(input_ids.to(self.device), attention_mask.to(self.device),
                                      max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tokenizer.pad_token_id, stop=stop)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 200, batch_size: int = 8) -> list[str]:
        """Greedy answers to questions, cut at the stop token, decoded without special tokens and stripped (as TOFU
        scores them)."""
        texts: list[str] = []
        for part in _batches(len(prompts), batch_size):
            new = self.generate_ids(*self.prompt_batch(prompts[part]), max_new_tokens=max_new_tokens)
            texts.extend(decode_answers(self.tokenizer, new, self.stop_ids))
        return texts

    def extra_repr(self) -> str:
        c = self.composition
        if c.is_direct:
            return f"direct={c.offsets[0].path!r}"
        parts = ", ".join(f"{o.alpha:g}*{os.path.basename(o.path.rstrip('/')) or o.path}" for o in c.offsets)
        return f"large={c.large_model!r}, reference={c.reference_model!r}, offsets=[{parts}]"
