"""The comparison's outputs: ``COMPARE.md`` (the table), ``COMPARE.json`` (everything) and the trade-off plot
``COMPARE.png`` (the cells, the reference models, forget quality 0.05, the utility floor and the rule's pick).

Each row is one cell (method x mode) or a reference model (fine-tuned, retain); columns are the TOFU summary's
``forget_quality``, ``model_utility`` and ROUGE on the forget, retain, real-authors and world-facts sets, the
general accuracy (mean lm-eval accuracy, blank without lm-eval results) and the training time. A failed cell
is a row with its error; a cell whose evaluation was not finite (``all_finite: false`` in its summary) is listed
below the table with its NaN metrics. Every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from ..evaluation.selection import select
from ..evaluation.tradeoff_plot import FLOOR, SMALLEST, Mark, TradeoffFigure, reference_marks, save_tradeoff


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

COLUMNS = (("forget_quality", "forget quality"), ("model_utility", "model utility"),
           ("forget_Q_A_ROUGE", "forget ROUGE"), ("retain_Q_A_ROUGE", "retain ROUGE"),
           ("ra_Q_A_ROUGE", "real-authors ROUGE"), ("wf_Q_A_ROUGE", "world-facts ROUGE"),
           ("general_accuracy", "general accuracy"))


def general_accuracy(summary: Mapping[str, Any]) -> float | None:
    """Mean lm-eval accuracy over the tasks of a TOFU summary; None when it holds none.

    The lm-eval tasks of ``data.lm_eval_tasks`` join the summary as ``task/metric`` keys
    (:mod:`lightning_unlearn.harness.hooks`), and only they carry a ``/``. A task counts its ``acc_norm`` where it
    reports one (lm-eval's length-normalised accuracy, the usual headline for ARC, HellaSwag, OpenBookQA), else its
    ``acc``; ``acc_stderr`` and other metrics are skipped. Each task weighs the same.
    """
    per_task: dict[str, float] = {}
    for key, value in summary.items():
        if "/" not in key or not isinstance(value, (int, float)):
            continue
        task, metric = key.rsplit("/", 1)
        if metric == "acc_norm" or (metric == "acc" and task not in per_task):
            per_task[task] = float(value)
    return sum(per_task.values()) / len(per_task) if per_task else None


def row(name: str, mode: str, summary: Mapping[str, Any] | None, train_s: float | None = None,
        error: str | None = None) -> dict[str, Any]:
    """One table row: the metrics of :data:`COLUMNS` from a summary (None where missing), and ``non_finite``: the
    summary's metrics that are NaN or infinite (its ``non_finite``), None when all are finite."""
    values = dict(summary or {})
    values["general_accuracy"] = general_accuracy(values)
    flagged = sorted((values.get("non_finite") or {}).get("metrics", {}))
    return {"method": name, "mode": mode, **{k: values.get(k) for k, _ in COLUMNS}, "train_s": train_s,
            "error": error, "non_finite": flagged or None}


def rows(results: Sequence[Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Reference rows first, then one row per cell result."""
    out = [row(name, "reference", summary) for name, summary in references.items()]
    for r in results:
        out.append(row(r["method"], r["mode"], r.get("summary"), r.get("train_s"),
                       None if r.get("status") == "ok" else r.get("error", "not run")))
    return out


def format_cell(value: Any) -> str:
    """A table cell: empty for None, small floats in scientific notation, others to 3 decimals."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and abs(value) < 1e-2 else f"{value:.3f}"
    return str(value)


def markdown(table: Sequence[Mapping[str, Any]], header: str) -> str:
    """The table as Markdown, failed cells listed below it with their errors."""
    names = ["method", "mode", *(label for _, label in COLUMNS), "train time (s)"]
    lines = [header, "", "| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    for r in table:
        cells = [r["method"], r["mode"], *(format_cell(r[k]) for k, _ in COLUMNS),
                 "FAILED" if r["error"] else "" if r["train_s"] is None else f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in table if r["error"]]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {r['method']} {r['mode']}: {r['error']}" for r in failed]
    broken = [r for r in table if r.get("non_finite")]
    if broken:
        lines += ["", "Non-finite results (the model's logits were not finite: these cells are not measurements):",
                  ""] + [f"- {r['method']} {r['mode']}: {', '.join(r['non_finite'])}" for r in broken]
    return "\n".join(lines) + "\n"


def figure(table: Sequence[Mapping[str, Any]], title: str, floor: float = FLOOR) -> TradeoffFigure:
    """The comparison as a :class:`~lightning_unlearn.evaluation.tradeoff_plot.TradeoffFigure`: one point per cell
    with both numbers (``"NPO offset"``: circles for offset, squares for direct), the reference rows as stars (the
    retain model at forget quality 1, by definition), forget quality 0.05, the utility floor ``floor`` x the
    retain model's and the cell the selection rule picks among all cells with that floor (``selected``)."""
    retain = next((r["model_utility"] for r in table if r["mode"] == "reference" and r["method"] == "retain model"
                   and _finite(r["model_utility"])), None)
    cells = [r for r in table if r["mode"] != "reference"]
    finetuned = next((r for r in table if r["mode"] == "reference" and r["method"] == "fine-tuned"), None)
    points = [Mark(f"{r['method']} {r['mode']}", float(r["model_utility"]), max(float(r["forget_quality"]), SMALLEST),
                   r["mode"]) for r in cells if _finite(r["forget_quality"]) and _finite(r["model_utility"])]
    skipped = [f"{r['method']} {r['mode']}" for r in cells
               if not (_finite(r["forget_quality"]) and _finite(r["model_utility"]))]
    chosen = None
    if retain is not None and retain > 0:
        scored = [{**r, "model_utility_vs_retain": r["model_utility"] / retain if _finite(r["model_utility"]) else None}
                  for r in cells]
        pick = select(scored, floor) if scored else None
        if pick is not None:
            chosen = next(p for p in points if p.label == f"{pick['method']} {pick['mode']}")
    return TradeoffFigure(title, points, reference_marks(finetuned, retain),
                          utility_floor=floor * retain if retain is not None else None,
                          floor_ratio=floor if retain is not None else None, selected=chosen,
                          selected_caption=f"the rule's pick (floor {floor:g})", skipped=skipped)


def plot(table: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """Draw :func:`figure` of ``table`` to ``path`` (PNG); None when no cell has both numbers."""
    return save_tradeoff(figure(table, title), path)


def write_outputs(root: Path, results: Sequence[Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]],
                  header: str, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Write ``COMPARE.md``, ``COMPARE.json`` and ``COMPARE.png`` under ``root``; return the table rows."""
    table = rows(results, references)
    atomic_write_text(root / "COMPARE.md", markdown(table, header))
    atomic_write_json(root / "COMPARE.json", {**meta, "table": table, "cells": list(results),
                                              "references": dict(references)})
    plot(table, root / "COMPARE.png", "forget quality vs model utility: offset (circles) and direct (squares)")
    return table
