"""Greedy decoding over a weighted sum of causal LMs (offset unlearning).

Offset unlearning never materialises an unlearned model: next-token logits are
``z_L + alpha * (z_S - z_S0)``, i.e. a weighted sum of three models' logits.
Composed offsets generalise this to ``z_L + sum_i alpha_i * (z_S_i - z_S0)``.
Both are expressed here as a list of ``(component, weight)`` pairs.

Every component keeps its OWN key/value cache. Sharing one cache between the
models (as a public re-implementation does) makes each model attend to the
keys/values written by the others, which corrupts generations silently when
the architectures happen to match and crashes when they do not.

Callers are responsible for putting the models in eval mode (dropout would
otherwise make "greedy" decoding stochastic); nothing here flips train/eval
because the trainable small model is usually shared with a training loop.
"""

from __future__ import annotations

import functools
import inspect

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..numbers import finite

__all__ = [
    "CausalLMComponent",
    "ComponentFn",
    "StopFn",
    "LogitsComponent",
    "OffsetCausalLM",
    "combine_logits",
    "decode_answers",
    "greedy_generate",
    "offset_components",
    "position_ids_from_mask",
    "select_cache_rows",
]

ComponentFn = Callable[[Tensor, Tensor, Tensor, DynamicCache | None], Tensor]

StopFn = Callable[[Tensor], Tensor]
"""``new_tokens [B, n] -> bool [B]``: the rows to end now although no stop id came (e.g. their decoded text
reached a stop string, as lm-evaluation-harness's ``until``)."""
"""``(input_ids, attention_mask, position_ids, past_key_values) -> logits [B, T, V]``.

``attention_mask`` covers the cached tokens plus ``input_ids``; when
``past_key_values`` is given the callable must append to it (``use_cache=True``).
"""

Component = tuple[nn.Module | ComponentFn, float]


class LogitsComponent(nn.Module):
    """Base class for custom components (e.g. a LoRA model with its adapter disabled).

    Subclass and override :meth:`forward`; :meth:`new_cache` may be overridden
    when the cache needs the model config (sliding-window layers, offloading).
    """

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: DynamicCache | None,
    ) -> Tensor:
        raise NotImplementedError

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    def continues_cache(self) -> bool:
        """Whether a call with a cache and several new tokens returns logits at each of them (then
        :mod:`~lightning_unlearn.offset.prefix` can run shared prefixes once). Off unless a subclass says so."""
        return False

    def next_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache: DynamicCache) -> Tensor:
        """The logits of the last position only, ``[B, 1, V]``, appending every position to ``cache``: a decoding
        step or a prompt whose other logits nobody reads (a subclass may skip computing them)."""
        return self(input_ids, attention_mask, position_ids, cache)[:, -1:]


