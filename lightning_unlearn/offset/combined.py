"""The unlearned model as one ``nn.Module``: ``z = z_L + sum_i alpha_i (z_S_i - z_S0)``, or ``z_S`` alone.

Offset unlearning never materialises its model: every logit is a weighted sum of a frozen large model ``L``, one
or several small offsets ``S_i`` and the frozen small reference ``S0`` they were trained from (delta-unlearning,
Huang et al., TMLR 2025); a directly unlearned model is ``S`` alone. :class:`CombinedModel` owns those parts --
the large model (local, on its own device, or served: any :class:`~.generation.LogitsComponent`), the reference
(a frozen copy, or a LoRA model with its adapter off, given as a component), the offsets with their alphas, and
the frozen-logit cache -- and answers every question asked of the unlearned model, the same way everywhere:

* teacher-forced logits (:meth:`CombinedModel.forward`, :meth:`~CombinedModel.logits_and_reference` with the
  reference's or large model's logits a loss needs, read from the cache when asked);
* the per-model components with weights (:meth:`~CombinedModel.components`), each with its own KV cache, for
  greedy decoding (:meth:`~CombinedModel.generate`) and shared-prefix scoring (:attr:`~CombinedModel.
  continuation_fn`);
* the frozen logits alone (:meth:`~CombinedModel.frozen_logits`), which the cache stores.

The training module, the exported model (:class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel`), the
lm-eval wrapper and the ``generate`` command all hold one, so what training measured is what an export answers.
A method that combines logits otherwise supplies a subclass: ULD's filter (:class:`~.filtered.FilteredCombined`),
EUL's unlearning layers and WHP's reinforced model (in their modules). Building one (loading weights, LoRA,
placement) is left to :mod:`lightning_unlearn.models.build` and :mod:`lightning_unlearn.deploy.unlearned`, the
layers that load models.

Frozen parts (the large model, a reference that is not an adapter of an offset) stay in eval mode whatever
:meth:`~CombinedModel.train` is told: dropout in ``z_L`` or ``z_S0`` would add noise to every offset.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..numbers import finite
from transformers import PreTrainedTokenizerBase

from .generation import (ComponentFn, LogitsComponent, StopFn, as_component, combine_logits, decode_answers,
                         greedy_generate, offset_components)
from .logit_cache import FrozenLogitCache
from .logits import cached_offset_logits, offset_logits
from .placement import DeviceComponent
from .prefix import continuation_logits, supports_continuation

__all__ = ["CombinedModel", "Source"]

Source = nn.Module | ComponentFn
"""A model whose logits the combination reads: a Hugging Face causal LM, or a :class:`~.generation.LogitsComponent`
(a served model, a LoRA model with its adapter off, ...)."""

ContinuationFn = Callable[..., object]


def _shares_weights(module: Source | None, others: Sequence[Source]) -> bool:
    """Whether ``module`` holds a parameter of one of ``others`` (a LoRA reference is its offset's base model)."""
    if not isinstance(module, nn.Module):
        return False
    own = {id(p) for p in module.parameters()}
    return any(id(p) in own for other in others if isinstance(other, nn.Module) for p in other.parameters())


class CombinedModel(nn.Module):
    """``z_L + sum_i alpha_i (z_S_i - z_S0)`` (offset) or ``z_S`` (direct, ``large`` None), float32, over the
    tokenizer's vocabulary.

    Args:
        offsets: the small models ``S_i`` (Hugging Face causal LMs, peft models or components); in direct mode the
            one model being unlearned. The first is the one a training module trains.
        alphas: one strength per offset (finite; ``None``: 1 each). Unused in direct mode.
        large: the frozen large model ``L`` (a causal LM, or a component such as a served model); ``None``: direct.
        reference: the frozen reference ``S0`` (a copy, or a component over an offset's base weights); in direct
            mode optional, read only by losses that need reference logits.
        vocab_size: the shared tokenizer's ``V``; every model's logits are cut to it (families pad embeddings).
        large_device: run a local large model there (inputs moved to it, logits back); it is then not registered,
            so that moving the combined model leaves it where it is.

    Raises:
        ValueError: no offset, a count of alphas that is not one per offset, a non-finite alpha, or several
            offsets without a large model.
    """

    def __init__(self, offsets: Sequence[Source], alphas: Sequence[float] | None = None, *,
                 large: Source | None = None, reference: Source | None = None, vocab_size: int,
                 large_device: str | torch.device | None = None) -> None:
        super().__init__()
        if not offsets:
            raise ValueError("a combined model needs at least one small model.")
        if large is None and len(offsets) > 1:
            raise ValueError(f"{len(offsets)} offsets without a large model: offsets compose on a large model only.")
        self.offsets = nn.ModuleList(o for o in offsets if isinstance(o, nn.Module))
        self._offset_fns = [as_component(o) for o in offsets]
        self.alphas = [1.0] * len(offsets) if alphas is None else list(alphas)
        self.vocab_size = int(vocab_size)
        self.large_device = None if large_device is None else str(large_device)
        # The wrappers below (components) hold the models registered here; set as plain attributes, so that they
        # add no second name for any weight (state_dict, .to()).
        if large_device is not None and isinstance(large, nn.Module) and not isinstance(large, LogitsComponent):
            object.__setattr__(self, "large", large.to(large_device))  # unregistered: .to() leaves it there
            object.__setattr__(self, "_large_fn", DeviceComponent(large, large_device))
        else:
            self.large = large
            object.__setattr__(self, "_large_fn", as_component(large) if large is not None else None)
        if _shares_weights(reference, offsets):  # registered once, as an offset
            object.__setattr__(self, "reference", reference)
        else:
            self.reference = reference
        object.__setattr__(self, "_reference_fn", as_component(reference) if reference is not None else None)
        self._cache: FrozenLogitCache | None = None
        self._cache_factory: Callable[[], FrozenLogitCache | None] | None = None

    # --- the frozen-logit cache -----------------------------------------------------------------------------

    def attach_cache(self, cache: FrozenLogitCache | Callable[[], FrozenLogitCache | None] | None) -> None:
        """Read the frozen logits of training sequences from ``cache`` (:mod:`.logit_cache`), or from the cache
        ``cache()`` builds on first use (a disk cache's fingerprint reads the models' files: only a run that
        trains should pay for it); ``None`` detaches (and closes) it."""
        self.close_cache()
        if cache is None or isinstance(cache, FrozenLogitCache):
            self._cache, self._cache_factory = cache, None
        else:
            self._cache_factory = cache

    @property
    def cache(self) -> FrozenLogitCache | None:
        """The attached frozen-logit cache (built now if it was attached as a factory), or ``None``."""
        if self._cache is None and self._cache_factory is not None:
            self._cache = self._cache_factory()
        return self._cache

    def close_cache(self) -> None:
        """Close a disk cache's files (their contents stay for a later run) or free a memory cache; a factory
        stays attached and builds a fresh cache on the next use."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    # --- what it is -----------------------------------------------------------------------------------------

    @property
    def alphas(self) -> list[float]:
        """One strength per offset; setting refuses a non-finite value or another count (``ValueError``)."""
        return list(self._alphas)

    @alphas.setter
    def alphas(self, values: Sequence[float]) -> None:
        count = len(self._offset_fns)
        if len(values) != count:
            raise ValueError(f"{len(values)} alphas for {count} offsets: give one alpha per offset.")
        self._alphas = [finite(a, "alpha", f"offset {i} of {count}") for i, a in enumerate(values)]

    @property
    def is_direct(self) -> bool:
        """Whether this is a directly unlearned model ``z_S`` (no large model)."""
        return self._large_fn is None

    @property
    def trainable(self) -> nn.Module:
        """The first offset: what a training module trains."""
        return self.offsets[0]

    def frozen_models(self) -> list[nn.Module]:
        """The models that never train: the large model and a reference of its own (not an adapter's base)."""
        return [m for m in (self.large, self.reference) if isinstance(m, nn.Module)
                and not _shares_weights(m, list(self.offsets))]

    def cache_names(self) -> list[str]:
        """What :meth:`frozen_logits` returns, in order: ``["large", "reference"]`` or ``["reference"]``."""
        return ["reference"] if self.is_direct else ["large", "reference"]

    def train(self, mode: bool = True) -> CombinedModel:
        """Set the offsets' mode; the frozen models stay in eval mode (no dropout in ``z_L`` or ``z_S0``)."""
        super().train(mode)
        for model in self.frozen_models():
            model.eval()
        return self

    # --- teacher-forced logits ------------------------------------------------------------------------------

    def _run(self, fn: LogitsComponent | ComponentFn, input_ids: Tensor, attention_mask: Tensor,
             position_ids: Tensor | None) -> Tensor:
        """One model's logits ``[B, T, V]`` cut to the vocabulary, in its own dtype, on the inputs' device."""
        logits = fn(input_ids, attention_mask, position_ids, None)
        if logits.shape[-1] != self.vocab_size:  # no view when nothing is cut off: the offset reuses the memory
            logits = logits[..., : self.vocab_size]
        return logits.to(input_ids.device)

    def offset_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                      ) -> list[Tensor]:
        """``[z_S_i]``, float32 ``[B, T, V]`` each, with gradients where the offsets train."""
        return [self._run(fn, input_ids, attention_mask, position_ids).float() for fn in self._offset_fns]

    @torch.no_grad()
    def large_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """``z_L`` in the large model's dtype (a served model's log-probabilities, which act as logits), on the
        inputs' device. Raises ``ValueError`` in direct mode."""
        if self._large_fn is None:
            raise ValueError("a direct model has no large model.")
        return self._run(self._large_fn, input_ids, attention_mask, position_ids)

    @torch.no_grad()
    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                         ) -> Tensor:
        """``z_S0``, float32 (a LoRA reference runs with its adapter off, in eval mode). Raises ``ValueError``
        without a reference."""
        if self._reference_fn is None:
            raise ValueError("this combined model has no reference model.")
        return self._run(self._reference_fn, input_ids, attention_mask, position_ids).float()

    def frozen_logits(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """``[z_L, z_S0]`` (offset) or ``[z_S0]`` (direct), computed by the models (what the cache stores)."""
        ref = self.reference_logits(input_ids, attention_mask)
        return [ref] if self.is_direct else [self.large_logits(input_ids, attention_mask), ref]

    def frozen_parts(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool | None = None) -> list[Tensor]:
        """:meth:`frozen_logits`, read from :attr:`cache` (computed and stored on a miss) when ``use_cache`` (``None``:
        in training mode; evaluation always computes them) and a cache is attached; ``z_L`` in the large model's
        dtype, or as the cache stores it."""
        if not (self.training if use_cache is None else use_cache) or self.cache is None:
            return self.frozen_logits(input_ids, attention_mask)
        return self.cache.get(input_ids, attention_mask, self.frozen_logits)

    def logits_and_reference(self, input_ids: Tensor, attention_mask: Tensor, with_reference: bool = False,
                             use_cache: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """The combined logits ``[B, T, V]`` float32 and, if asked, the reference logits a loss compares with
        (``z_L`` in offset mode: the model before unlearning; ``z_S0`` in direct mode); every model runs once.

        ``use_cache``: read the frozen logits from :attr:`cache` (``None``: in training mode). With one offset and no reference
        asked, the offset is built from the cache's stored rows without assembling ``z_L``
        (:func:`~.logits.cached_offset_logits`); otherwise in the reference's memory (:func:`~.logits.
        offset_logits`); several offsets are summed in float32 (:func:`~.generation.combine_logits`).
        """
        z_small = self.offset_logits(input_ids, attention_mask)
        if self.is_direct:
            ref = self.frozen_parts(input_ids, attention_mask, use_cache)[0].float() if with_reference else None
            return z_small[0], ref
        if use_cache is None:
            use_cache = self.training
        if use_cache and self.cache is not None and not with_reference and len(z_small) == 1:
            rows = self.cache.rows(input_ids, attention_mask, self.frozen_logits)
            return cached_offset_logits(z_small[0], rows, attention_mask, self._alphas[0]), None
        z_large, z_ref = (z.float() for z in self.frozen_parts(input_ids, attention_mask, use_cache))
        if len(z_small) == 1:
            return offset_logits(z_small[0], z_large, z_ref, self._alphas[0]), z_large if with_reference else None
        z = combine_logits([z_large, *z_small, z_ref], [1.0, *self._alphas, -sum(self._alphas)], self.vocab_size)
        return z, z_large if with_reference else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Combined logits ``[B, T, V]`` float32 (gradients flow to the offsets). ``position_ids`` (``[B, T]``,
        e.g. :func:`~.generation.position_ids_from_mask` for left padding) go to every model; ``None`` lets each
        number the positions itself, as in training."""
        if position_ids is None:
            return self.logits_and_reference(input_ids, attention_mask)[0]
        logits = [self._run(fn, input_ids, attention_mask, position_ids) for fn, _ in self._weighted()]
        return combine_logits(logits, [w for _, w in self._weighted()], self.vocab_size)

    # --- components: decoding and shared prefixes -----------------------------------------------------------

    def _weighted(self) -> list[tuple[LogitsComponent | ComponentFn, float]]:
        if self.is_direct:
            return [(self._offset_fns[0], 1.0)]
        return offset_components(self._large_fn, self._reference_fn, list(zip(self._offset_fns, self._alphas)))

    def components(self) -> list[tuple[LogitsComponent | ComponentFn, float]]:
        """``(component, weight)`` pairs whose weighted logits sum to this model's, each run with its own KV cache:
        ``[(S, 1)]`` direct, ``[(L, 1), (S_i, alpha_i)..., (S0, -sum alpha_i)]`` offset (the reference once)."""
        return self._weighted()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int], pad_token_id: int, stop: StopFn | None = None,
                 nonfinite: Tensor | None = None) -> Tensor:
        """Greedy new tokens ``[B, n]`` of a LEFT-padded batch over the tokenizer's vocabulary, one KV cache per
        model (:func:`~.generation.greedy_generate`, which documents ``stop`` and ``nonfinite``). The models must be
        in eval mode."""
        return greedy_generate(self.components(), input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=self.vocab_size,
                               stop=stop, nonfinite=nonfinite)

    def generate_texts(self, input_ids: Tensor, attention_mask: Tensor, tokenizer: PreTrainedTokenizerBase,
                       stop_ids: Sequence[int], max_new_tokens: int) -> list[str | None]:
        """Greedy answers of a LEFT-padded batch as texts, each cut at its first of ``stop_ids`` and stripped
        (:func:`~.generation.decode_answers`); ``None`` where the generation read non-finite logits: its tokens are
        an argmax over NaN, and a caller scoring texts (ROUGE) must score it NaN instead."""
        nonfinite = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        new = self.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                            pad_token_id=pad, nonfinite=nonfinite)
        texts = decode_answers(tokenizer, new, stop_ids)
        return [None if bad else text for text, bad in zip(texts, nonfinite.tolist())]

    @property
    def continuation_fn(self) -> ContinuationFn | None:
        """Teacher-forced scoring that runs a prefix shared by several rows once (:func:`~.prefix.
        continuation_logits`), as the evaluation uses it; ``None`` in training mode (dropout: not equal to
        :meth:`forward`) or with a component that cannot continue a cache over several tokens (a served model)."""
        if self.training:
            return None
        components = self.components()
        if not all(supports_continuation(as_component(model)) for model, _ in components):
            return None
        return functools.partial(continuation_logits, components, vocab_size=self.vocab_size)

    def extra_repr(self) -> str:
        return "direct" if self.is_direct else f"alphas={self._alphas}, vocab_size={self.vocab_size}"
