"""The TOFU evaluation: metric objects per set, fed from shared forward passes, and their report.

Metric names and the layout of the per-sample report (``agg_value`` and ``value_by_index``) follow the
open-unlearning project, so numbers compare across papers and a retain model's ``TOFU_EVAL.json`` from
either project can serve as the reference for forget quality and privleak.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..metrics import functional as F
from .monitors import MetricPlan
from .passes import DEFAULT_TOKEN_BUDGET, continuation_fn_of, score_rows
from .tradeoff_plot import save_tradeoff, series_figure
from ..metrics.tofu import (
    AnswerProbability,
    ExactMemorization,
    ExtractionStrength,
    MembershipInferenceAUC,
    NormalisedAnswerProbability,
    PerSampleMean,
    RougeLRecall,
    TruthRatio,
)

LogitsFn = Callable[[Tensor, Tensor], Tensor]
GenerateFn = Callable[[Tensor, Tensor], list[str | None]]  # None: the generation read non-finite logits

PROB_NAME = {"forget": "forget_Q_A_Prob", "retain": "retain_Q_A_Prob", "ra": "ra_Q_A_Prob", "wf": "wf_Q_A_Prob"}
TRUTH_NAME = {"forget": "forget_truth_ratio", "retain": "retain_Truth_Ratio", "ra": "ra_Truth_Ratio",
              "wf": "wf_Truth_Ratio"}
MIA_NAMES = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
HEADLINE = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "forget_Q_A_Prob", "forget_truth_ratio",
            "retain_Q_A_ROUGE", "retain_Q_A_Prob", "privleak", "extraction_strength")
SET_PREFIXES = ("forget", "retain", "ra", "wf")


def metric_sets(key: str) -> tuple[str, ...]:
    """The TOFU evaluation sets a metric of the summary is computed from (none for an lm-eval ``task/metric``)."""
    if key.startswith("mia_") or key == "privleak":
        return ("forget", "holdout")
    if key in ("exact_memorization", "extraction_strength", "forget_quality"):
        return ("forget",)
    if key.startswith("model_utility"):
        return ("retain", "ra", "wf")
    prefix = key.split("_", 1)[0]
    return (prefix,) if prefix in SET_PREFIXES else ()


def _finite_or_refuse(path: Path, what: str, values: list[Any]) -> None:
    """Refuse a reference whose values are not finite numbers: forget quality or privleak against them would be
    NaN, or worse a number."""
    bad = [v for v in values if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{path}: {what} holds {len(bad)} values that are not finite numbers (first: {bad[0]!r}); "
                         "the retain model's evaluation that wrote it was broken (NaN logits?): evaluate the retain "
                         "model again and give that TOFU_EVAL.json as model.retain_reference.")


@dataclass(frozen=True)
class RetainReference:
    """What forget quality, privleak and the utility ratio need from the retain model's evaluation."""

    forget_truth_ratios: Tensor
    mia_min_k: float | None
    model_utility: float | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> RetainReference:
        """Read a ``TOFU_EVAL.json`` (this project's or open-unlearning's) of a retain-only model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"retain_reference {path} does not exist: give the TOFU_EVAL.json written by "
                                    "`main.py test` on the retain model.")
        data = json.loads(path.read_text(encoding="utf-8"))
        try:
            by_index = data["forget_truth_ratio"]["value_by_index"]
            ratios = [v["score"] for v in by_index.values() if v.get("score") is not None]
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{path} has no forget_truth_ratio.value_by_index scores: is it a TOFU_EVAL.json?") from None
        mia = data.get("mia_min_k", {}).get("agg_value")
        utility = data.get("model_utility", {}).get("agg_value")
        _finite_or_refuse(path, "forget_truth_ratio.value_by_index", ratios)
        _finite_or_refuse(path, "mia_min_k.agg_value / model_utility.agg_value",
                          [v for v in (mia, utility) if v is not None])
        return cls(torch.tensor(ratios, dtype=torch.float64), mia, utility)


def _gather_objects(values: list[Any]) -> list[Any]:
    """Concatenate python lists rank by rank (the order torchmetrics uses for ``cat`` states).

    A collective under DDP: every rank must call it, with or without values of its own.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]


