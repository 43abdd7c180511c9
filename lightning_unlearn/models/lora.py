"""LoRA for the trainable small model: ``S = S0 + B A``, and ``S0`` is the same weights with the adapter off.

Offset unlearning needs the frozen reference ``S0`` next to the trainable ``S``. When ``S`` is ``S0`` plus a
LoRA adapter (peft), the reference logits come from the *same* model with its adapter disabled, so only
one copy of the small weights is in memory (and in a checkpoint or an export, only the adapter is).
peft initialises ``B`` to zero, so ``S`` equals ``S0`` exactly at the start: the combined model is still
exactly the large model at step 0.

Two peft behaviours are worked around here rather than left to callers:

* enabling adapters again after ``disable_adapter()`` (and ``set_adapter``) sets ``requires_grad=True`` on
  the active adapter, which would unfreeze an adapter loaded for inference; :func:`reference_mode`
  restores every flag it found;
* the reference must run without dropout whatever mode the trainable model is in, as a separate frozen
  copy would (it is kept in eval mode); :func:`reference_mode` switches to eval mode and back.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from ..offset.generation import LogitsComponent, cache_keyword, takes_logits_to_keep
from ..numbers import finite, in_range
from .files import ADAPTER_CONFIG, check_adapter_files

if TYPE_CHECKING:  # peft is imported where an adapter is made or loaded: most runs have none
    from peft import PeftModel

__all__ = ["AdapterComponent", "add_lora", "adapter_base_model", "attach_adapters", "reference_mode"]

DEFAULT_TARGETS = "all-linear"


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """Hide the FutureWarning peft triggers by reading ``is_gradient_checkpointing`` (deprecated in transformers 5)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(
    model: PreTrainedModel,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    base_model_name: str | None = None,
) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter's parameters require gradients.

    ``alpha`` defaults to ``2 * rank`` (peft scales the update by ``alpha / rank``, so the scale stays 2
    whatever the rank). ``all-linear`` targets every linear layer of the decoder but not the output
    head. ``base_model_name`` is written into the adapter's config, which is how a saved adapter names
    the model it applies to (made absolute for local folders, so the export can be loaded from anywhere).
    """
    if rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {rank}.")
    if alpha is not None:  # peft scales the update by alpha / rank: a NaN makes every adapted layer NaN, even at B = 0
        finite(alpha, "lora_alpha", "--model.lora_alpha")
    in_range(dropout, "lora_dropout", 0.0, 1.0, "--model.lora_dropout")
    from peft import LoraConfig, get_peft_model
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                        lora_dropout=dropout, target_modules=targets)
    with _quiet_peft():
        peft_model = get_peft_model(model, config)
    if base_model_name is not None:
        local = os.path.isdir(base_model_name)
        peft_model.peft_config["default"].base_model_name_or_path = (
            os.path.abspath(base_model_name) if local else base_model_name)
    return peft_model


@contextmanager
def reference_mode(model: PeftModel) -> Iterator[PeftModel]:
    """Run ``model`` as its base model: adapters off, eval mode; flags and mode restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with _quiet_peft(), model.disable_adapter():
            yield model
    finally:
        if was_training:
            model.train()
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


class AdapterComponent(LogitsComponent):
    """A generation component over a peft model: one named adapter, or none (the base model).

    Several components may share one peft model (the reference and every composed offset): each call
    selects its adapter first, so components can be called one after the other at every decoding step,
    each with its own KV cache.
    """

    def __init__(self, model: PeftModel, adapter: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_key_values: DynamicCache | None
    ) -> Tensor:
        return self._run(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **{cache_keyword(self.model): past_key_values}, use_cache=past_key_values is not None)

    def next_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache: DynamicCache) -> Tensor:
        """The last position's logits ``[B, 1, V]`` (``logits_to_keep=1`` where the base model takes it)."""
        if not takes_logits_to_keep(self.model):
            return super().next_logits(input_ids, attention_mask, position_ids, cache)
        return self._run(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **{cache_keyword(self.model): cache}, use_cache=True, logits_to_keep=1)

    def _run(self, **kwargs: Any) -> Tensor:
        """The peft model's logits with this component's adapter, or with none."""
        if self.adapter is None:
            with reference_mode(self.model):
                return self.model(**kwargs).logits
        if self.model.active_adapter != self.adapter:
            self.model.set_adapter(self.adapter, inference_mode=True)
        return self.model(**kwargs).logits

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def continues_cache(self) -> bool:
        return True


def adapter_base_model(path: str | os.PathLike) -> str:
    """The model a saved adapter applies to, as recorded in its ``adapter_config.json``.

    Raises:
        FileNotFoundError: the adapter's config or weights are missing (named).
        ValueError: the config names no base model.
    """
    check_adapter_files(path)
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(path) / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path).")
    return base


def attach_adapters(base: nn.Module, adapters: Mapping[str, str | os.PathLike]) -> PeftModel:
    """Load saved adapters (name -> directory) onto one base model, all frozen; none is left active-trainable.

    The base weights are shared by every adapter and by the base model itself (through
    :class:`AdapterComponent` with no adapter), so composing ``n`` LoRA offsets costs one small model.
    """
    if not adapters:
        raise ValueError("Give at least one adapter directory.")
    for path in adapters.values():  # peft reports a missing weight file as an invalid hub repo id
        check_adapter_files(path)
    from peft import PeftModel
    items = list(adapters.items())
    name, path = items[0]
    with _quiet_peft():
        model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
        for name, path in items[1:]:
            model.load_adapter(str(path), adapter_name=name)
    model.set_adapter(items[0][0], inference_mode=True)
    model.requires_grad_(False)
    return model.eval()

