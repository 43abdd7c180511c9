"""Checkpoint selection by a stated rule: the best forget quality among the epochs that keep enough utility.

Unlearning papers on TOFU select (or tune) a run by forget quality under a model-utility constraint, since
forget quality alone rewards a model that has forgotten everything. :class:`UtilityFloorCheckpoint` makes the
rule a checkpoint monitor, decided on each validation's metrics as training runs, not on a final table.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from ..numbers import finite


def selection_score(quality: float | None, utility_ratio: float | None, floor: float) -> float:
    """The rule as one number to maximise: ``quality`` where ``utility_ratio >= floor``, else ``utility_ratio - 2``.

    An epoch that keeps the floor scores its forget quality (a p-value, in [0, 1]); one below it scores in
    [-2, -1), so it loses to every epoch above the floor and, among epochs that are all below it, the one
    closest to the floor wins. ``None``, NaN or infinite inputs score ``-inf`` (never selected over a measured
    epoch): a NaN compares false with everything, so ``max`` would keep or drop it by its position alone.
    """
    if utility_ratio is None or not math.isfinite(utility_ratio):
        return -math.inf
    if utility_ratio < floor:
        return utility_ratio - 2.0
    if quality is None or not math.isfinite(quality):
        return -math.inf
    return quality


class UtilityFloorCheckpoint(ModelCheckpoint):
    """Keep the epoch with the highest ``quality`` among those whose ``utility_ratio`` stays >= ``floor``.

    The score of :func:`selection_score` is added to the metrics the checkpoint compares under ``monitor``
    (default ``val/selection_score``, mode ``max``); every other ``ModelCheckpoint`` option works as usual.
    The default reads ``val/forget_quality`` and ``val/model_utility_vs_retain`` (model utility divided by the
    retain model's, both logged by the TOFU validation when ``model.retain_reference`` is set), so the rule is
    "the best forget quality among the epochs keeping at least 90% of the retain model's utility".

    Args:
        quality: the logged metric to maximise.
        utility_ratio: the logged metric the floor applies to.
        floor: the lowest acceptable ``utility_ratio``.
        monitor: name under which the score is compared (and can be used in ``filename``).
        mode: must be ``max``.
        **kwargs: the other ``ModelCheckpoint`` options (``filename``, ``save_top_k``, ...).

    Raises:
        ValueError: if ``mode`` is not ``max``.
        KeyError: at a validation that did not log ``quality`` or ``utility_ratio`` (e.g. no retain reference).
    """

    def __init__(self, quality: str = "val/forget_quality", utility_ratio: str = "val/model_utility_vs_retain",
                 floor: float = 0.9, monitor: str = "val/selection_score", mode: str = "max", **kwargs: Any) -> None:
        if mode != "max":
            raise ValueError(f"UtilityFloorCheckpoint maximises its score: mode must be 'max', got {mode!r}.")
        super().__init__(monitor=monitor, mode=mode, **kwargs)
        # a NaN floor would pass every epoch (x < nan is False): the rule would silently drop its constraint
        self.quality, self.utility_ratio, self.floor = quality, utility_ratio, finite(floor, "floor",
                                                                                       "UtilityFloorCheckpoint")

    @property
    def monitored(self) -> tuple[str, str]:
        """The logged metrics the score is computed from (what a setup check must find in the validation's)."""
        return self.quality, self.utility_ratio

    def _monitor_candidates(self, trainer: Trainer) -> dict[str, Tensor]:
        candidates = super()._monitor_candidates(trainer)
        if self.utility_ratio not in candidates:
            if trainer.fit_loop.epoch_loop.val_loop._has_run:
                raise KeyError(f"UtilityFloorCheckpoint needs {self.utility_ratio!r} (and {self.quality!r}) from the "
                               "validation, which did not log it. The utility ratio needs model.retain_reference (the "
                               "retain model's TOFU_EVAL.json, with its model_utility) and this run's model utility, "
                               "which needs generated answers (model.max_new_tokens > 0) on every utility set.")
            return candidates  # no validation yet: ModelCheckpoint defers or warns as for any missing monitor
        quality = candidates.get(self.quality)
        score = selection_score(None if quality is None else float(quality), float(candidates[self.utility_ratio]),
                                self.floor)
        candidates[self.monitor] = torch.tensor(score, dtype=torch.float64)
        return candidates


def select(summaries: list[dict[str, Any]], floor: float = 0.9, quality: str = "forget_quality",
           utility_ratio: str = "model_utility_vs_retain") -> dict[str, Any] | None:
    """The summary the rule of :func:`selection_score` picks (the first of equal scores), e.g. among the alphas of a
    sweep (``sweep.py``) or the epochs of a ``TOFU_HISTORY.json``; ``None`` when none was measured
    (every one scores ``-inf``: its numbers are missing, NaN or infinite), rather than the first of them.

    Raises:
        ValueError: if ``summaries`` is empty.
    """
    if not summaries:
        raise ValueError("select() needs at least one evaluation summary.")
    best = max(summaries, key=lambda s: selection_score(s.get(quality), s.get(utility_ratio), floor))
    return best if selection_score(best.get(quality), best.get(utility_ratio), floor) > -math.inf else None


def rule_floor(callbacks: list[Any]) -> float | None:
    """The floor of the run's selection rule: that of its first :class:`UtilityFloorCheckpoint` among ``callbacks``
    (a trainer's), None when it has none (it selects by another rule, or not at all). The per-epoch figure draws
    this floor and the epoch the rule picks (:mod:`~lightning_unlearn.evaluation.tradeoff_plot`)."""
    return next((c.floor for c in callbacks if isinstance(c, UtilityFloorCheckpoint)), None)