class CausalLMComponent(LogitsComponent):
    """Adapts a Hugging Face causal LM (its output's ``logits``) to :data:`ComponentFn`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past_key_values: DynamicCache | None,
    ) -> Tensor:
        return self._run(input_ids, attention_mask, position_ids, past_key_values)

    def new_cache(self) -> DynamicCache:
        config = getattr(self.model, "config", None)
        return DynamicCache(config=config) if config is not None else DynamicCache()

    def continues_cache(self) -> bool:
        return True

    def next_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache: DynamicCache) -> Tensor:
        """The forward with ``logits_to_keep=1`` where the model takes it: the output layer (a quarter or more of
        a small model's work per token, and ``[B, T, V]`` of memory for a prompt) runs on the last position only."""
        if not takes_logits_to_keep(self.model):
            return super().next_logits(input_ids, attention_mask, position_ids, cache)
        return self._run(input_ids, attention_mask, position_ids, cache, logits_to_keep=1)

    def _run(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache | None,
             **extra: int) -> Tensor:
        """The model's logits, appending to ``cache`` when one is given."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **{cache_keyword(self.model): cache}, use_cache=cache is not None, **extra).logits


@functools.cache
def _cache_keyword(forward_type: type) -> str:
    forward = forward_type.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@functools.cache
def _takes_logits_to_keep(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward can compute the logits of its last positions only (``logits_to_keep``,
    transformers 4.50 on; most causal LMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _takes_logits_to_keep(type(base))


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes a KV cache: ``cache`` from transformers 5.x on (which
    deprecates ``past_key_values`` with a warning at every call), ``past_key_values`` before. A peft model
    passes its keywords through to the model it wraps, so that model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword(type(base))


def as_component(model: nn.Module | ComponentFn) -> LogitsComponent | ComponentFn:
    """Plain ``nn.Module`` objects are taken to be HF causal LMs; everything else is used as is."""
    if isinstance(model, LogitsComponent) or not isinstance(model, nn.Module):
        return model
    return CausalLMComponent(model)


def next_logits(fn: LogitsComponent | ComponentFn, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                cache: object) -> Tensor:
    """``[B, 1, V]``: the last position's logits of a component's cached step (:meth:`LogitsComponent.next_logits`),
    or of a bare callable's whole output."""
    if isinstance(fn, LogitsComponent):
        return fn.next_logits(input_ids, attention_mask, position_ids, cache)
    return fn(input_ids, attention_mask, position_ids, cache)[:, -1:]


def _new_cache(fn: LogitsComponent | ComponentFn) -> DynamicCache:
    return fn.new_cache() if isinstance(fn, LogitsComponent) else DynamicCache()


def offset_components(
    large: nn.Module | ComponentFn,
    reference: nn.Module | ComponentFn,
    offsets: Sequence[tuple[nn.Module | ComponentFn, float]],
) -> list[Component]:
    """``z_L + sum_i alpha_i (z_S_i - z_S0)`` as components, calling the reference once.

    The reference terms are merged into a single weight ``-sum_i alpha_i`` so the
    (frozen) reference model runs once per step however many offsets are composed.
    """
    alphas = [finite(alpha, "alpha", f"offset {i} of {len(offsets)}") for i, (_, alpha) in enumerate(offsets)]
    return [(large, 1.0), *((small, alpha) for (small, _), alpha in zip(offsets, alphas)), (reference, -sum(alphas))]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, so a padded prompt sees the same RoPE phases as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def combine_logits(logits: Sequence[Tensor], weights: Sequence[float], vocab_size: int | None) -> Tensor:
    """``sum_k w_k * logits_k[..., :vocab_size]`` in float32.

    Families pad their embedding matrices to different sizes (multiples of 64,
    128, ...), so the rows past the shared tokenizer vocab are meaningless and
    must be dropped before summing. Without an explicit ``vocab_size`` the widths
    must agree: silently truncating to the smallest could hide mismatched
    tokenizers. Summation is in float32 because the offset ``z_S - z_S0`` is a
    small difference of large numbers and bf16 would round most of it away.
    """
    widths = {t.shape[-1] for t in logits}
    if vocab_size is None:
        if len(widths) != 1:
            raise ValueError(f"components have different vocab sizes {sorted(widths)}; pass vocab_size")
        vocab_size = widths.pop()
    elif vocab_size > min(widths):
        raise ValueError(f"vocab_size={vocab_size} exceeds a component's logits width {min(widths)}")
    total: Tensor | None = None
    for z, w in zip(logits, weights, strict=True):
        term = z[..., :vocab_size].float()
        if w != 1.0:  # the large (or a direct) model's weight: no pass over [B, T, V] for nothing
            term = term * w
        total = term if total is None else total + term
    if total is None:
        raise ValueError("at least one component is required")
    return total


def _eos_tensor(eos_token_id: int | Sequence[int], device: torch.device) -> Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def decode_answers(tokenizer: PreTrainedTokenizerBase, new_tokens: Tensor, stop_ids: Sequence[int]) -> list[str]:
    """Texts of generated answers ``[B, n]``, each cut before its first stop id and stripped.

    Cutting at the stop id (rather than relying on ``skip_special_tokens``) keeps an end-of-turn or
    ``generation_config`` stop that the tokenizer does not mark special, and anything generated after it,
    out of the text that ROUGE scores; special tokens inside the answer are dropped as before.
    """
    stops = set(int(i) for i in stop_ids)
    rows: list[list[int]] = []
    for row in new_tokens.tolist():
        end = next((k for k, token in enumerate(row) if token in stops), len(row))
        rows.append(row[:end])
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def _row_selector(cache: object) -> Callable[[Tensor], None] | None:
    """How to keep only some batch rows of ``cache`` in place, or ``None`` if it cannot: a list of caches
    (:class:`~lightning_unlearn.offset.filtered.CacheGroup`) through each of its caches, a Hugging Face cache by
    ``batch_select_indices``, any other by its ``select_rows`` (:class:`~lightning_unlearn.offset.sources.
    TokenHistory`)."""
    if isinstance(cache, list):
        inner = [_row_selector(c) for c in cache]
        if any(select is None for select in inner):
            return None

        def select_each(rows: Tensor) -> None:
            for select in inner:
                select(rows)  # type: ignore[misc]  # checked above

        return select_each
    for name in ("batch_select_indices", "select_rows"):
        if hasattr(cache, name):
            return getattr(cache, name)
    return None


def select_cache_rows(cache: object, rows: Tensor) -> None:
    """Keep only the batch rows ``rows`` (indices, in order; repeated indices repeat rows) of a KV cache, in place.

    Raises:
        TypeError: a cache whose rows cannot be selected (see :func:`_row_selector`).
    """
    select = _row_selector(cache)
    if select is None:
        raise TypeError(f"cannot drop rows from a cache of type {type(cache).__name__}")
    select(rows)


def greedy_generate(
    components: Sequence[Component],
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    vocab_size: int | None = None,
    stop: StopFn | None = None,
    drop_finished: bool = True,
    nonfinite: Tensor | None = None,
) -> Tensor:
    """Greedy decoding of ``argmax sum_k w_k z_k``; returns only the new tokens.

    ``input_ids``/``attention_mask`` are a LEFT-padded batch ``[B, T]`` (the last
    column must be a real token for every row, otherwise the next-token logits
    would be read off a pad). Each component is called with its own
    ``DynamicCache``. A sequence stops at its first id of ``eos_token_id`` (an int
    or every stop id of :func:`~lightning_unlearn.data.formatting.stop_token_ids`;
    kept in the output), or once ``stop`` (called after every step with the tokens so far of the whole
    batch, ``[B, n]``) says so; later positions hold ``pad_token_id``. The result is ``[B, n]`` with
    ``n <= max_new_tokens``: the loop ends once every sequence has finished.
    Models must already be in eval mode.

    With ``drop_finished`` (the default) a finished sequence leaves the batch: its rows are removed from every
    component's cache together (:func:`select_cache_rows`), so the caches stay in step and later steps cost
    only the sequences still running. Each row's computation does not depend on the other rows (attention is
    per row, the masks and positions are the row's own), so the tokens are those of decoding the full batch
    to the end; ``drop_finished=False``, or a cache whose rows cannot be selected, keeps every row to the end.

    ``nonfinite``, a bool ``[B]`` tensor, is set True in place for each sequence whose next-token logits were not
    all finite at some step (a NaN weight, an overflow): its tokens from there on are an ``argmax`` over NaN,
    text that means nothing, and a caller scoring them (ROUGE) must know. Checking costs one min/max pass over
    the ``[B, V]`` logits per step.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError("input_ids and attention_mask must both be [batch, seq_len]")
    if not bool(attention_mask[:, -1].bool().all()):
        raise ValueError("greedy_generate expects LEFT padding (attention_mask[:, -1] must be 1)")
    fns = [as_component(model) for model, _ in components]
    weights = [float(w) for _, w in components]
    batch = input_ids.shape[0]
    device = input_ids.device
    eos = _eos_tensor(eos_token_id, device)
    out = input_ids.new_full((batch, max_new_tokens), pad_token_id)
    steps = 0
    with torch.inference_mode():
        caches = [_new_cache(fn) for fn in fns]
        drop = drop_finished and all(_row_selector(c) is not None for c in caches)
        mask = attention_mask.long()
        step_ids = input_ids
        step_pos = position_ids_from_mask(mask)
        active = torch.arange(batch, device=device)  # the output row of each row still in the batch
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            last = [next_logits(fn, step_ids, mask, step_pos, cache)[:, -1, :] for fn, cache in zip(fns, caches)]
            combined = combine_logits(last, weights, vocab_size)
            if nonfinite is not None:
                low, high = torch.aminmax(combined, dim=-1)
                broken = ~(torch.isfinite(low) & torch.isfinite(high)) & ~finished
                nonfinite[active[broken].to(nonfinite.device)] = True
            token = combined.argmax(dim=-1)
            token = token.masked_fill(finished, pad_token_id)
            out[active, step] = token
            steps = step + 1
            finished |= torch.isin(token, eos)
            if stop is not None and not bool(finished.all()):
                finished |= stop(out[:, :steps]).to(device)[active]
            if bool(finished.all()):
                break
            if drop and bool(finished.any()):
                keep = (~finished).nonzero().squeeze(1)
                on_cpu = keep.cpu()  # CPU indices select rows on any device (a large model on its own GPU)
                for cache in caches:
                    select_cache_rows(cache, on_cpu)
                active, mask, step_pos, token = active[keep], mask[keep], step_pos[keep], token[keep]
                finished = finished[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = token[:, None]
    return out[:, :steps]


class OffsetCausalLM(nn.Module):
    """A weighted sum of any components, usable where one model is expected: the bare primitive.

    The unlearned model itself -- large model, reference, offsets with their alphas, the logit cache -- is
    :class:`~lightning_unlearn.offset.combined.CombinedModel`, which training, exports, lm-eval and ``generate`` all
    hold; this class sums whatever ``(component, weight)`` pairs it is given (tests, experiments).

    The components are registered as submodules so ``.to()``/``.eval()`` reach
    them; freezing (``requires_grad_(False)`` on the large and reference models)
    is left to the caller, as is eval mode before :meth:`generate`.
    """

    def __init__(self, components: Sequence[Component], vocab_size: int | None = None) -> None:
        super().__init__()
        if not components:
            raise ValueError("at least one component is required")
        fns = [as_component(model) for model, _ in components]
        self.components = nn.ModuleList(fn for fn in fns if isinstance(fn, nn.Module))
        self._fns: list[LogitsComponent | ComponentFn] = fns
        self.weights: list[float] = [finite(w, "weight", f"component {i} of the weighted sum")
                                     for i, (_, w) in enumerate(components)]
        self.vocab_size = vocab_size

    @classmethod
    def offset(
        cls,
        large: nn.Module | ComponentFn,
        small: nn.Module | ComponentFn,
        reference: nn.Module | ComponentFn,
        alpha: float = 1.0,
        vocab_size: int | None = None,
    ) -> OffsetCausalLM:
        """``z_L + alpha * (z_S - z_S0)``."""
        return cls([(large, 1.0), (small, alpha), (reference, -alpha)], vocab_size=vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Teacher-forced combined logits ``[B, T, V]`` in float32 (gradients flow)."""
        position_ids = position_ids_from_mask(attention_mask)
        logits = [fn(input_ids, attention_mask, position_ids, None) for fn in self._fns]
        return combine_logits(logits, self.weights, self.vocab_size)

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int],
        pad_token_id: int,
        stop: StopFn | None = None,
    ) -> Tensor:
        """New tokens only; see :func:`greedy_generate`."""
        return greedy_generate(
            list(zip(self._fns, self.weights)),
            input_ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            vocab_size=self.vocab_size,
            stop=stop,
        )
