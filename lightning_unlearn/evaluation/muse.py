"""The MUSE evaluation (Shi et al. 2024) with open-unlearning's metric names, fed from shared passes.

==========================  ===================================================================================
metric                      definition
==========================  ===================================================================================
``forget_verbmem_ROUGE``    ROUGE-L F1 of the greedy continuation (up to 128 new tokens) of each verbmem prompt
                            against its true continuation ``gt``: verbatim memorization of the forget corpus
``forget_knowmem_ROUGE``    ROUGE-L F1 of the greedy answer (up to 32 new tokens, cut at the next few-shot turn)
                            to each forget question, asked after the benchmark's in-context examples
``retain_knowmem_ROUGE``    the same on the retain questions: what unlearning must keep
``extraction_strength``     on ``prompt + gt`` of the verbmem set (teacher forced; see
                            :func:`~lightning_unlearn.metrics.functional.extraction_strength`)
``mia_min_k``               AUC of Min-K% (k = 0.4) scores, privleak forget (label 0) vs holdout (label 1)
``privleak``                ``((1 - AUC) - (1 - AUC_ret)) / (1 - AUC_ret) * 100``, ``AUC_ret`` the retrained
                            model's ``mia_min_k`` (:func:`~lightning_unlearn.metrics.functional.privleak`):
                            open-unlearning's sign, which is MUSE's PrivLeak (near 0 is good; strongly negative
                            means forget texts still look like training data, positive that they look less
                            like it than unseen text, over-unlearning)
==========================  ===================================================================================

Each text is run once per model: one teacher-forced pass per verbmem and privleak text and one generation
per verbmem and knowmem prompt (KV-cached, offset-aware: the module's ``generate``). Per-sample values are
stored with their index in their set, so results gathered from DDP ranks count each sample once.
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
from torch import Tensor, nn

from ..metrics import functional as F
from ..metrics.rouge import RougeLF1, cut_answer
from ..metrics.tofu import ExtractionStrength, MembershipInferenceAUC
from .monitors import MetricPlan
from .passes import DEFAULT_TOKEN_BUDGET, continuation_fn_of, score_rows
from .report import plot_history
from .tofu import _gather_objects, mia_by_index

LogitsFn = Callable[[Tensor, Tensor], Tensor]
GenerateFn = Callable[..., list[str | None]]  # (input_ids, attention_mask, max_new_tokens) -> texts (None: non-finite)

VERBMEM_NEW_TOKENS, KNOWMEM_NEW_TOKENS, MIN_K = 128, 32, 0.4
ROUGE_NAME = {"verbmem_forget": "forget_verbmem_ROUGE", "knowmem_forget": "forget_knowmem_ROUGE",
              "knowmem_retain": "retain_knowmem_ROUGE"}
HEADLINE = ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak", "mia_min_k",
            "extraction_strength")
METRIC_SETS = {"forget_verbmem_ROUGE": ("verbmem_forget",), "extraction_strength": ("verbmem_forget",),
               "forget_knowmem_ROUGE": ("knowmem_forget",), "retain_knowmem_ROUGE": ("knowmem_retain",),
               "mia_min_k": ("privleak_forget", "privleak_holdout"),
               "privleak": ("privleak_forget", "privleak_holdout")}


def metric_sets(key: str) -> tuple[str, ...]:
    """The MUSE sets a metric of the summary is computed from (none for an lm-eval ``task/metric``)."""
    return METRIC_SETS.get(key, ())


def _extraction_strength(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    return {"score": F.extraction_strength(logits, labels)}


def _min_k(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    stats = F.answer_token_stats(logits, labels)
    return {"score": F.min_k_score(stats.token_logprobs, stats.mask, MIN_K)}


@dataclass(frozen=True)
class MuseReference:
    """What privleak needs from the retrained model's evaluation: its Min-K% AUC."""

    mia_min_k: float

    @classmethod
    def from_file(cls, path: str | Path) -> MuseReference:
        """Read the ``mia_min_k`` AUC of a ``MUSE_EVAL.json`` (this project's or open-unlearning's).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file has no ``mia_min_k.agg_value`` (e.g. a TOFU_EVAL.json of another benchmark), or it
                is not a finite number (privleak against it would be NaN).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"retain_reference {path} does not exist: give the MUSE_EVAL.json written by "
                                    "`main.py test --data.evaluation muse` on the retrained model.")
        data = json.loads(path.read_text(encoding="utf-8"))
        value = data.get("mia_min_k", {}).get("agg_value") if isinstance(data.get("mia_min_k"), dict) else None
        if value is None:
            raise ValueError(f"{path} has no mia_min_k.agg_value: is it the MUSE_EVAL.json of a MUSE evaluation?")
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: mia_min_k.agg_value is {value!r}, not a finite number; the retrained model's "
                             "evaluation that wrote it was broken (NaN logits?): evaluate it again and give that "
                             "MUSE_EVAL.json as model.retain_reference.")
        return cls(float(value))


class MuseEvaluation(nn.Module):
    """Accumulates MUSE's metrics over the sets present and reports them (see the module docstring).

    Args:
        sets: the sets served (names of :func:`~lightning_unlearn.data.muse_eval.muse_eval_specs`).
        reference: the retrained model's results, for privleak (reported as missing without it).
        max_new_tokens: a cap on both generation lengths (the module's ``max_new_tokens``); 0 skips ROUGE.
        token_budget: most padded tokens per teacher-forced pass (:mod:`.passes`).
    """

    benchmark: ClassVar[str] = "MUSE"
    headline: ClassVar[tuple[str, ...]] = HEADLINE
    sets_of = staticmethod(metric_sets)

    def __init__(self, sets: list[str], reference: MuseReference | None = None, max_new_tokens: int = 200,
                 token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        super().__init__()
        self.sets, self.reference, self.max_new_tokens = list(sets), reference, max_new_tokens
        self.token_budget = token_budget
        self.rouge = nn.ModuleDict({name: RougeLF1() for name in self.sets if name in ROUGE_NAME})
        self.es = ExtractionStrength()
        self.mia = MembershipInferenceAUC()
        self.texts: dict[str, list[tuple[int, str, str, str]]] = {name: [] for name in self.rouge}
        self.privleak_sets: set[str] = set()  # the privleak sets this rank scored (the AUC needs both)

    def plan(self, generates: bool, served: Collection[str] | None = None) -> MetricPlan:
        """The summary keys :meth:`compute` gives a value, and the causes of the others (see
        :meth:`.TofuEvaluation.plan`); ``generates``: whether ``max_new_tokens > 0``; ``served``: the sets that
        receive samples (None: all)."""
        logged: set[str] = set()
        missing: dict[str, str] = {}
        present = [name for name in self.sets if served is None or name in served]
        for name in (n for n in self.rouge if n in present):
            if generates and self.max_new_tokens > 0:
                logged.add(ROUGE_NAME[name])
            else:
                missing[ROUGE_NAME[name]] = "ROUGE needs generated texts, and model.max_new_tokens is 0"
        if "verbmem_forget" in present:
            logged.add("extraction_strength")
        if {"privleak_forget", "privleak_holdout"} <= set(present):
            logged.add("mia_min_k")
            if self.reference is not None:
                logged.add("privleak")
            else:
                missing["privleak"] = ("it needs the retrained model's evaluation: set model.retain_reference to its "
                                       "MUSE_EVAL.json")
        else:
            missing["mia_min_k"] = missing["privleak"] = "it needs the privleak forget and holdout sets"
        return MetricPlan(frozenset(logged), missing)

    def update(self, batch: dict[str, Any], logits_fn: LogitsFn, generate_fn: GenerateFn | None) -> None:
        """Score one batch of one set (from :func:`~lightning_unlearn.data.muse_eval.collate_muse`)."""
        name, index = batch["set"], batch["index"]
        if "sequence" in batch:  # one pass per row, in length-sorted passes of at most token_budget tokens
            scorer = _extraction_strength if name == "verbmem_forget" else _min_k
            scores = score_rows(logits_fn, [(batch["sequence"], scorer)], self.token_budget,
                                continuation_fn_of(logits_fn))[0]["score"]
            if name == "verbmem_forget":
                self.es.update(scores, index)
            else:
                self.mia.update(scores, torch.full_like(scores, float(name == "privleak_holdout")), index)
                self.privleak_sets.add(name)
        if name in self.rouge and generate_fn is not None:
            limit = VERBMEM_NEW_TOKENS if name == "verbmem_forget" else KNOWMEM_NEW_TOKENS
            prompt = batch["prompt"]
            texts = generate_fn(prompt["input_ids"], prompt["attention_mask"], min(limit, self.max_new_tokens))
            if name != "verbmem_forget":
                texts = [cut_answer(t) for t in texts]
            self.rouge[name].update(texts, batch["references"], index)
            self.texts[name].extend(zip(index.tolist(), batch["inputs"], batch["references"], texts))

    def reset(self) -> None:
        for metric in [*self.rouge.values(), self.es, self.mia]:
            metric.reset()
        self.texts = {name: [] for name in self.rouge}
        self.privleak_sets = set()

    def compute(self) -> tuple[dict[str, float | None], dict[str, Any]]:
        """The summary (one number per metric, ``None`` when it cannot be computed) and the per-sample report.

        Under DDP every rank must call this (it gathers); all get the same results.
        """
        summary: dict[str, float | None] = {}
        report: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric")
            for name, metric in self.rouge.items():
                texts = {int(i): rest for i, *rest in _gather_objects(self.texts[name])}
                value = float(metric.compute())
                if not texts or not metric.sample_index():
                    continue
                key = ROUGE_NAME[name]
                summary[key] = value
                report[key] = {"agg_value": value, "value_by_index": {
                    str(i): {"rougeL_f1": v, "input": texts[i][0], "ground_truth": texts[i][1],
                             "generation": texts[i][2]}
                    for i, v in zip(metric.sample_index(), metric.per_sample().tolist())}}
            es = float(self.es.compute())
            if self.es.sample_index():
                summary["extraction_strength"] = es
                report["extraction_strength"] = {"agg_value": es, "value_by_index": {
                    str(i): {"score": v} for i, v in zip(self.es.sample_index(), self.es.per_sample().tolist())}}
            if set(_gather_objects(sorted(self.privleak_sets))) == {"privleak_forget", "privleak_holdout"}:
                summary["mia_min_k"] = float(self.mia.compute())
                report["mia_min_k"] = {"agg_value": summary["mia_min_k"], **mia_by_index(self.mia)}
        summary["privleak"] = None
        if self.reference is not None and "mia_min_k" in summary:
            summary["privleak"] = F.privleak(summary["mia_min_k"], self.reference.mia_min_k)
        report["privleak"] = {"agg_value": summary["privleak"]}
        return summary, report

    @staticmethod
    def plot_history(history: list[dict[str, Any]], path: Path, floor: float | None = None) -> Path | None:
        """Forget verbmem ROUGE against retain knowmem ROUGE, one point per evaluated epoch. ``floor`` (the TOFU
        selection rule's, which reads forget quality) does not apply to MUSE's metrics and is not drawn."""
        return plot_history(history, "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "epoch", path,
                            "forget verbatim memorization vs retain knowledge by epoch")
