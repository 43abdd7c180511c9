"""The relearning attack: a few fine-tuning steps on a small part of the forget set, by what the attacker can change.

Relearning (Hu et al. 2024, "Jogging the Memory of Unlearned LLMs", arXiv:2406.13356; Lynch et al. 2024) asks
whether the knowledge was removed or only hidden: if a handful of steps on some forget answers brings back the
*other* forget answers, the weights still held them. Targets:

* ``direct``: the unlearned model itself (all its weights) on its own NLL.
* ``offset``: the small offset model ``S`` alone, on its own NLL (an attacker who holds the released offset and
  fine-tunes it as an ordinary small model); the large model and the reference are untouched, and the attacked
  model is ``z_L + alpha (z_S' - z_S0)``.
* ``combined``: ``S`` again, but on the NLL of the combined logits (an attacker who fine-tunes the deployed offset
  model through its only trainable part).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..deploy.unlearned import UnlearnedModel
from ..metrics import functional as F

__all__ = ["TARGETS", "relearn", "trainable_part"]

TARGETS = ("direct", "offset", "combined")


def trainable_part(model: UnlearnedModel) -> nn.Module:
    """What the attacker can change: the direct model, or the offset's small model ``S`` (never ``L`` or ``S0``).

    Raises:
        ValueError: several composed offsets (which one the attacker holds is not defined), or a LoRA offset that
            shares its weights with the reference.
    """
    if len(model.offsets) != 1:
        raise ValueError(f"relearn attacks one export; got a composition of {len(model.offsets)} offsets.")
    part = model.offsets[0]
    if model.reference is not None and any(p is q for p in part.parameters() for q in model.reference.parameters()):
        raise ValueError("A LoRA offset shares its base weights with the reference S0: relearn supports whole-model "
                         "exports only (not yet LoRA).")
    return part


def _logits_of(model: UnlearnedModel, target: str) -> Callable[[Tensor, Tensor], Tensor]:
    if target == "offset":
        part = trainable_part(model)
        return lambda ids, mask: part(input_ids=ids, attention_mask=mask).logits[..., :model.vocab_size]
    return lambda ids, mask: model.combined(ids, mask)


def relearn(
    model: UnlearnedModel,
    rows: Sequence[dict[str, Any]],
    steps: Sequence[int],
    measure: Callable[[], dict[str, Any]],
    *,
    target: str,
    lr: float = 1e-3,
    batch_size: int = 4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fine-tune ``trainable_part(model)`` with AdamW on ``rows`` (question, answer) and call ``measure`` after each
    step count in ``steps`` (cumulative: 1, 5, 20 is one run of 20 steps measured three times).

    The batches cycle through ``rows`` in an order shuffled by ``seed``; the loss is the mean answer NLL (nats per
    token) of the target's logits. The parameters are modified in place (the caller restores them); every other
    model stays frozen.

    Returns one ``{"steps": k, "train_loss": last step's loss, **measure()}`` per k.

    Raises:
        ValueError: an unknown target, a target that does not fit the export's mode, no rows, or steps not positive.
    """
    if target not in TARGETS:
        raise ValueError(f"relearn target must be one of {TARGETS}, got {target!r}.")
    if (target == "direct") != model.composition.is_direct:
        raise ValueError(f"target {target!r} does not fit a{' direct' if model.composition.is_direct else 'n offset'}"
                         " export: use 'direct' for a direct export, 'offset' or 'combined' for an offset one.")
    if not rows:
        raise ValueError("relearn needs at least one forget row to train on: raise --relearn-rows.")
    if not steps or min(steps) < 1:
        raise ValueError(f"relearn steps must be positive integers, got {list(steps)}.")
    part = trainable_part(model)
    params = list(part.parameters())
    for p in params:
        p.requires_grad_(True)
    logits_fn = _logits_of(model, target)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    results, position, loss_value = [], 0, float("nan")
    try:
        for step in range(1, max(steps) + 1):
            take = [order[(position + i) % len(order)] for i in range(min(batch_size, len(order)))]
            position += len(take)
            batch = model.encode([rows[i]["question"] for i in take], [rows[i]["answer"] for i in take])
            device = model.device
            logits = logits_fn(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            loss = F.answer_token_stats(logits, batch["labels"].to(device)).mean_nll.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            if step in steps:
                results.append({"steps": step, "train_loss": loss_value, **measure()})
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return results
