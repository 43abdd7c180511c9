"""The forget quality vs model utility figure: did the model forget, and did it keep the rest?

One figure answers both questions only if it shows what the numbers are measured against. Every trade-off figure
of the package (per epoch, per alpha, per method) is built in two steps:

1. a :class:`TradeoffFigure`, plain data: the measured points, the reference models (the fine-tuned model, which
   has not forgotten, and the retain model, which never saw the forget set), the forget quality line at 0.05, the
   utility floor of the selection rule and the selected point. Tests check this, not pixels.
2. :func:`draw` turns it into a matplotlib figure, :func:`save_tradeoff` into a PNG (atomically).

Forget quality is a p-value (the KS test of TOFU's truth ratios against the retain model's, Maini et al. 2024), so
its axis is logarithmic; 0.05 is the usual line above which the forget set's truth ratios cannot be told from
the retain model's. The retain model's own forget quality is 1 by definition (its truth ratios against
themselves: KS statistic 0), which is where its star is drawn even when its summary has none. The utility floor is
``floor`` x the retain model's model utility, the constraint of the selection rule
(:func:`~lightning_unlearn.evaluation.selection.select`); the selected point is the one that rule picks (or the
one a caller says was picked). Labels are placed where they overlap neither another label nor a marker; a label
that finds no free place is left out (an epoch's colour still names it on the colour bar).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import save_figure
from .selection import select

QUALITY_LINE = 0.05
"""Forget quality (KS p-value) above which the forget set is taken as forgotten (the usual 5% level)."""
FLOOR = 0.9
"""The selection rule's default floor on model utility / the retain model's (``UtilityFloorCheckpoint``)."""
SMALLEST = 1e-300
"""Forget quality 0 (a p-value that underflowed) is drawn here: a log axis has no 0."""


@dataclass(frozen=True)
class Mark:
    """One point of the figure: ``model_utility`` (x, in [0, 1]) and ``forget_quality`` (y, a p-value)."""

    label: str
    model_utility: float
    forget_quality: float
    group: str = ""
    """What kind of point: ``"epoch"``, ``"alpha"``, ``"offset"``, ``"direct"``, or ``"reference"``."""
    value: float | None = None
    """The point's number in its series (the epoch, the alpha), for the colour scale."""

    def __post_init__(self) -> None:  # a log axis has no 0: an underflowed p-value is drawn at SMALLEST
        object.__setattr__(self, "forget_quality", max(self.forget_quality, SMALLEST))


