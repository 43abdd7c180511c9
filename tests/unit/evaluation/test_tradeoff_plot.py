"""The trade-off figures say what a reader needs: the reference models, forget quality 0.05, the utility floor, the
selected point, and labels that can be read. Checked on the data each figure is drawn from (and the artists drawn
from it), not on pixels."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pytest

from lightning_unlearn.compare.table import figure as compare_figure
from lightning_unlearn.compare.table import rows
from lightning_unlearn.demo import figures as demo_figures
from lightning_unlearn.evaluation.selection import UtilityFloorCheckpoint, rule_floor, select
from lightning_unlearn.evaluation.tradeoff_plot import Mark, TradeoffFigure, draw, save_tradeoff, series_figure
from lightning_unlearn.sweep import figure as sweep_figure

RETAIN = 0.60
QUALITY = [1e-9, 3e-6, 2e-4, 4e-3, 0.02, 0.06, 0.11, 0.12, 0.125, 0.13, 0.128, 0.131]
UTILITY = [0.62, 0.60, 0.58, 0.57, 0.56, 0.555, 0.55, 0.549, 0.548, 0.5485, 0.547, 0.533]
FINETUNED = {"forget_quality": 2e-10, "model_utility": 0.63}


def history() -> list[dict]:
    """Twelve epochs as the demo's NPO run has them: forget quality rising, epochs 6-11 bunched together; the
    last epoch falls under the floor (0.533 < 0.9 x 0.6), so the rule must not pick it for its forget quality."""
    return [{"epoch": e, "forget_quality": q, "model_utility": u, "model_utility_vs_retain": u / RETAIN}
            for e, (q, u) in enumerate(zip(QUALITY, UTILITY))]


def points_of(ax, predicate) -> list[tuple[float, float]]:
    """The data coordinates of the scatter markers of ``ax`` whose collection satisfies ``predicate``."""
    scatters = [c for c in ax.collections if len(c.get_sizes())]  # not the shaded region
    return [tuple(map(float, xy)) for c in scatters if predicate(c) for xy in c.get_offsets()]


def test_the_epoch_figure_marks_references_line_floor_and_the_rules_pick() -> None:
    fig_data = series_figure(history(), "epoch", "t", finetuned=FINETUNED, retain_utility=RETAIN, floor=0.9)
    assert [(m.label, m.model_utility, m.forget_quality) for m in fig_data.references] == [
        ("fine-tuned", 0.63, 2e-10), ("retain model", RETAIN, 1.0)]
    assert fig_data.quality_line == 0.05
    assert fig_data.utility_floor == pytest.approx(0.9 * RETAIN)
    # the rule: best forget quality among epochs with utility >= 0.54; epoch 11 (0.131) is under the floor
    assert fig_data.selected is not None and fig_data.selected.label == "epoch 9"
    assert fig_data.selected.label == f"epoch {select(history(), 0.9)['epoch']}"
    assert [p.label for p in fig_data.points] == [f"epoch {e}" for e in range(12)]

    fig, placed = draw(fig_data)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    horizontal = [line for line in ax.lines if list(line.get_ydata()) == [0.05, 0.05]]
    vertical = [line for line in ax.lines if list(line.get_xdata()) == [pytest.approx(0.54)] * 2]
    assert horizontal and vertical
    stars = points_of(ax, lambda c: c.get_sizes()[0] == 200)
    assert stars == [(0.63, 2e-10), (RETAIN, 1.0)]
    ring = points_of(ax, lambda c: c.get_sizes()[0] == 260)
    assert ring == [(UTILITY[9], QUALITY[9])]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "selected: epoch 9" in legend and "fine-tuned (reference)" in legend
    assert any(t.startswith("forget quality 0.05") for t in legend) and any("utility floor" in t for t in legend)


def test_labels_do_not_overlap_and_the_ones_that_matter_are_all_shown() -> None:
    """Epochs 6-11 sit within 0.004 utility of each other: each label is either placed clear of the other labels
    and markers, or left out (the colour bar names the epoch); the references and the selected epoch always show."""
    fig_data = series_figure(history(), "epoch", "t", finetuned=FINETUNED, retain_utility=RETAIN, floor=0.9)
    fig, placed = draw(fig_data)
    assert {"fine-tuned", "retain model", "epoch 9", "epoch 0", "epoch 1", "epoch 2"} <= set(placed)
    for (a, box_a), (b, box_b) in combinations(placed.items(), 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"
    texts = [t for t in fig.axes[0].texts]
    assert len(texts) == len(placed)  # no label drawn that was not placed
    assert fig.axes[1].get_ylabel() == "epoch"  # the colour bar names the epochs whose labels were left out


def test_a_figure_without_a_retain_model_draws_no_floor_and_selects_nothing() -> None:
    plain = [{k: v for k, v in h.items() if k != "model_utility_vs_retain"} for h in history()]
    fig_data = series_figure(plain, "epoch", "t", floor=0.9)
    assert fig_data.references == [] and fig_data.utility_floor is None and fig_data.selected is None
    assert series_figure(history(), "epoch", "t", floor=None).selected is None  # no rule: no pick
    # the retain model's utility is recovered from the summaries' ratio
    assert series_figure(history(), "epoch", "t").references[0].model_utility == pytest.approx(RETAIN)


def test_the_sweep_figure_rings_the_chosen_alpha() -> None:
    results = [{"alpha": a, "forget_quality": q, "model_utility": u, "model_utility_vs_retain": u / RETAIN,
                "selected": a == 1.25} for a, q, u in ((1.0, 0.01, 0.58), (1.25, 0.08, 0.56), (1.5, 0.2, 0.50))]
    fig_data = sweep_figure(results, 0.9, FINETUNED)
    assert fig_data.selected is not None and fig_data.selected.value == 1.25
    assert [r.label for r in fig_data.references] == ["fine-tuned", "retain model"]
    assert fig_data.series == "alpha" and fig_data.utility_floor == pytest.approx(0.54)
    for r in results:  # the figure rings the alpha the sweep recorded, whatever it was chosen by
        r["selected"] = r["alpha"] == 1.0
    assert sweep_figure(results, 0.9).selected.label == "alpha 1"


def test_the_comparison_figure_has_references_floor_and_the_rules_pick() -> None:
    summary = lambda q, u: {"forget_quality": q, "model_utility": u}  # noqa: E731
    table = rows([{"method": "NPO", "mode": "offset", "status": "ok", "summary": summary(0.2, 0.58)},
                  {"method": "NPO", "mode": "direct", "status": "ok", "summary": summary(0.5, 0.40)},
                  {"method": "GA", "mode": "offset", "status": "ok", "summary": summary(math.nan, 0.1)}],
                 {"fine-tuned": summary(1e-8, 0.63), "retain model": summary(None, RETAIN)})
    fig_data = compare_figure(table, "t")
    assert [(m.label, m.group) for m in fig_data.points] == [("NPO offset", "offset"), ("NPO direct", "direct")]
    assert fig_data.skipped == ["GA offset"]
    assert [(m.label, m.forget_quality) for m in fig_data.references] == [("fine-tuned", 1e-8), ("retain model", 1.0)]
    assert fig_data.utility_floor == pytest.approx(0.54)
    # NPO direct forgets more but keeps 0.40 < 0.54: the rule picks NPO offset
    assert fig_data.selected is not None and fig_data.selected.label == "NPO offset"
    fig, placed = draw(fig_data)
    assert {"NPO offset", "NPO direct", "fine-tuned", "retain model"} <= set(placed)


def test_the_demo_redraws_both_figures_with_its_reference_models(tmp_path: Path) -> None:
    (tmp_path / "logs/unlearn").mkdir(parents=True)
    (tmp_path / "eval/unlearned").mkdir(parents=True)
    (tmp_path / "logs/unlearn/TOFU_HISTORY.json").write_text(json.dumps(history()))
    columns = {"fine-tuned": FINETUNED, "retain model": {"model_utility": RETAIN, "forget_quality": None}}
    without_sweep = demo_figures(tmp_path, columns)  # EUL, --quick: last.ckpt, the last epoch
    assert list(without_sweep) == [tmp_path / "tradeoff_by_epoch.png"]
    assert without_sweep[tmp_path / "tradeoff_by_epoch.png"].selected.label == "epoch 11"
    sweep = [{"alpha": a, "forget_quality": 0.1, "model_utility": 0.57, "selected": a == 1.5} for a in (1.0, 1.5)]
    (tmp_path / "eval/unlearned/ALPHA_SWEEP.json").write_text(json.dumps(sweep))
    drawn = demo_figures(tmp_path, columns)
    assert drawn[tmp_path / "tradeoff_by_epoch.png"].selected.label == "epoch 9"  # best.ckpt: the rule's pick
    alphas = drawn[tmp_path / "alpha_sweep.png"]
    assert alphas.selected.label == "alpha 1.5" and [r.label for r in alphas.references] == ["fine-tuned",
                                                                                            "retain model"]
    assert all(path.is_file() for path in drawn)


def test_the_per_epoch_figure_uses_the_runs_own_rule() -> None:
    assert rule_floor([UtilityFloorCheckpoint(floor=0.8)]) == 0.8
    assert rule_floor([]) is None


def test_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    assert save_tradeoff(TradeoffFigure("t", []), tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    one = TradeoffFigure("t", [Mark("a", 0.5, 0.0, "epoch", 0.0)])  # forget quality 0 (underflow) on a log axis
    assert save_tradeoff(one, tmp_path / "y.png") == tmp_path / "y.png"
