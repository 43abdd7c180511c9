"""Writing evaluation results: atomic JSON files, the summary table, and plots."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Have ``write(tmp)`` fill a temporary file beside ``path``, then ``os.replace`` it onto ``path``, so a crash
    never leaves half a file (the temporary file is removed when ``write`` raises). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write JSON (indented, NaN allowed) atomically (:func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True))


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
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3e}"
    return f"{value:.4f}"


def summary_table(columns: Mapping[str, Mapping[str, float | None]], keys: Sequence[str], title: str) -> Table:
    """A table with one row per metric and one column per evaluated model."""
    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for key in keys:
        if any(key in col for col in columns.values()):
            table.add_row(key, *(_fmt(col.get(key)) for col in columns.values()))
    return table


def print_table(table: Table) -> None:
    Console().print(table)


def plot_tradeoff(points: Sequence[Mapping[str, float | None]], label_key: str, path: str | Path, title: str) -> Path | None:
    """Scatter forget quality (log scale) against model utility, each point labelled; saved as PNG.

    Points missing either number are skipped; returns None when nothing can be drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [p for p in points if p.get("forget_quality") is not None and p.get("model_utility") is not None]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [p["model_utility"] for p in usable]
    ys = [max(p["forget_quality"], 1e-300) for p in usable]
    ax.plot(xs, ys, marker="o")
    for x, y, p in zip(xs, ys, usable):
        ax.annotate(f"{label_key}={p[label_key]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=min(min(ys) / 10, 0.1), top=2)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_history(points: Sequence[Mapping[str, Any]], x_key: str, y_key: str, label_key: str, path: str | Path,
                 title: str) -> Path | None:
    """One metric against another (linear axes), each point labelled by ``label_key``; saved as PNG atomically.

    Points missing either metric are skipped; returns None when nothing can be drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [p for p in points if p.get(x_key) is not None and p.get(y_key) is not None]
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
