"""The demo ends with a model one can ask (issue 25, item 1): the selected epoch at the selected alpha written as
``runs/demo/export``, a table that names them, and next commands that work as printed, also after ``runs/`` moved.

The demo's stages are run here on the tiny pair with the test settings (``configs/tests/fast.yaml``); the full demo
is ``make demo`` (and ``tests/end_to_end/test_end_to_end.py``'s quick one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_unlearn import demo
from lightning_unlearn.commands import main as command

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")


def summary(forget_quality: float | None, privleak: float | None) -> dict:
    return {"forget_quality": forget_quality, "privleak": privleak, "model_utility": 0.9, "forget_Q_A_ROUGE": 0.5}


def write_eval(folder: Path, values: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "TOFU_SUMMARY.json").write_text(json.dumps(values))
    (folder / "TOFU_EVAL.json").write_text("{}")


@pytest.fixture
def demo_run(tiny_world: dict, tmp_cwd: Path) -> Path:
    """``runs/demo`` as the demo leaves it before its export stage: models, the unlearning's best.ckpt (one NPO step
    on the tiny pair), and an alpha sweep that selected 1.25."""
    root = tmp_cwd / "runs" / "demo"
    shutil.copytree(tiny_world["large"], root / "models" / "large_ft")
    shutil.copytree(tiny_world["small"], root / "models" / "small_ft")
    trained = command(["fit", "--config", FAST, "--model", "NPO", "--model.large_model", "runs/demo/models/large_ft",
                       "--model.small_model", "runs/demo/models/small_ft"])
    trained.trainer.save_checkpoint(root / "logs/unlearn/checkpoints/best.ckpt")
    sweep = [{"alpha": a, "selected": a == 1.25} for a in demo.ALPHAS]
    (root / "eval/unlearned").mkdir(parents=True)
    (root / "eval/unlearned/ALPHA_SWEEP.json").write_text(json.dumps(sweep))
    write_eval(root / "eval/unlearned/alpha_1.25", summary(0.4, 95.0))
    write_eval(root / "eval/finetuned", summary(1e-8, -100.0))
    write_eval(root / "eval/retain", summary(None, None))
    return root


def test_the_export_stage_records_the_selected_epoch_and_alpha(demo_run: Path, capsys: pytest.CaptureFixture) -> None:
    stage = demo.export_stage(Path("runs/demo"), "NPO", quick=False)
    assert stage.args == ["export", "runs/demo/logs/unlearn/checkpoints/best.ckpt", "runs/demo/export", "--alpha",
                          "1.25"], "the alpha the sweep selected, not the checkpoint's (1.0)"
    assert demo.run_stage(stage, {"eval_unlearned": "k"}, force=False)
    assert not demo.run_stage(stage, {"eval_unlearned": "k"}, force=False), "a second run skips it"
    export = demo_run / "export"
    assert json.loads((export / "offset.json").read_text())["alpha"] == 1.25
    assert not (export / ".stage").exists(), "the export holds only what the export command writes"
    selected = demo.export_summary(export)
    assert selected["epoch"] is not None and selected["alpha"] == 1.25 and selected["alpha_from"] == "--alpha"

    columns = demo.report(Path("runs/demo"), retain_rows=40)
    printed = capsys.readouterr().out
    label = f"unlearned (NPO offset, epoch={selected['epoch']}, alpha=1.25)"
    assert "unlearned" in columns and label not in columns, "the returned columns keep the plain names"
    assert "alpha=1.25" in printed and f"epoch={selected['epoch']}" in printed
    forget_quality_row = next(line for line in printed.splitlines() if "forget_quality" in line)
    assert "(reference)" in forget_quality_row and "missing" not in forget_quality_row
    assert json.loads((demo_run / "DEMO_SUMMARY.json").read_text())["selected"]["alpha"] == 1.25


def test_the_printed_next_commands_work_verbatim_after_moving_runs(demo_run: Path, tmp_cwd: Path,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    demo.run_stage(demo.export_stage(Path("runs/demo"), "NPO", quick=False), {"eval_unlearned": "k"}, force=False)
    elsewhere = tmp_path_factory.mktemp("moved")
    shutil.move(tmp_cwd / "runs", elsewhere / "runs")  # the whole runs folder moves; the export's paths follow
    os.chdir(elsewhere)
    bin_dir = elsewhere / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "lightning-unlearn"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "main.py"}" "$@"\n')
    launcher.chmod(0o755)
    lines = demo.next_steps(Path("runs/demo"), prog="lightning-unlearn")
    commands = [line for line in lines if not line.startswith("#")]
    assert [c.split()[1] for c in commands] == ["generate", "lm-eval", "test"]
    forget, retain = demo.demo_questions()
    assert forget["question"] in lines[1] or forget["question"].replace("'", "'\"'\"'") in lines[1]
    assert "--model.alpha 1.25" in commands[2]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    for line in (commands[0], commands[1] + " --limit 4", commands[2]):
        result = subprocess.run(["bash", "-e", "-c", line], cwd=elsewhere, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{line}\n{(result.stdout + result.stderr)[-3000:]}"
    assert (elsewhere / "runs/demo/eval_export").is_dir(), "the test command writes where it says"


def test_program_is_a_command_that_runs_here() -> None:
    prog = demo.program()
    assert prog == "lightning-unlearn" or Path(prog.split()[0]).exists()
