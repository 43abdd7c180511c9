"""A sequence's outputs: ``SEQUENCE.md`` (the table), ``SEQUENCE.json`` (everything) and ``SEQUENCE.png`` (the
figure: each metric against the number of requests, one line per strategy, the all-at-once reference dashed).

A row is one strategy after ``k`` requests; ``k = 0`` is the model before any request (the same for every
strategy). TOFU columns: the forget ROUGE of the requested samples (forgotten?) and of the pending ones (not
forgotten too early?), the forget quality of the requested samples against the retain model on the same samples,
model utility, retain ROUGE and the general accuracy (mean lm-eval accuracy). MUSE: verbmem and knowmem ROUGE on
the forget set, knowmem ROUGE on the retain set, privleak, general accuracy (MUSE's evaluation sets are not cut
by request). A failed step is a row with its error. Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text
from ..compare.table import format_cell, general_accuracy
from ..evaluation.report import save_figure

TOFU_COLUMNS = (("requested_rouge", "requested forget ROUGE"), ("pending_rouge", "pending forget ROUGE"),
                ("requested_forget_quality", "requested forget quality"), ("model_utility", "model utility"),
                ("retain_Q_A_ROUGE", "retain ROUGE"), ("general_accuracy", "general accuracy"))
MUSE_COLUMNS = (("forget_verbmem_ROUGE", "forget verbmem ROUGE"), ("forget_knowmem_ROUGE", "forget knowmem ROUGE"),
                ("retain_knowmem_ROUGE", "retain knowmem ROUGE"), ("privleak", "privleak"),
                ("general_accuracy", "general accuracy"))
REFERENCE = "all_at_once"


def columns(benchmark: str) -> tuple[tuple[str, str], ...]:
    return MUSE_COLUMNS if benchmark == "MUSE" else TOFU_COLUMNS


def row(series: str, k: int, result: Mapping[str, Any] | None) -> dict[str, Any]:
    """One table row from a step's result: every column's value (None where missing), the per-fold forget ROUGE,
    the training time and the error of a failed step."""
    result = result or {}
    summary = dict(result.get("summary") or {})
    requested, pending = result.get("requested") or {}, result.get("pending") or {}
    values = {
        **{k_: summary.get(k_) for k_, _ in TOFU_COLUMNS + MUSE_COLUMNS},
        "requested_rouge": requested.get("forget_Q_A_ROUGE"),
        "pending_rouge": pending.get("forget_Q_A_ROUGE") if pending.get("samples") else None,
        "requested_forget_quality": requested.get("forget_quality"),
        "forget_quality": summary.get("forget_quality"),
        "general_accuracy": general_accuracy(summary),
    }
    ok = result.get("status") == "ok"
    return {"series": series, "k": k, "status": result.get("status", "missing"), **values,
            "fold_rouge": [f.get("forget_Q_A_ROUGE") for f in result.get("folds") or []] or None,
            "train_s": result.get("train_s"), "error": None if ok else result.get("error", "not run")}


def rows(before: Mapping[str, Any] | None, series: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """For every series, its ``k = 0`` row (the model before any request) and one row per step."""
    out = []
    for name, results in series.items():
        if before is not None:
            out.append(row(name, 0, before))
        out += [row(name, int(r.get("k", i + 1)), r) for i, r in enumerate(results)]
    return out


def markdown(table: Sequence[Mapping[str, Any]], header: str, benchmark: str = "TOFU") -> str:
    """The table as Markdown (per-fold forget ROUGE in the last column), failed steps listed below it."""
    cols = columns(benchmark)
    names = ["strategy", "requests", *(label for _, label in cols)]
    if benchmark == "TOFU":
        names.append("forget ROUGE per request")
    names.append("train time (s)")
    lines = [header, "", "| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    for r in table:
        cells = [r["series"], str(r["k"]), *(format_cell(r[k]) for k, _ in cols)]
        if benchmark == "TOFU":
            cells.append(" / ".join(format_cell(v) for v in r["fold_rouge"] or []))
        late = r.get("status") == "missing"  # --table-only before the step ran
        cells.append("not run" if late else "FAILED" if r["error"] else "" if r["train_s"] is None
                     else f"{r['train_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in table if r["error"] and r.get("status") != "missing"]
    if failed:
        lines += ["", "Failed steps:", ""] + [f"- {r['series']} after {r['k']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plot_data(table: Sequence[Mapping[str, Any]], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{series: (requests, values)}`` of one metric, in request order, skipping missing values."""
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for r in sorted(table, key=lambda r: (r["series"], r["k"])):
        if r[metric] is not None and not r["error"]:
            xs, ys = lines.setdefault(r["series"], ([], []))
            xs.append(r["k"])
            ys.append(float(r[metric]))
    return lines


def plot(table: Sequence[Mapping[str, Any]], path: Path, title: str, benchmark: str = "TOFU") -> Path | None:
    """One panel per column, the metric against the number of requests, one line per strategy (the all-at-once
    reference dashed, in black); None when no row has a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in columns(benchmark) if plot_data(table, key)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows_ = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for series, (xs, ys) in plot_data(table, key).items():
            reference = series.startswith(REFERENCE)
            ax.plot(xs, ys, marker="o", linestyle="--" if reference else "-", color="black" if reference else None,
                    label=series, linewidth=1.2, markersize=4)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("requests")
        ax.grid(True, alpha=0.3)
        if key == "requested_forget_quality":
            ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    return save_figure(fig, path)


def write_outputs(root: Path, before: Mapping[str, Any] | None, series: Mapping[str, Sequence[Mapping[str, Any]]],
                  header: str, meta: Mapping[str, Any], benchmark: str = "TOFU") -> list[dict[str, Any]]:
    """Write ``SEQUENCE.md``, ``SEQUENCE.json`` and ``SEQUENCE.png`` under ``root``; return the table rows."""
    table = rows(before, series)
    atomic_write_text(root / "SEQUENCE.md", markdown(table, header, benchmark))
    atomic_write_json(root / "SEQUENCE.json", {**meta, "benchmark": benchmark, "table": table,
                                               "before": before, "steps": {k: list(v) for k, v in series.items()}})
    plot(table, root / "SEQUENCE.png", "after each deletion request (dashed: all at once, the reference)", benchmark)
    return table
