"""What a training checkpoint holds: the trainable weights only, finite, and all of them when one is loaded.

The frozen models (the large model, the reference, WHP's reinforced model) are reloaded from their ids, unchanged,
so writing them would only make every checkpoint as large as all the models together; with LoRA only the adapter
trains, so only it is kept. Loading is not strict (the frozen weights are absent), so a checkpoint missing a
trainable weight would otherwise load silently into a half-initialised model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["check_trainable_keys", "prune_checkpoint", "trainable_keys"]


def trainable_keys(module: nn.Module, prefix: str = "model.", adapter_only: bool = False) -> set[str]:
    """State-dict keys a checkpoint must hold: those of ``module``'s submodule ``prefix`` (the trainable model), or
    with ``adapter_only`` (LoRA) its parameters that require a gradient."""
    if adapter_only:
        trained = getattr(module, prefix.rstrip("."))
        return {f"{prefix}{n}" for n, p in trained.named_parameters() if p.requires_grad}
    return {k for k in module.state_dict() if k.startswith(prefix)}


def prune_checkpoint(state: dict[str, Any], frozen_prefixes: Iterable[str], keep: set[str] | None = None) -> None:
    """Delete from ``state`` (in place) the keys of the frozen models and, when ``keep`` is given, every key not in
    it."""
    frozen = tuple(frozen_prefixes)
    for key in [k for k in state if k.startswith(frozen) or (keep is not None and k not in keep)]:
        del state[key]


def check_trainable_keys(state: dict[str, Any], expected: set[str]) -> None:
    """Refuse a checkpoint's ``state`` that lacks one of the ``expected`` trainable keys.

    Raises:
        KeyError: naming how many are missing and the first three.
    """
    missing = sorted(k for k in expected if k not in state)
    if missing:
        raise KeyError(f"The checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}: is it from "
                       "another model?")