def mia_by_index(metric: MembershipInferenceAUC) -> dict[str, Any]:
    """An attack's per-sample scores as ``{"forget": {"value_by_index": ...}, "holdout": {...}}`` (its AUC's
    inputs: a NaN among them is why the AUC is NaN)."""
    scores, index, holdout = metric.per_sample().tolist(), metric.sample_index(), metric.holdout_mask().tolist()
    out: dict[str, Any] = {"forget": {"value_by_index": {}}, "holdout": {"value_by_index": {}}}
    for score, i, is_holdout in zip(scores, index, holdout):
        out["holdout" if is_holdout else "forget"]["value_by_index"][str(i)] = {"score": score}
    return out


def _mean_nll(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """The scorer of the truth ratio's answers: each row's mean answer NLL."""
    return {"nll": F.answer_token_stats(logits, labels).mean_nll}


class TofuEvaluation(nn.Module):
    """Accumulates every TOFU metric over the evaluation sets present and reports them.

    The teacher-forced passes over every answer variant of a batch (answer, paraphrase, perturbed answers) are
    pooled, sorted by length and cut by ``token_budget`` padded tokens per pass (:mod:`.passes`); the answer's
    logits feed probability, exact memorization, extraction strength and the four membership-inference scores
    together. One generation per prompt feeds ROUGE. Every per-sample value is stored with its sample's index in its set, so the results
    gathered from DDP ranks count each sample once, in dataset order, whatever the distributed sampler
    repeated to even out the ranks (see ``metrics.tofu``): they equal the single-process results.

    Besides open-unlearning's metrics, the summary has ``forget_nll`` and ``retain_nll`` (mean over
    samples of the per-token answer NLL) and ``*_exact`` truth ratios, the ratio without
    open-unlearning's ``+ 1e-10`` (see ``functional.truth_ratio``), which stays informative for a
    collapsed model.
    """

    benchmark: ClassVar[str] = "TOFU"  # names the result files: TOFU_SUMMARY.json, TOFU_EVAL.json, TOFU_HISTORY.json
    headline: ClassVar[tuple[str, ...]] = HEADLINE
    sets_of = staticmethod(metric_sets)

    def __init__(self, sets: list[str], reference: RetainReference | None = None, min_k: float = 0.4,
                 token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        super().__init__()
        self.sets, self.reference, self.min_k, self.token_budget = list(sets), reference, min_k, token_budget
        metrics: dict[str, nn.ModuleDict] = {}
        for name in self.sets:
            m: dict[str, nn.Module] = {"nll": PerSampleMean()}
            if name != "holdout":
                aggregation = "forget" if name == "forget" else "true_better"
                m["prob"] = AnswerProbability()
                m["truth"] = TruthRatio(aggregation)
                m["truth_exact"] = TruthRatio(aggregation, exact=True)
                m["rouge"] = RougeLRecall()
            if name in ("ra", "wf"):
                m["prob_norm"] = NormalisedAnswerProbability()
            if name == "forget":
                m["em"], m["es"] = ExactMemorization(), ExtractionStrength()
            metrics[name] = nn.ModuleDict(m)
        self.metrics = nn.ModuleDict(metrics)
        self.mia = nn.ModuleDict({n: MembershipInferenceAUC() for n in MIA_NAMES}) if {"forget", "holdout"} <= set(
            sets) else nn.ModuleDict()
        self.texts: dict[str, list[tuple[int, str, str, str]]] = {name: [] for name in self.sets}

    def plan(self, generates: bool, served: Collection[str] | None = None) -> MetricPlan:
        """The summary keys :meth:`compute` gives a value (not ``None``), and the causes of the others, so that a
        monitor on one is refused before training (:mod:`.monitors`).

        Args:
            generates: whether answers are generated (``model.max_new_tokens > 0``); ROUGE, and model utility
                through it, need them.
            served: the sets that receive samples (None: all of them; fewer when a limit on validation batches
                cuts the later sets off).
        """
        logged: set[str] = set()
        missing: dict[str, str] = {}
        no_generation = "ROUGE needs generated answers, and model.max_new_tokens is 0"
        present = [name for name in self.sets if served is None or name in served]
        for name in present:
            if name in ("forget", "retain"):
                logged.add(f"{name}_nll")
            if name in PROB_NAME:
                logged |= {PROB_NAME[name], TRUTH_NAME[name], f"{TRUTH_NAME[name]}_exact"}
                (logged.add(f"{name}_Q_A_ROUGE") if generates else missing.setdefault(f"{name}_Q_A_ROUGE",
                                                                                       no_generation))
            if name in ("ra", "wf"):
                logged.add(f"{name}_Q_A_Prob_normalised")
            if name == "forget":
                logged |= {"exact_memorization", "extraction_strength"}
        if self.mia and {"forget", "holdout"} <= set(present):
            logged |= set(MIA_NAMES)
        else:
            missing.update({k: "the membership-inference AUCs need the forget and holdout sets: set "
                               "data.eval_holdout_split" for k in MIA_NAMES})
        no_reference = "it needs the retain model's evaluation: set model.retain_reference to its TOFU_EVAL.json"
        if "forget" not in present:
            missing["forget_quality"] = "it needs the forget set"
        elif self.reference is None:
            missing["forget_quality"] = no_reference
        else:
            logged.add("forget_quality")
        if self.reference is None:
            missing["privleak"] = no_reference
        elif self.reference.mia_min_k is None:
            missing["privleak"] = "the retain reference has no mia_min_k (its evaluation had no holdout set)"
        elif "mia_min_k" not in logged:
            missing["privleak"] = missing["mia_min_k"]
        else:
            logged.add("privleak")
        lacking = [k for k in F.MODEL_UTILITY_KEYS if k not in logged]
        if not lacking:
            logged.add("model_utility")
        elif not generates:
            missing["model_utility"] = ("model utility is a harmonic mean that includes the ROUGE of the retain, "
                                        f"real-authors and world-facts answers; {no_generation}")
        else:
            missing["model_utility"] = f"model utility needs {lacking}, which these evaluation sets do not give"
        if "model_utility" not in logged:
            missing["model_utility_vs_retain"] = missing["model_utility"]
        elif self.reference is None:
            missing["model_utility_vs_retain"] = no_reference
        elif not self.reference.model_utility:
            missing["model_utility_vs_retain"] = ("the retain reference has no model_utility (its evaluation "
                                                  "generated no answers, or predates it)")
        else:
            logged.add("model_utility_vs_retain")
        return MetricPlan(frozenset(logged), missing)

    # --- accumulation ---------------------------------------------------------------------------------------

    def update(self, batch: dict[str, Any], logits_fn: LogitsFn, generate_fn: GenerateFn | None) -> Tensor:
        """Score one batch; returns the per-sample answer NLL, shape [B]."""
        name, m = batch["set"], self.metrics[batch["set"]]
        index = batch["index"]
        groups = [(batch["answer"], self._answer_scorer(name))]
        if "truth" in m:
            groups += [(batch["correct"], _mean_nll)] if "correct" in batch else []
            groups.append((batch["perturbed"], _mean_nll))
        scores = score_rows(logits_fn, groups, self.token_budget, continuation_fn_of(logits_fn))
        answer = scores[0]
        nll = answer["nll"]
        m["nll"].update(nll, index)
        if "prob" in m:
            m["prob"].update(nll, index)
        if name == "forget":
            m["em"].update(answer["em"], index, answer["em_defined"])
            m["es"].update(answer["es"], index)
        if "mia_min_k" in answer:
            mia = {"mia_loss": nll, "mia_zlib": F.zlib_score(nll, batch["answer_texts"]),
                   "mia_min_k": answer["mia_min_k"], "mia_min_k_plus_plus": answer["mia_min_k_plus_plus"]}
            label = torch.full_like(nll, float(name == "holdout"))
            for key, value in mia.items():
                self.mia[key].update(value.to(label.device), label, index)
        if "truth" in m:
            rows = len(index)
            correct = scores[1]["nll"] if "correct" in batch else nll
            wrong = scores[-1]["nll"].view(rows, batch["num_perturbed"])
            m["truth"].update(correct, wrong, index)
            m["truth_exact"].update(correct, wrong, index)
            if "prob_norm" in m:
                m["prob_norm"].update(nll, wrong, index)
        if "rouge" in m and generate_fn is not None:
            generations = generate_fn(batch["prompt"]["input_ids"], batch["prompt"]["attention_mask"])
            m["rouge"].update(generations, batch["answer_texts"], index)
            self.texts[name].extend(zip(index.tolist(), batch["questions"], batch["answer_texts"], generations))
        return nll

    def _answer_scorer(self, name: str) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
        """What a set reads off its answers' logits: the mean NLL; on forget exact memorization and extraction
        strength; on forget and holdout (with MIA) Min-K% and Min-K%++. The last three leave the final answer
        token out, as open-unlearning does (``functional.drop_last_answer_token``)."""
        forget, mia = name == "forget", name in ("forget", "holdout") and bool(self.mia)

        def score(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
            stats = F.answer_token_stats(logits, labels)
            out = {"nll": stats.mean_nll}
            if forget or mia:
                trimmed = F.drop_last_answer_token(labels)
            if forget:
                out["em"] = F.exact_memorization(logits, trimmed)
                out["em_defined"] = (trimmed[:, 1:] != F.IGNORE_INDEX).any(dim=-1)
                out["es"] = F.extraction_strength(logits, trimmed)
            if mia:
                # Min-K% reads the token log-probs already in ``stats`` (same logits), minus the final answer
                # token: recomputing them would cost another log-softmax over the whole [B, T, V] logits.
                out["mia_min_k"] = F.min_k_score(stats.token_logprobs, trimmed[:, 1:] != F.IGNORE_INDEX, self.min_k)
                out["mia_min_k_plus_plus"] = F.min_k_plus_plus_score(logits, trimmed, self.min_k)
            return out

        return score

    def reset(self) -> None:
        for group in list(self.metrics.values()) + [self.mia]:
            for metric in group.values():
                metric.reset()
        self.texts = {name: [] for name in self.sets}

    # --- results --------------------------------------------------------------------------------------------

    def compute(self) -> tuple[dict[str, float | None], dict[str, Any]]:
        """Return the summary (one number per metric, ``None`` when it cannot be computed) and the report.

        Under DDP every rank must call this (it gathers); all of them get the same results. Which metrics are
        computed depends only on gathered values, so every rank runs the same collectives in the same order,
        also when a set's samples all fell on one rank.
        """
        summary: dict[str, float | None] = {}
        report: dict[str, Any] = {}
        present: set[str] = set()
        with warnings.catch_warnings():
            # A rank that received no sample of a set still joins the gathering: not an error.
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric")
            for name in self.sets:
                m = self.metrics[name]
                nll = float(m["nll"].compute())
                if not m["nll"].sample_index():
                    continue  # a set configured yet given no sample, e.g. by limit_val_batches
                present.add(name)
                if name in ("forget", "retain"):
                    summary[f"{name}_nll"] = nll
                if "prob" in m:
                    self._record(summary, report, PROB_NAME[name], m["prob"], "prob")
                    self._record(summary, report, TRUTH_NAME[name], m["truth"], "score")
                    self._record(summary, report, f"{TRUTH_NAME[name]}_exact", m["truth_exact"], "score")
                if "prob_norm" in m:
                    self._record(summary, report, f"{name}_Q_A_Prob_normalised", m["prob_norm"], "prob")
                if "rouge" in m:
                    self._record_rouge(summary, report, name)
                if name == "forget":
                    self._record(summary, report, "exact_memorization", m["em"], "score")
                    for i, defined in zip(m["em"].sample_index(), m["em"].defined().tolist()):
                        if not defined:  # no answer token: EM undefined, open-unlearning's None
                            report["exact_memorization"]["value_by_index"][str(i)]["score"] = None
                    self._record(summary, report, "extraction_strength", m["es"], "score")
            if self.mia and {"forget", "holdout"} <= present:
                for key, metric in self.mia.items():
                    summary[key] = float(metric.compute())
                    report[key] = {"agg_value": summary[key], **mia_by_index(metric)}
        self._add_derived(summary, report)
        return summary, report

    def _record(self, summary: dict, report: dict, key: str, metric: PerSampleMean, field: str) -> str:
        summary[key] = float(metric.compute())
        pairs = zip(metric.sample_index(), metric.per_sample().tolist())
        report[key] = {"agg_value": summary[key], "value_by_index": {str(i): {field: v} for i, v in pairs}}
        return key

    def _record_rouge(self, summary: dict, report: dict, name: str) -> None:
        """ROUGE with each sample's question, reference and generation; skipped when nothing was generated."""
        texts: dict[int, tuple[str, str, str]] = {}
        for index, *text in _gather_objects(self.texts[name]):
            texts.setdefault(int(index), tuple(text))
        if not texts:
            return
        key = self._record(summary, report, f"{name}_Q_A_ROUGE", self.metrics[name]["rouge"], "rougeL_recall")
        for idx, entry in report[key]["value_by_index"].items():
            question, truth, generation = texts[int(idx)]
            entry.update(input=question, ground_truth=truth, generation=generation)

    def plot_history(self, history: list[dict[str, Any]], path: Path, floor: float | None = None) -> Path | None:
        """Forget quality against model utility, one point per evaluated epoch, with the retain model (when
        ``model.retain_reference`` gives it), forget quality 0.05, the utility floor ``floor`` x the retain model's
        and the epoch the selection rule picks with that floor (:mod:`~lightning_unlearn.evaluation.tradeoff_plot`).
        ``floor`` None (a run without ``UtilityFloorCheckpoint``) draws neither: the run selects by another rule."""
        retain = self.reference.model_utility if self.reference is not None else None
        return save_tradeoff(series_figure(history, "epoch", "forget quality vs model utility by epoch",
                                           retain_utility=retain, floor=floor), path)

    def _add_derived(self, summary: dict[str, float | None], report: dict[str, Any]) -> None:
        """Forget quality, privleak and ``model_utility_vs_retain`` (model utility / the retain model's) need the
        retain model's results; model utility needs all nine parts."""
        summary["forget_quality"] = summary["privleak"] = summary["model_utility_vs_retain"] = None
        if self.reference is not None and "forget_truth_ratio" in summary:
            ratios = self.metrics["forget"]["truth"].per_sample()
            summary["forget_quality"] = F.forget_quality(ratios.cpu(), self.reference.forget_truth_ratios)
        if self.reference is not None and self.reference.mia_min_k is not None and "mia_min_k" in summary:
            summary["privleak"] = F.privleak(summary["mia_min_k"], self.reference.mia_min_k)
        try:
            summary["model_utility"] = F.model_utility({k: summary[k] for k in F.MODEL_UTILITY_KEYS})
        except (KeyError, ValueError):
            summary["model_utility"] = None
        if self.reference is not None and self.reference.model_utility and summary["model_utility"] is not None:
            summary["model_utility_vs_retain"] = summary["model_utility"] / self.reference.model_utility
        for key in ("forget_quality", "privleak", "model_utility", "model_utility_vs_retain"):
            report[key] = {"agg_value": summary[key]}
