"""What a user sees first: a config printed without model paths, the run's mode, and expected errors in a few lines.

Before: ``fit --model NPO --print_config`` exited 2 (``small_model`` required); ``fit`` without a large model ran
direct unlearning without a word; a wrong split or a ULD run without a large model ended in 40-70 lines of
traceback (or jsonargparse's usage and Namespace dump).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_unlearn.cli import main
from lightning_unlearn.commands import TRACEBACK_ENV

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")


def command(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` in a fresh process (the short errors are for a command line, not in-process calls)."""
    environ = {k: v for k, v in os.environ.items() if k != TRACEBACK_ENV}
    environ.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


def test_print_config_needs_no_model_paths_and_its_file_runs(tiny_world: dict, tmp_cwd: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """The README's ``fit --model NPO --print_config > npo.yaml``, then a fit of that file with the model paths."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model", "NPO", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"].endswith("NPO")
    assert config["model"]["init_args"]["small_model"] is None
    (tmp_cwd / "npo.yaml").write_text(printed)
    cli = main(["fit", "--config", "npo.yaml", "--model.small_model", tiny_world["small"],
                "--model.large_model", tiny_world["large"], "--trainer.fast_dev_run", "1",
                "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--data.eval_subset", "4"])
    assert cli.trainer.global_step == 1
    assert cli.model.large is not None


def test_fit_without_a_small_model_names_the_flag(tmp_path: Path) -> None:
    result = command(["fit", "--model", "NPO"], tmp_path)
    assert result.returncode == 2
    assert "--model.small_model" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4, result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr


@pytest.mark.parametrize("offset", [True, False], ids=["offset", "direct"])
def test_the_mode_is_printed_at_the_start(offset: bool, tiny_world: dict, tmp_cwd: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    large = tiny_world["large"] if offset else "null"
    main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
          "--model.large_model", large, "--model.alpha", "1.25"])
    err = capsys.readouterr().err.splitlines()
    small = tiny_world["small"]
    expected = (f"offset: large={tiny_world['large']}, small={small}, reference={small}, alpha=1.25" if offset
                else f"direct: model={small}")
    assert err.count(expected) == 1, err


@pytest.mark.parametrize("case", ["split", "uld"])
def test_an_expected_error_is_a_few_lines_naming_what_to_change(case: str, tiny_world: dict, tmp_path: Path) -> None:
    args = {"split": ["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                      "--data.forget_split", "forget_nope"],
            "uld": ["fit", "--config", FAST, "--model", "ULD", "--model.small_model", tiny_world["small"]]}[case]
    named = {"split": "forget_nope", "uld": "--model.large_model"}[case]
    result = command(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Namespace(" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and named in error[0], result.stderr
    assert len(result.stderr.strip().splitlines()) <= 8, result.stderr  # Lightning's few notices, then the error
    traced = command(args, tmp_path, **{TRACEBACK_ENV: "1"})
    assert traced.returncode != 0 and "Traceback" in traced.stderr
