"""Building the combined model of a training run from its options: weights loaded, frozen, placed, LoRA attached.

:class:`~lightning_unlearn.offset.combined.CombinedModel` computes; it loads nothing, so that it can be tested
and used with models from anywhere. This module is where a run's options (``--model.small_model``, ``large_model``,
``lora_rank``, ``large_device``, ...) become one, for the training module's ``configure_model``; an export is
loaded by :mod:`lightning_unlearn.deploy.unlearned` into the same class. It also builds the frozen-logit cache a
run attaches to it, whose fingerprint names the models' files and the data settings the cached logits depend on.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..offset.combined import CombinedModel
from ..offset.logit_cache import FrozenLogitCache, model_fingerprint, tokenizer_fingerprint
from ..offset.sources import ServedLargeModel, check_served_tokenizer, is_served
from ..data.tokenizer import load_tokenizer
from .loading import check_same_tokenizer, freeze, load_causal_lm, resolve_dtype
from .lora import AdapterComponent, add_lora

__all__ = ["checked_tokenizer", "connect_served", "frozen_logit_cache", "load_large", "load_small", "training_combined"]


def connect_served(url: str, tokenizer: PreTrainedTokenizerBase, tokenizer_name: str,
                   top_k: int | None = None) -> ServedLargeModel:
    """The large model served at ``url`` as a logit source, once its tokenizer is checked against ``tokenizer``.

    Raises:
        ValueError: the server's tokenizer gives other ids or texts (:func:`~lightning_unlearn.offset.sources.
            check_served_tokenizer`).
    """
    served = ServedLargeModel(url, len(tokenizer), top_k)
    check_served_tokenizer(served.client, tokenizer, tokenizer_name)
    return served


def load_large(h: Mapping[str, Any]) -> PreTrainedModel:
    """The frozen large model of ``--model.large_model`` in ``large_dtype`` (placed later, by the combined model)."""
    return freeze(load_causal_lm(h["large_model"], h["large_dtype"], h.get("trust_remote_code", False),
                                 "--model.large_model"))


def load_small(h: Mapping[str, Any], frozen: bool = False) -> PreTrainedModel:
    """The small model of ``--model.small_model`` in ``small_dtype`` (frozen if asked)."""
    model = load_causal_lm(h["small_model"], h["small_dtype"], h.get("trust_remote_code", False),
                           "--model.small_model")
    return freeze(model) if frozen else model


def training_combined(h: Mapping[str, Any], vocab_size: int, alpha: float, with_reference: bool,
                      large: ServedLargeModel | None = None, cls: type[CombinedModel] = CombinedModel,
                      **extra: Any) -> CombinedModel:
    """The combined model a run trains: ``S`` (the small model, or with ``lora_rank`` a LoRA adapter on it) over
    ``L`` (``large_model``: loaded here, or ``large`` when served) and ``S0``.

    The reference is a frozen copy of the small model in offset mode or when ``with_reference`` (a loss reads
    reference logits in direct mode); with LoRA it is the same model with its adapter off, no copy. ``S`` is in
    training mode, with gradient checkpointing when ``gradient_checkpointing``.

    Args:
        h: the module's options (``small_model``, ``large_model``, dtypes, ``lora_*``, ``large_device``, ...).
        vocab_size: the shared tokenizer's vocabulary.
        alpha: the offset strength.
        with_reference: load the reference in direct mode too.
        large: the served large model (:func:`connect_served`), when ``large_model`` is an address.
        cls, extra: the combined model's class and its further arguments (a method's own, e.g. WHP's).
    """
    small = load_small(h)
    reference: torch.nn.Module | None = None
    lora = h.get("lora_rank") is not None
    if lora:  # the reference is ``small`` itself with the adapter disabled: no copy
        small = add_lora(small, h["lora_rank"], h.get("lora_alpha"), h.get("lora_dropout", 0.0),
                         h["lora_target_modules"], h["small_model"])
        reference = AdapterComponent(small, None)
    elif h.get("large_model") is not None or with_reference:
        reference = freeze(copy.deepcopy(small))
    if h.get("large_model") is not None and not is_served(h["large_model"]):
        large = load_large(h)
    small.train()
    if h.get("gradient_checkpointing"):
        # Non-reentrant: with reentrant checkpointing no gradient reaches adapters behind frozen layers.
        small.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False} if lora else None)
    local = large is not None and not is_served(h["large_model"])
    return cls([small], [alpha], large=large, reference=reference, vocab_size=vocab_size,
               large_device=h.get("large_device") if local else None, **extra)


def frozen_logit_cache(combined: CombinedModel, h: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                       rank: int, data: Mapping[str, Any]) -> FrozenLogitCache | None:
    """The cache of the frozen logits ``--model.logit_cache`` asks for (``None``: off, or nothing frozen to cache).

    A disk cache lives in ``logit_cache_dir/rank{rank}`` and carries a fingerprint of everything the logits depend
    on (alpha is not: ``z_L`` and ``z_S0`` are stored): local models' files by content (their digests memoised in
    ``logit_cache_dir``), a served model by its name, context length and top-k (its probe log-probabilities are
    compared apart, within a tolerance), the tokenizer and the data settings of ``data`` (``max_length``,
    ``template``, ``use_chat_template``). A memory cache lives for this run only: nothing to check it against.
    """
    if h.get("logit_cache") is None or combined.reference is None and combined.is_direct:
        return None
    disk = h["logit_cache"] == "disk"
    directory = os.path.join(h["logit_cache_dir"], f"rank{rank}") if disk else None
    fingerprint = probes = None
    if disk:
        memo = os.path.join(h["logit_cache_dir"], "file_digests.json")
        large = combined.large
        fingerprint = {
            "reference": model_fingerprint(h["small_model"], combined.trainable, h["small_dtype"], memo),
            "large": (large.fingerprint() if isinstance(large, ServedLargeModel)
                      else model_fingerprint(h["large_model"], large, h["large_dtype"], memo)
                      if large is not None else None),
            "vocab": tokenizer_fingerprint(tokenizer),
            "data": {k: data.get(k) for k in ("max_length", "template", "use_chat_template")},
        }
        probes = {"large": combined.large.probe()} if isinstance(combined.large, ServedLargeModel) else None
    return FrozenLogitCache(combined.cache_names(), combined.vocab_size, h["logit_cache"], directory,
                            resolve_dtype(h.get("logit_cache_dtype", "float16")), fingerprint, probes)


def checked_tokenizer(h: Mapping[str, Any]) -> tuple[PreTrainedTokenizerBase, ServedLargeModel | None]:
    """The run's tokenizer (``tokenizer``, else the small model's), checked against the large model's: a local large
    model's tokenizer must be the same, a served one must tokenize alike (then it is returned connected).

    Raises:
        ValueError: the tokenizers differ (naming both).
    """
    name = h.get("tokenizer") or h["small_model"]
    tokenizer = load_tokenizer(name, h.get("trust_remote_code", False))
    large = h.get("large_model")
    if is_served(large):
        return tokenizer, connect_served(large, tokenizer, name, h.get("large_logprobs"))
    if large is not None:
        check_same_tokenizer(load_tokenizer(large, h.get("trust_remote_code", False)), tokenizer, large, name)
    return tokenizer, None
