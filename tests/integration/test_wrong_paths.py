"""A path of the wrong kind gets one message naming what to give, not a traceback from deep inside a loader: an export
folder or a missing file as ``--ckpt_path``, a checkpoint or a run folder where an export is expected, a file or a
missing local folder as a model, an export whose large model moved (issue 25, item 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lightning_unlearn.commands import main as command

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")


@pytest.fixture(scope="module")
def run(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``models/`` (the tiny pair), ``npo.ckpt`` (one NPO step) and ``export`` (its export)."""
    root = tmp_path_factory.mktemp("wrong_paths")
    shutil.copytree(tiny_world["large"], root / "models" / "large")
    shutil.copytree(tiny_world["small"], root / "models" / "small")
    trained = command(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", str(root / "models/small"),
                       "--model.large_model", str(root / "models/large")])
    trained.trainer.save_checkpoint(root / "npo.ckpt")
    command(["export", str(root / "npo.ckpt"), str(root / "export"), "--alpha", "1.25"])
    return root


def model_args(run: Path) -> list[str]:
    return ["--config", FAST, "--model", "NPO", "--model.small_model", str(run / "models/small"),
            "--model.large_model", str(run / "models/large")]


def test_an_export_as_ckpt_path_names_the_command_that_evaluates_it(run: Path) -> None:
    with pytest.raises(ValueError, match="an export folder, not a checkpoint file") as err:
        command(["test", *model_args(run), "--ckpt_path", str(run / "export")])
    assert "test --ckpt_path" in str(err.value) and "--model.alpha 1.25" in str(err.value), \
        "source.json names the checkpoint and alpha the export came from"
    with pytest.raises(ValueError, match="a folder: give a checkpoint file"):
        command(["test", *model_args(run), "--ckpt_path", str(run / "models")])


def test_a_missing_or_foreign_ckpt_path(run: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        command(["test", *model_args(run), "--ckpt_path", str(run / "gone.ckpt")])
    with pytest.raises(ValueError, match="not a checkpoint written by fit"):
        command(["test", *model_args(run), "--ckpt_path", str(run / "export" / "offset.json")])


def test_a_checkpoint_or_run_folder_given_to_generate_says_how_to_export_it(run: Path) -> None:
    with pytest.raises(SystemExit, match=r"is a file, not an export.*lightning-unlearn export .*npo\.ckpt OUT"):
        command(["generate", str(run / "npo.ckpt"), "--prompt", "Who?"])
    with pytest.raises(SystemExit, match=r"It holds the export .*export: give that"):
        command(["generate", str(run), "--prompt", "Who?"])


def test_a_moved_large_model_is_named_with_the_flag_that_finds_it(run: Path, tmp_path: Path) -> None:
    shutil.copytree(run, tmp_path / "run")
    moved = tmp_path / "run" / "export"
    manifest = json.loads((moved / "offset.json").read_text())
    assert manifest["large_model"] == "../models/large", "written relative to the export"
    shutil.rmtree(tmp_path / "run" / "models" / "large")
    with pytest.raises(SystemExit, match="large model .* nothing is there .*--large-model PATH"):
        command(["generate", str(moved), "--prompt", "Who?"])
    answers = command(["generate", str(moved), "--prompt", "Who?", "--max-new-tokens", "2",
                       "--large-model", str(run / "models/large")])
    assert len(answers) == 1


@pytest.mark.parametrize("flag", ["small_model", "large_model"])
def test_a_model_path_that_is_a_file_missing_or_an_export(flag: str, run: Path, tmp_cwd: Path) -> None:
    args = model_args(run)
    with pytest.raises(ValueError, match=f"--model.{flag} is .*npo.ckpt', a file: .*test --ckpt_path"):
        command(["fit", *args, f"--model.{flag}", str(run / "npo.ckpt")])
    (tmp_cwd / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=f"--model.{flag} is 'runs/gone': no such folder"):
        command(["fit", *args, f"--model.{flag}", "runs/gone"])  # a local path: no hub lookup, no tokenizer error
    with pytest.raises(ValueError, match=r"an offset export .*Evaluate it on TOFU with `lightning-unlearn test "
                                         r"--ckpt_path .*npo.ckpt --model.alpha 1.25"):
        command(["test", *args, f"--model.{flag}", str(run / "export")])
