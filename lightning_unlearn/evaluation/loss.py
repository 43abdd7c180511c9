"""The evaluation of ``data.evaluation: loss``: the answer NLL of the forget and retain sets.

For data without TOFU's evaluation files. Like :class:`~lightning_unlearn.evaluation.tofu.TofuEvaluation`
it keeps one value per sample with the sample's index, so that results gathered from DDP ranks count each
sample once and equal the single-process ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from typing import Any

from torch import Tensor, nn

from ..metrics import functional as F
from ..metrics.tofu import PerSampleMean
from .monitors import MetricPlan
from .passes import DEFAULT_TOKEN_BUDGET, continuation_fn_of, score_rows


LogitsFn = Callable[[Tensor, Tensor], Tensor]


def _mean_nll(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    return {"nll": F.answer_token_stats(logits, labels).mean_nll}


class LossEvaluation(nn.Module):
    """``<set>_nll``: mean over the set's samples of the per-token mean answer NLL (nats).

    The answers run in length-sorted passes of at most ``token_budget`` padded tokens (:mod:`.passes`).
    A mean of per-sample means, not a token mean over the set: each answer counts once whatever its
    length, and the value depends neither on the batch size nor on the number of devices (a mean of
    batch token means would depend on both).
    """

    @staticmethod
    def sets_of(key: str) -> tuple[str, ...]:
        """The set of a metric ``<set>_nll``."""
        return (key.removesuffix("_nll"),) if key.endswith("_nll") else ()

    def __init__(self, sets: list[str], token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        super().__init__()
        self.sets, self.token_budget = list(sets), token_budget
        self.metrics = nn.ModuleDict({name: PerSampleMean() for name in self.sets})

    def plan(self, generates: bool = False, served: Collection[str] | None = None) -> MetricPlan:
        """The summary keys :meth:`compute` gives (``<set>_nll``); every TOFU metric is missing in this mode."""
        return MetricPlan(frozenset(f"{name}_nll" for name in self.sets if served is None or name in served),
                          {"forget_quality": "data.evaluation is loss, which scores the answer NLL only: use tofu",
                           "model_utility": "data.evaluation is loss, which scores the answer NLL only: use tofu"})

    def update(self, batch: dict[str, Any], logits_fn: LogitsFn, generate_fn: object = None) -> Tensor:
        """Score one batch ``{"set", "index" [B], "answer": {input_ids, attention_mask, labels}}``; returns [B] NLLs.

        Raises:
            KeyError: the batch's set is not one of ``sets``.
        """
        if batch["set"] not in self.metrics:
            raise KeyError(f"evaluation set {batch['set']!r} is not one of {self.sets}")
        nll = score_rows(logits_fn, [(batch["answer"], _mean_nll)], self.token_budget,
                         continuation_fn_of(logits_fn))[0]["nll"]
        self.metrics[batch["set"]].update(nll, batch["index"])
        return nll

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def compute(self) -> tuple[dict[str, float | None], dict[str, Any]]:
        """Summary ``{"<set>_nll": value}`` for the sets that received samples, and the per-sample report.

        Under DDP every rank must call this (it gathers); all get the same result.
        """
        summary: dict[str, float | None] = {}
        report: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric")
            for name, metric in self.metrics.items():
                value = float(metric.compute())
                index = metric.sample_index()
                if not index:
                    continue
                key = f"{name}_nll"
                summary[key] = value
                pairs = zip(index, metric.per_sample().tolist())
                report[key] = {"agg_value": value, "value_by_index": {str(i): {"nll": v} for i, v in pairs}}
        return summary, report
