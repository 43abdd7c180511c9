"""Offsets applied through the large model's relative-top filter, as one generation component (ULD).

ULD (Ji et al. 2024) unlearns with ``z_L - w * z_A`` where the assistant ``A`` remembers the forget data, and
subtracts only on the tokens the large model finds plausible (:func:`~lightning_unlearn.losses.logit_arithmetic.
relative_top_mask`); elsewhere the large model's logits stand. That is the offset formula of this framework with
a filter and without a reference:

    z = z_L + keep(z_L) * sum_i alpha_i (z_S_i - z_S0),    ULD: S_i = A, alpha = -w, z_S0 = 0

The filter is not linear in the components, so the weighted sum of :func:`~.generation.greedy_generate` cannot
express it; :class:`FilteredOffset` is one component holding the large model, the offsets and the optional
reference, each with its own KV cache (:class:`CacheGroup`), and returns the filtered sum. With
``relative_top = 0`` and a reference it is the plain offset. :class:`FilteredCombined` is ULD's combined model
(:mod:`.combined`): teacher-forced logits, decoding and scoring through that one component.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from transformers import DynamicCache

from ..losses.logit_arithmetic import filtered_offset
from ..numbers import finite, in_range
from .combined import CombinedModel
from .generation import ComponentFn, LogitsComponent, as_component, next_logits

__all__ = ["CacheGroup", "FilteredCombined", "FilteredOffset"]


class CacheGroup(list):
    """One KV cache per model of a :class:`FilteredOffset`, passed through the generation loop as its cache."""


class FilteredOffset(LogitsComponent):
    """``z_L + keep(z_L) * (sum_i alpha_i z_S_i - (sum_i alpha_i) z_S0)`` as a generation component.

    Args:
        large: the large (target) model or component.
        offsets: ``(model, alpha)`` pairs, the trained small models and their strengths.
        reference: the frozen reference ``S0``; ``None``: no reference term (ULD).
        relative_top: ``tau`` of the relative-top filter on ``z_L``; ``0`` keeps every token.
        vocab_size: the shared tokenizer's vocabulary; logits are cut to it before filtering (an embedding padded
            past it would otherwise change the softmax the filter reads).
    """

    def __init__(
        self,
        large: nn.Module | ComponentFn,
        offsets: Sequence[tuple[nn.Module | ComponentFn, float]],
        reference: nn.Module | ComponentFn | None,
        relative_top: float,
        vocab_size: int,
    ) -> None:
        super().__init__()
        if not offsets:
            raise ValueError("FilteredOffset needs at least one offset model.")
        self.weights = [finite(alpha, "alpha", f"offset {i} of {len(offsets)}") for i, (_, alpha) in enumerate(offsets)]
        parts = [large, *(model for model, _ in offsets)]
        if reference is not None:
            parts.append(reference)
            self.weights.append(-sum(self.weights))
        self._fns = [as_component(p) for p in parts]
        self.parts = nn.ModuleList(fn for fn in self._fns if isinstance(fn, nn.Module))
        self.relative_top = in_range(relative_top, "relative_top", 0.0, 1.0)
        self.vocab_size = vocab_size

    def continues_cache(self) -> bool:
        """Its parts' caches continue over several tokens when every part's does."""
        return all(isinstance(fn, LogitsComponent) and fn.continues_cache() for fn in self._fns)

    def new_cache(self) -> CacheGroup:
        return CacheGroup(fn.new_cache() if isinstance(fn, LogitsComponent) else DynamicCache() for fn in self._fns)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_key_values: CacheGroup | None
    ) -> Tensor:
        """Filtered offset logits ``[B, T, V]`` float32 (``V`` = ``vocab_size``)."""
        caches = past_key_values if past_key_values is not None else [None] * len(self._fns)
        return self._filtered([fn(input_ids, attention_mask, position_ids, cache)
                               for fn, cache in zip(self._fns, caches)])

    def next_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache: CacheGroup) -> Tensor:
        """The filtered offset at the last position, ``[B, 1, V]``, from each part's last-position logits (the
        filter reads each position alone)."""
        return self._filtered([next_logits(fn, input_ids, attention_mask, position_ids, part)
                               for fn, part in zip(self._fns, cache)])

    def _filtered(self, logits: list[Tensor]) -> Tensor:
        logits = [z[..., : self.vocab_size] for z in logits]
        delta = sum(w * z.float() for w, z in zip(self.weights, logits[1:]))
        return filtered_offset(logits[0], delta, self.relative_top)


class FilteredCombined(CombinedModel):
    """The combined model of ULD: ``z_L + keep(z_L) * sum_i alpha_i (z_S_i - z_S0)``, ``z_S0 = 0`` without a
    reference; the same questions answered as :class:`~.combined.CombinedModel` (teacher-forced logits, one
    component for decoding and shared prefixes).

    Args:
        relative_top: ``tau`` of the relative-top filter on ``z_L`` (in ``[0, 1]``; 0 keeps every token).
        others: as :class:`~.combined.CombinedModel`; ``large`` is required, ``reference`` optional.

    Raises:
        ValueError: no large model, or ``relative_top`` outside ``[0, 1]``.
    """

    def __init__(self, offsets: Sequence[nn.Module | ComponentFn], alphas: Sequence[float] | None = None, *,
                 large: nn.Module | ComponentFn | None = None, reference: nn.Module | ComponentFn | None = None,
                 vocab_size: int, relative_top: float, large_device: str | None = None) -> None:
        if large is None:
            raise ValueError("a filtered offset needs the large model whose distribution the filter reads.")
        super().__init__(offsets, alphas, large=large, reference=reference, vocab_size=vocab_size,
                         large_device=large_device)
        self.relative_top = in_range(relative_top, "relative_top", 0.0, 1.0)

    def logits_and_reference(self, input_ids: Tensor, attention_mask: Tensor, with_reference: bool = False,
                             use_cache: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """The filtered logits (float32) and, if asked, ``z_L``; the frozen logits are always computed (ULD trains
        its assistant alone, so there is nothing to cache)."""
        z_large = self.large_logits(input_ids, attention_mask).float()
        delta = sum(alpha * z for alpha, z in zip(self.alphas, self.offset_logits(input_ids, attention_mask)))
        if self._reference_fn is not None:
            delta = delta - sum(self.alphas) * self.reference_logits(input_ids, attention_mask)
        return filtered_offset(z_large, delta, self.relative_top), z_large if with_reference else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Filtered logits ``[B, T, V]`` float32; ``position_ids`` as :meth:`.CombinedModel.forward`."""
        if position_ids is None:
            return self.logits_and_reference(input_ids, attention_mask)[0]
        (component, _), = self.components()
        return component(input_ids, attention_mask, position_ids, None)

    def components(self) -> list[tuple[LogitsComponent, float]]:
        """One component, :class:`FilteredOffset` (the filter is not a weighted sum), with a cache per model."""
        offsets = list(zip(self._offset_fns, self.alphas))
        return [(FilteredOffset(self._large_fn, offsets, self._reference_fn, self.relative_top, self.vocab_size), 1.0)]

    @property
    def continuation_fn(self) -> None:
        """``None``: the evaluation scores whole rows through :meth:`forward` (as before the combined model)."""
        return None
