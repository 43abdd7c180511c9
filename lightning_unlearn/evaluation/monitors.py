"""Which metrics a run's validation will log, and the refusal of monitors that name any other.

A ``ModelCheckpoint``, ``EarlyStopping`` or :class:`~.selection.UtilityFloorCheckpoint` reads its metric when a
validation ends; one that names a metric the configured evaluation never logs (``val/model_utility`` with
``model.max_new_tokens 0``, ``val/forget_quality`` without a retain reference, a typo) used to be found only then,
after a whole epoch of training, as a ``KeyError`` or a warning that nothing was saved. :func:`check_monitors`
compares the monitors with the evaluation's :class:`MetricPlan` when the trainer sets up, before the first step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MetricPlan", "check_monitors", "monitored_metrics"]

TRAINING_PREFIX = "train/"
"""The training step's metrics (``train/loss``, ``train/forget_loss``, ...): their names depend on the loss, so
monitors under this prefix are not checked here."""

ALWAYS_LOGGED = frozenset({"epoch", "step"})
"""Metrics Lightning itself adds to every checkpoint's candidates."""


@dataclass(frozen=True)
class MetricPlan:
    """What one validation will log, without the ``val/`` prefix.

    Attributes:
        logged: every metric the validation logs (a value, possibly NaN, at each validation).
        missing: metrics the evaluation knows but this configuration will never log, each with its cause and
            the option that would change it (``"ROUGE needs generated answers: model.max_new_tokens is 0"``).
    """

    logged: frozenset[str]
    missing: Mapping[str, str] = field(default_factory=dict)

    def __or__(self, other: MetricPlan) -> MetricPlan:
        return MetricPlan(self.logged | other.logged, {**self.missing, **other.missing})


def monitored_metrics(callback: Any) -> list[str]:
    """The logged metrics a callback reads: its ``monitor`` (ModelCheckpoint, EarlyStopping), or the metrics it
    computes its score from (:class:`~.selection.UtilityFloorCheckpoint`'s ``monitored``); none without one."""
    reads = getattr(callback, "monitored", None)
    if reads is not None:
        return list(reads)
    monitor = getattr(callback, "monitor", None)
    return [monitor] if isinstance(monitor, str) and monitor else []


def check_monitors(callbacks: Iterable[Any], plan: MetricPlan, prefix: str = "val/") -> None:
    """Refuse a callback that monitors a metric the validation will never log.

    Args:
        callbacks: the trainer's callbacks (those without a monitor are skipped).
        plan: what the configured evaluation logs (``TofuEvaluation.plan`` and the lm-eval tasks').
        prefix: the validation's prefix of every metric it logs.

    Raises:
        ValueError: naming the callback, the metric, why it is never logged (the option to change) and the
            metrics this run does log.
    """
    for callback in callbacks:
        for name in monitored_metrics(callback):
            if name in ALWAYS_LOGGED or name.startswith(TRAINING_PREFIX):
                continue
            key = name[len(prefix):] if name.startswith(prefix) else None
            if key is not None and key in plan.logged:
                continue
            if key is None:
                cause = f"every evaluation metric is logged under {prefix!r}"
                if name in plan.logged:
                    cause += f" (did you mean {prefix + name!r}?)"
            else:
                cause = plan.missing.get(key, "the configured evaluation has no such metric")
            logged = ", ".join(sorted(prefix + m for m in plan.logged))
            raise ValueError(f"{type(callback).__name__} monitors {name!r}, which this run will never log: {cause}. "
                             f"Validation logs: {logged} (and the training step's {TRAINING_PREFIX}* losses).")
