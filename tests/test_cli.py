"""The command line, run in-process: every loss in offset and direct mode, configs, print_config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_unlearn.cli import main
from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.modules import UnlearnModule

ROOT = Path(__file__).resolve().parents[1]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
LOSSES = ["GA", "GD", "KL", "NPO", "DPO", "SimNPO"]


def model_args(world: dict, offset: bool) -> list[str]:
    return ["--model.small_model", world["small"], "--model.large_model", world["large"] if offset else "null"]


@pytest.mark.parametrize("offset", [True, False], ids=["offset", "direct"])
@pytest.mark.parametrize("loss", LOSSES)
def test_fit_runs_every_loss(loss: str, offset: bool, tiny_world: dict, tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", FAST, "--model", loss, *model_args(tiny_world, offset)])
    module = cli.model
    assert type(module).__name__ == loss
    assert (module.large is not None) == offset
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/forget_loss", "val/forget_nll", "val/retain_nll"} <= set(metrics)
    optimizer = cli.trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in module.model.parameters()}


def test_test_command_reports_forget_and_retain_loss(tiny_world: dict, tmp_cwd: Path) -> None:
    cli = main(["test", "--config", FAST, "--model", "NPO", *model_args(tiny_world, True)])
    assert {"test/forget_nll", "test/retain_nll"} <= set(cli.trainer.callback_metrics)


def test_printed_config_is_commented_and_runs(tiny_world: dict, tmp_cwd: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", FAST, "--model", "NPO", *model_args(tiny_world, True), "--print_config"])
    printed = capsys.readouterr().out
    assert "# inverse temperature" in printed and "class_path: lightning_unlearn.modules.NPO" in printed
    (tmp_cwd / "npo.yaml").write_text(printed)
    cli = main(["fit", "--config", str(tmp_cwd / "npo.yaml")])
    assert type(cli.model).__name__ == "NPO" and cli.trainer.global_step == 1


def test_unknown_loss_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model", "Nope", "--model.small_model", "x"])
    assert "Nope" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")), ids=str)
def test_every_config_parses_and_instantiates(config: Path, tiny_world: dict, tmp_cwd: Path) -> None:
    """Each YAML under configs/ builds its trainer, model and data objects (no weights are loaded)."""
    text = yaml.safe_load((ROOT / config).read_text())
    complete = "class_path" in text.get("model", {})
    extra = [] if complete else ["--model", "GA", "--model.small_model", tiny_world["small"]]
    cli = main(["--config", str(ROOT / config), *extra], run=False)
    assert isinstance(cli.model, UnlearnModule) and cli.model.model is None
    assert isinstance(cli.datamodule, UnlearnDataModule)