@dataclass
class TradeoffFigure:
    """Everything a trade-off figure draws, as data (see the module docstring)."""

    title: str
    points: list[Mark]
    references: list[Mark] = field(default_factory=list)
    quality_line: float = QUALITY_LINE
    utility_floor: float | None = None
    """The floor as a model utility (``floor_ratio`` x the retain model's); None without the retain model's."""
    floor_ratio: float | None = None
    selected: Mark | None = None
    selected_caption: str = "selected"
    """How the legend names the selected point (a comparison marks the rule's pick, it selects nothing)."""
    series: str = ""
    """The name of the series' number (``"epoch"``, ``"alpha"``); empty for points of different kinds."""
    skipped: list[str] = field(default_factory=list)
    """Labels of the points that are not drawn: a missing, NaN or infinite forget quality or model utility."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drawable(summary: Mapping[str, Any]) -> bool:
    return _finite(summary.get("forget_quality")) and _finite(summary.get("model_utility"))


def _mark(label: str, summary: Mapping[str, Any], group: str, value: float | None = None) -> Mark:
    return Mark(label, float(summary["model_utility"]), max(float(summary["forget_quality"]), SMALLEST), group, value)


def retain_utility_of(summaries: Sequence[Mapping[str, Any]]) -> float | None:
    """The retain model's model utility, recovered from summaries that hold both ``model_utility`` and
    ``model_utility_vs_retain`` (the latter is the former divided by the retain model's); None when none does."""
    for s in summaries:
        utility, ratio = s.get("model_utility"), s.get("model_utility_vs_retain")
        if _finite(utility) and _finite(ratio) and ratio > 0:
            return float(utility) / float(ratio)
    return None


def reference_marks(finetuned: Mapping[str, Any] | None, retain_utility: float | None) -> list[Mark]:
    """The fine-tuned model (where its summary has both numbers) and the retain model at forget quality 1."""
    marks = []
    if finetuned is not None and _drawable(finetuned):
        marks.append(_mark("fine-tuned", finetuned, "reference"))
    if _finite(retain_utility):
        marks.append(Mark("retain model", float(retain_utility), 1.0, "reference"))
    return marks


def series_figure(summaries: Sequence[Mapping[str, Any]], key: str, title: str,
                  finetuned: Mapping[str, Any] | None = None, retain_utility: float | None = None,
                  floor: float | None = FLOOR, selected: Mapping[str, Any] | None = None) -> TradeoffFigure:
    """A figure of one series: the epochs of a ``TOFU_HISTORY.json`` (``key="epoch"``) or the alphas of a sweep.

    Args:
        summaries: TOFU summaries, each with its ``key`` (a number) and ideally ``forget_quality`` and
            ``model_utility``; those missing either are listed in ``skipped``.
        finetuned: the fine-tuned model's summary, drawn as a reference when it has both numbers.
        retain_utility: the retain model's model utility; recovered from ``summaries`` when None
            (:func:`retain_utility_of`). Without it there is no retain star and no utility floor.
        floor: the selection rule's floor (a ratio to the retain model's utility); None draws no floor line.
        selected: the summary that was selected (one of ``summaries``); when None it is the one the rule picks
            with ``floor`` (:func:`~lightning_unlearn.evaluation.selection.select`), if the summaries carry
            ``model_utility_vs_retain``.
    """
    if retain_utility is None:
        retain_utility = retain_utility_of(summaries)
    points = [_mark(f"{key} {s[key]:g}", s, key, float(s[key])) for s in summaries if _drawable(s)]
    skipped = [f"{key} {s[key]:g}" for s in summaries if not _drawable(s)]
    if selected is None and floor is not None and summaries and any(
            s.get("model_utility_vs_retain") is not None for s in summaries):
        selected = select(list(summaries), floor)
    chosen = None
    if selected is not None and _drawable(selected):
        chosen = next((p for p in points if p.value == float(selected[key])), None)
    floor_at = floor * retain_utility if floor is not None and _finite(retain_utility) else None
    return TradeoffFigure(title, points, reference_marks(finetuned, retain_utility), utility_floor=floor_at,
                          floor_ratio=floor if floor_at is not None else None, selected=chosen, series=key,
                          skipped=skipped)


# --- drawing ---------------------------------------------------------------------------------------------------

COLOURS = {"offset": "tab:blue", "direct": "tab:orange", "fine-tuned": "tab:red", "retain model": "tab:green"}
MARKERS = {"offset": "o", "direct": "s"}
_OFFSETS = [(7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"), (-7, -5, "right", "top"),
            (0, 9, "center", "bottom"), (0, -9, "center", "top"), (14, 0, "left", "center"),
            (-14, 0, "right", "center"), (18, 16, "left", "bottom"), (-18, -16, "right", "top"),
            (18, -16, "left", "top"), (-18, 16, "right", "bottom"), (0, 24, "center", "bottom"),
            (0, -24, "center", "top")]
"""Where a label may go around its point, in typographic points (x, y, alignment), nearest first."""


def _place_labels(fig: Any, ax: Any, marks: Sequence[Mark], always: Sequence[str] = (),
                  lines: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """Annotate each mark at the first place of :data:`_OFFSETS` that stays inside the axes and overlaps no
    marker, no reference line (``lines``: ``("h", y)`` or ``("v", x)`` in data units) and no label placed before;
    return ``{label: its box in display units}``. A label of ``always`` that finds no free place is still drawn at
    its first place."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    r = 5 * fig.dpi / 72  # a marker's half width, in pixels
    dots = []
    for m in marks:
        x, y = ax.transData.transform((m.model_utility, m.forget_quality))
        dots.append((x - r, y - r, x + r, y + r))
    for kind, at in lines:  # a thin band along each line: a label there would be struck through
        x, y = ax.transData.transform((at, 1.0) if kind == "v" else (ax.get_xlim()[0], at))
        dots.append((x - 2, inside.y0, x + 2, inside.y1) if kind == "v" else (inside.x0, y - 2, inside.x1, y + 2))
    taken: list[tuple[float, float, float, float]] = []
    placed: dict[str, Any] = {}

    def overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    def annotate(mark: Mark, dx: float, dy: float, ha: str, va: str) -> Any:
        far = abs(dx) + abs(dy) > 20  # a label away from its point gets a leader line to it
        return ax.annotate(mark.label, (mark.model_utility, mark.forget_quality), textcoords="offset points",
                           xytext=(dx, dy), ha=ha, va=va, fontsize=8,
                           arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6} if far else None)

    order = sorted(range(len(marks)), key=lambda i: marks[i].label not in always)  # those that must show go first
    for i in order:
        mark = marks[i]
        for dx, dy, ha, va in _OFFSETS:
            text = annotate(mark, dx, dy, ha, va)
            box = text.get_window_extent(renderer)
            b = (box.x0, box.y0, box.x1, box.y1)
            fits = box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1
            clear = not any(overlaps(b, t) for t in taken) and not any(
                overlaps(b, d) for j, d in enumerate(dots) if j != i)
            if fits and clear:
                taken.append(b)
                placed[mark.label] = box
                break
            text.remove()
        else:
            if mark.label in always:
                box = annotate(mark, *_OFFSETS[0]).get_window_extent(renderer)
                taken.append((box.x0, box.y0, box.x1, box.y1))
                placed[mark.label] = box
    return placed


def draw(figure: TradeoffFigure) -> tuple[Any, dict[str, Any]]:
    """The matplotlib figure of ``figure`` and its placed labels (``{label: box in display units}``).

    Series points are joined in order and coloured by their number (a colour bar names it when labels may be
    left out); points of different kinds (a comparison) are circles (offset) and squares (direct). The region
    above the forget quality line and right of the utility floor (forgotten and kept) is shaded green.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    everything = [*figure.points, *figure.references]
    xs = [m.model_utility for m in everything] + ([figure.utility_floor] if figure.utility_floor is not None else [])
    ys = [m.forget_quality for m in everything] + [figure.quality_line]
    ax.set_yscale("log")
    span = max(max(xs) - min(xs), 0.05)
    ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.12 * span)  # a margin: a point at utility 0 shows whole
    ax.set_ylim(min(ys) / 8, 4.0)
    series = [m for m in figure.points if m.group not in MARKERS]
    if series:
        ax.plot([m.model_utility for m in series], [m.forget_quality for m in series], color="0.7", lw=1, zorder=1)
        values = [m.value for m in series]
        dots = ax.scatter([m.model_utility for m in series], [m.forget_quality for m in series], c=values,
                          cmap="viridis", s=36, zorder=3, label=f"{figure.series or 'point'} (colour)")
        if len(series) > 4:
            fig.colorbar(dots, ax=ax, label=figure.series, pad=0.01)
    for group, marker in MARKERS.items():
        group_marks = [m for m in figure.points if m.group == group]
        if group_marks:
            ax.scatter([m.model_utility for m in group_marks], [m.forget_quality for m in group_marks],
                       marker=marker, color=COLOURS[group], s=40, zorder=3, label=group)
    for ref in figure.references:
        ax.scatter([ref.model_utility], [ref.forget_quality], marker="*", s=200, color=COLOURS.get(ref.label, "0.3"),
                   edgecolor="black", linewidth=0.5, zorder=4, label=f"{ref.label} (reference)")
    ax.axhline(figure.quality_line, color="tab:red", ls="--", lw=1,
               label=f"forget quality {figure.quality_line:g} (forgotten above)")
    if figure.utility_floor is not None:
        ax.axvline(figure.utility_floor, color="tab:purple", ls=":", lw=1.5,
                   label=f"utility floor: {figure.floor_ratio:g} x retain model's")
        right, top = ax.get_xlim()[1], ax.get_ylim()[1]
        ax.fill_between([figure.utility_floor, right], figure.quality_line, top, color="tab:green", alpha=0.07,
                        zorder=0, label="forgotten and kept")
    if figure.selected is not None:
        ax.scatter([figure.selected.model_utility], [figure.selected.forget_quality], s=260, facecolor="none",
                   edgecolor="crimson", linewidth=2, zorder=5, label=f"{figure.selected_caption}: {figure.selected.label}")
    ax.set_xlabel("model utility (higher: kept more of the rest)")
    ax.set_ylabel("forget quality (KS p-value, log; higher: forgot)")
    ax.set_title(figure.title)
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)  # below the axes: hides no point
    fig.canvas.draw()
    must = [m.label for m in figure.references] + ([figure.selected.label] if figure.selected else [])
    if len(series) <= 4:  # no colour bar names the points: every label must show
        must += [m.label for m in figure.points]
    lines = [("h", figure.quality_line)] + ([("v", figure.utility_floor)] if figure.utility_floor is not None else [])
    placed = _place_labels(fig, ax, everything, must, lines)
    return fig, placed


def save_tradeoff(figure: TradeoffFigure, path: str | Path) -> Path | None:
    """Draw ``figure`` and save it as PNG atomically; None (nothing written) when it has no point to draw."""
    if not figure.points:
        return None
    fig, _ = draw(figure)
    return save_figure(fig, path)
