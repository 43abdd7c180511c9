"""The console without a terminal (CI, ``| tee log``): progress lines at a steady interval instead of silence, no
third-party progress bars, one results table. The commands run in-process with standard output captured, which is
not a terminal, as it is when piped."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_unlearn.cli import main
from lightning_unlearn.console import (
    INTERVAL_ENV,
    ProgressLines,
    interval_from_env,
    no_progress_bars,
    progress_settings,
)

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
TOFU = str(ROOT / "configs" / "tests" / "tofu_eval.yaml")
BAR = re.compile(r"\d+%\||it/s\]|examples/s\]")
"""What a tqdm bar leaves in a log: ``45%|████`` and its rate."""


def fit(tiny_world: dict, root: Path, *extra: str) -> None:
    main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
          "--model.large_model", tiny_world["large"], "--trainer.fast_dev_run", "false", "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
          "--trainer.default_root_dir", str(root), *extra])


def test_a_fit_without_a_terminal_prints_a_line_per_interval(tiny_world: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")  # a line at every step
    fit(tiny_world, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    steps = [line for line in lines if line.startswith("[fit] epoch")]
    assert len(steps) == 6, lines
    assert re.fullmatch(r"\[fit\] epoch 0 \(1/2\), step 1/3 \(global 1\), loss \d+\.\d{4}, elapsed \d+s", steps[0])
    assert steps[-1].startswith("[fit] epoch 1 (2/2), step 3/3 (global 6), loss ")
    assert lines[0].startswith("[fit] start: 2 epochs of 3 steps")
    assert re.fullmatch(r"\[fit\] done: 2 epochs, 6 steps in \d+s", lines[-1])
    done = [line for line in lines if line.startswith("[validation] epoch") and " done in " in line]
    assert len(done) == 2 and "forget_nll " in done[0] and "retain_nll " in done[0]


def test_a_long_interval_keeps_only_the_start_end_and_validation_lines(tiny_world: dict, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    fit(tiny_world, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [" ".join(line.split()[:3]) for line in lines] == [
        "[fit] start: 2", "[validation] epoch 0", "[validation] epoch 1", "[fit] done: 2"]


def test_test_prints_one_table_and_no_progress_bars(tiny_world: dict, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Before: Lightning's "Test metric" table after the TOFU table, and the bars of datasets' maps (lm-eval's
    tasks) and transformers' weight loading in the log."""
    main(["test", "--config", TOFU, "--model", "NPO", "--model.small_model", tiny_world["small"],
          "--model.large_model", tiny_world["large"], "--trainer.logger", "false", "--trainer.default_root_dir",
          str(tmp_path), "--data.lm_eval_tasks", "[tofu_general]", "--data.lm_eval_limit", "4"])
    printed = capsys.readouterr()
    assert printed.out.count("TOFU evaluation") == 1 and "tofu_world_facts_mc/acc" in printed.out
    assert "Test metric" not in printed.out and "DataLoader 0" not in printed.out
    assert not BAR.search(printed.out + printed.err), (printed.out + printed.err)[-2000:]
    assert re.search(r"^\[test\] done in \d+s$", printed.out, re.M)


def test_verbose_true_still_gives_lightnings_table(tiny_world: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    main(["test", "--config", TOFU, "--model", "NPO", "--model.small_model", tiny_world["small"],
          "--model.large_model", tiny_world["large"], "--trainer.logger", "false", "--trainer.default_root_dir",
          str(tmp_path), "--verbose", "true", "--data.eval_subset", "1"])
    assert "Test metric" in capsys.readouterr().out


def test_progress_settings_follow_the_console() -> None:
    bar = TQDMProgressBar()
    on = progress_settings({"enable_progress_bar": None, "callbacks": [bar]}, terminal=True)
    assert on["enable_progress_bar"] is None and on["callbacks"] == [bar]  # a terminal: Lightning's bar as usual
    off = progress_settings({"enable_progress_bar": True, "callbacks": [bar]}, terminal=False)
    assert off["enable_progress_bar"] is False
    assert len(off["callbacks"]) == 1 and isinstance(off["callbacks"][0], ProgressLines)
    quiet = progress_settings({"enable_progress_bar": False, "callbacks": None}, terminal=True)
    assert [type(c) for c in quiet["callbacks"]] == [ProgressLines]  # the bar turned off: lines, not silence
    mine = ProgressLines(5)
    assert progress_settings({"enable_progress_bar": False, "callbacks": [mine]}, terminal=False)["callbacks"] == [mine]


def test_the_interval_variable_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "12.5")
    assert interval_from_env() == 12.5
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=INTERVAL_ENV):
            interval_from_env()
    with pytest.raises(ValueError, match="every_s"):
        ProgressLines(-1)


def test_no_progress_bars_silences_tqdm_even_when_told_to_draw() -> None:
    from tqdm import tqdm

    def drawn(**kwargs: object) -> str:
        out = io.StringIO()
        for _ in tqdm(range(3), file=out, disable=False, mininterval=0, **kwargs):
            pass
        return out.getvalue()

    assert BAR.search(drawn())
    with no_progress_bars(active=True):
        assert drawn() == ""
        with no_progress_bars(active=True):  # nested: the inner block leaves the outer's state alone
            pass
        assert drawn() == ""
    assert BAR.search(drawn())  # restored
    with no_progress_bars(active=False):
        assert BAR.search(drawn())


def test_the_comparison_prints_a_line_per_cell_without_a_terminal(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from lightning_unlearn.compare import runner
    from tests.integration.test_compare import FakeMain, spec_in

    cells = spec_in(tmp_path, ["GA"]).cells()
    runner.run_cells(cells, "w", FakeMain())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[compare] cell")]
    assert [line.split(",")[0] for line in lines] == [f"[compare] cell 1/2: {cells[0].name}",
                                                      f"[compare] cell 2/2: {cells[1].name}"]
    assert "1 left after it" in lines[0] and "0 left after it" in lines[1]
