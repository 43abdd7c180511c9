"""Writing evaluation results: the summary table, plots of one metric against another (the TOFU trade-off figure is
:mod:`~lightning_unlearn.evaluation.tradeoff_plot`), and what in a summary is not finite (files are written
whole or not at all: :mod:`lightning_unlearn.atomic`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..atomic import atomic_write


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG (120 dpi) atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def _fmt(value: float | None) -> str:
    if value is None:
        return "missing"
    if not math.isfinite(value):
        return f"[bold red]{value}[/]"  # nan / inf, marked: not a measurement
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3e}"
    return f"{value:.4f}"


def summary_table(columns: Mapping[str, Mapping[str, float | None]], keys: Sequence[str], title: str,
                  missing: Mapping[str, Mapping[str, str]] | None = None) -> Table:
    """A table with one row per metric and one column per evaluated model.

    ``missing[column][key]``: the text of a cell with no value that has a reason (the retain model's forget quality
    is ``"(reference)"``: it is what the others are measured against); other empty cells read ``missing``."""
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for key in keys:
        if any(key in col for col in columns.values()):
            table.add_row(key, *(_fmt(col.get(key)) if col.get(key) is not None else
                                 (missing or {}).get(name, {}).get(key, "missing") for name, col in columns.items()))
    return table


def print_table(table: Table) -> None:
    Console().print(table)


def print_warning(message: str) -> None:
    """Print ``message`` in bold red on the console (markup in it is not interpreted)."""
    Console().print(message, style="bold red", markup=False, highlight=False)


def _finite(value: Any) -> bool:
    """A finite number (not None, not NaN or infinite): what a plot can place."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_history(points: Sequence[Mapping[str, Any]], x_key: str, y_key: str, label_key: str, path: str | Path,
                 title: str) -> Path | None:
    """One metric against another (linear axes), each point labelled by ``label_key``; saved as PNG atomically.

    Points missing either metric, or with one that is not finite, are skipped; returns None when nothing can be
    drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [p for p in points if _finite(p.get(x_key)) and _finite(p.get(y_key))]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs, ys = [p[x_key] for p in usable], [p[y_key] for p in usable]
    ax.plot(xs, ys, marker="o")
    for x, y, p in zip(xs, ys, usable):
        ax.annotate(f"{label_key}={p[label_key]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sample_values(entry: Any) -> list[float]:
    """The numbers of a report entry's per-sample values: every ``value_by_index`` under it (MIA entries nest one
    per group), each sample's numeric fields; ``None`` (a value undefined for that sample) is not a number."""
    if not isinstance(entry, Mapping):
        return []
    out: list[float] = []
    for key, value in entry.items():
        if key == "value_by_index" and isinstance(value, Mapping):
            for sample in value.values():
                fields = sample.values() if isinstance(sample, Mapping) else [sample]
                out += [float(v) for v in fields if _is_number(v)]
        elif isinstance(value, Mapping):
            out += _sample_values(value)
    return out


def non_finite(summary: Mapping[str, Any], report: Mapping[str, Any],
               sets_of: Callable[[str], Sequence[str]]) -> dict[str, Any]:
    """Which results of an evaluation are not finite: ``{"metrics": {name: n}, "sets": [...]}``.

    ``metrics`` maps each metric whose value in ``summary`` or ``report`` is NaN or infinite, or which has
    per-sample values in ``report`` that are, to its number of non-finite per-sample values (0: only the aggregate,
    as a derived metric such as model utility whose parts are NaN). ``sets`` are the evaluation sets of the metrics
    with non-finite per-sample values (``sets_of(metric)`` names them), sorted. Both are empty when everything is
    finite. ``None`` (a metric that could not be computed, e.g. forget quality without a reference) is not
    flagged: it is reported as missing, not as a number.

    Why: a model whose logits are NaN must not leave a summary of plausible numbers; this is what the summary file
    and the console say about it (:func:`non_finite_message`).
    """
    metrics: dict[str, int] = {}
    for key in dict.fromkeys([*summary, *report]):
        entry = report.get(key)
        bad = sum(1 for v in _sample_values(entry) if not math.isfinite(v))
        aggregates = [summary.get(key), entry.get("agg_value") if isinstance(entry, Mapping) else None]
        if bad or any(_is_number(v) and not math.isfinite(v) for v in aggregates):
            metrics[key] = bad
    sets = sorted({s for key, bad in metrics.items() if bad for s in sets_of(key)})
    return {"metrics": metrics, "sets": sets}


def non_finite_message(benchmark: str, found: Mapping[str, Any]) -> str | None:
    """One line saying which metrics and sets of ``found`` (from :func:`non_finite`) are not finite; ``None`` when
    none is."""
    metrics: Mapping[str, int] = found.get("metrics", {})
    if not metrics:
        return None
    parts = [f"{key} ({n} samples)" if n else key for key, n in metrics.items()]
    sets = ", ".join(found.get("sets", [])) or "none directly (derived metrics only)"
    return (f"{benchmark} evaluation: NON-FINITE results: {len(metrics)} metrics are NaN or infinite: "
            f"{', '.join(parts)}; sets with non-finite scores: {sets}. The model's logits (or a reference's values) "
            f"were not finite: these are not measurements.")
