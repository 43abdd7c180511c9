"""One place per run: without ``trainer.default_root_dir`` a run writes under ``runs/<method>`` (logs, config,
result files, checkpoints), never into the folder the command was started from or ``./lightning_logs``; a
printed config names that folder; W&B's logger, left without a folder, writes into it too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_unlearn.cli import main

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _models(world: dict) -> list[str]:
    return ["--model.small_model", world["small"], "--model.large_model", world["large"]]


def test_a_fast_dev_run_fit_writes_its_results_under_runs_method(tiny_world: dict, tmp_cwd: Path) -> None:
    main(["fit", "--config", FAST, "--model", "NPO", *_models(tiny_world), "--data.evaluation", "tofu",
          "--data.eval_subset", "2", "--model.max_new_tokens", "4"])
    written = _files(tmp_cwd)
    assert written and all(f.startswith("runs/npo/") for f in written), written
    assert "runs/npo/TOFU_HISTORY.json" in written, "fast_dev_run has no logger: the run folder itself"


def test_a_logged_run_keeps_logs_config_and_results_in_its_version_folder(tiny_world: dict, tmp_cwd: Path) -> None:
    main(["fit", "--config", FAST, "--model", "NPO", *_models(tiny_world), "--trainer.fast_dev_run", "false",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.logger", "true",
          "--trainer.enable_checkpointing", "false", "--data.evaluation", "tofu", "--data.eval_subset", "2",
          "--model.max_new_tokens", "4"])
    written = _files(tmp_cwd)
    assert all(f.startswith("runs/npo/lightning_logs/version_0/") for f in written), written
    assert {"runs/npo/lightning_logs/version_0/config.yaml",
            "runs/npo/lightning_logs/version_0/TOFU_HISTORY.json"} <= written
    saved = yaml.safe_load((tmp_cwd / "runs/npo/lightning_logs/version_0/config.yaml").read_text())
    assert saved["trainer"]["default_root_dir"] == "runs/npo"


def test_a_given_folder_is_kept_and_the_printed_config_names_the_default(tiny_world: dict, tmp_cwd: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    cli = main(["--config", FAST, "--model", "GradAscent", *_models(tiny_world),
                "--trainer.default_root_dir", "elsewhere"], run=False)
    assert cli.trainer.default_root_dir == "elsewhere"
    with pytest.raises(SystemExit):
        main(["fit", "--config", FAST, "--model", "simnpo", *_models(tiny_world), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["default_root_dir"] == "runs/simnpo"


def test_a_wandb_logger_without_a_folder_writes_into_the_run_folder(tiny_world: dict, tmp_cwd: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main(["--config", FAST, "--model", "NPO", *_models(tiny_world), "--trainer.logger",
                "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.project", "t",
                "--trainer.fast_dev_run", "false"], run=False)
    assert cli.trainer.loggers[0].save_dir == "runs/npo"
