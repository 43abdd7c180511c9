"""The comparison's outputs: ``COMPARE.md`` (the table), ``COMPARE.json`` (everything) and the trade-off plot.

Each row is one cell (method x mode) or a reference model (fine-tuned, retain); columns are the TOFU summary's
``forget_quality``, ``model_utility`` and ROUGE on the forget, retain, real-authors and world-facts sets, the
general accuracy (mean lm-eval accuracy, blank without lm-eval results) and the training time. A failed cell
is a row with its error; a cell whose evaluation was not finite (``all_finite: false`` in its summary) is listed
below the table with its NaN metrics. Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from ..evaluation.report import save_figure

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


def _fmt(value: Any) -> str:
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
        cells = [r["method"], r["mode"], *(_fmt(r[k]) for k, _ in COLUMNS),
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


def plot(table: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """Forget quality (log scale) against model utility, offset cells as circles, direct as squares,
    references as stars, each labelled with its method; None when no row has both numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in table if r["forget_quality"] is not None and r["model_utility"] is not None]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {"offset": ("o", "tab:blue"), "direct": ("s", "tab:orange"), "reference": ("*", "tab:gray")}
    for mode, (marker, color) in styles.items():
        points = [r for r in usable if r["mode"] == mode]
        if points:
            ax.scatter([r["model_utility"] for r in points], [max(r["forget_quality"], 1e-300) for r in points],
                       marker=marker, color=color, label=mode, s=60 if mode == "reference" else 36)
        for r in points:
            ax.annotate(r["method"], (r["model_utility"], max(r["forget_quality"], 1e-300)),
                        textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(root: Path, results: Sequence[Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]],
                  header: str, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Write ``COMPARE.md``, ``COMPARE.json`` and ``COMPARE.png`` under ``root``; return the table rows."""
    table = rows(results, references)
    atomic_write_text(root / "COMPARE.md", markdown(table, header))
    atomic_write_json(root / "COMPARE.json", {**meta, "table": table, "cells": list(results),
                                              "references": dict(references)})
    plot(table, root / "COMPARE.png", "forget quality vs model utility: offset (o) and direct (s)")
    return table
