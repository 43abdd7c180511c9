"""The command line, run in-process: every loss in offset and direct mode, configs, print_config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lightning_unlearn.cli import main
from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.modules import UnlearnModule, registry
from paper_configs import config_args, is_offset, paper_stacks

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
SPECIAL = {"LLMU", "EUL", "RMU", "ULD", "WHP"}
"""Methods fitted by tests of their own (one mode only, extra models or data): test_llmu.py, test_eul.py,
test_arith_methods.py. Every other method of the registry is fitted here in both modes."""
LOSSES = [m.name for m in registry.unlearning_methods() if m.name not in SPECIAL]


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


STACKED = ("tofu", "muse", "method")
"""Folders of configs that run only stacked (base, mode, method): tested as the stacks in ``PAPER_STACKS``."""

OTHER_COMMANDS = ("devices", "sequence")
"""Folders of configs that are not ``main.py`` configs on their own: the device overlays (GPUs, stacked last on a
paper stack: ``test_fsdp2_module.py`` resolves them) and the ``sequence`` command's (``test_sequence.py`` runs the tiny one)."""

MAIN_CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")
                      if "methods" not in (yaml.safe_load(p.read_text()) or {})
                      and p.relative_to(ROOT / "configs").parts[0] not in STACKED + OTHER_COMMANDS)
"""Every other ``main.py`` config; compare configs (a top-level ``methods``) are tested in ``test_compare.py``."""

PAPER_STACKS = paper_stacks()
"""The paper configs: a benchmark base, a mode and a method, as their headers run them (``paper_configs.py``)."""


OVERLAYS = {Path("configs/demo/unlearn_npo.yaml"): Path("configs/demo/unlearn.yaml")}
"""Configs meant to be given after another one (``--config BASE --config OVERLAY``), with their base."""


@pytest.mark.parametrize("config", MAIN_CONFIGS, ids=str)
def test_every_config_parses_and_instantiates(config: Path, tiny_world: dict, tmp_cwd: Path) -> None:
    """Each YAML under configs/ builds its trainer, model and data objects (no weights are loaded); an overlay
    on top of its base config, as the demo runs it."""
    text = yaml.safe_load((ROOT / config).read_text())
    complete = "class_path" in text.get("model", {})
    extra = [] if complete else ["--model", "GA", "--model.small_model", tiny_world["small"]]
    base = ["--config", str(ROOT / OVERLAYS[config])] if config in OVERLAYS else []
    cli = main([*base, "--config", str(ROOT / config), *extra], run=False)
    assert isinstance(cli.model, UnlearnModule) and cli.model.model is None
    assert isinstance(cli.datamodule, UnlearnDataModule)


@pytest.mark.parametrize("name", sorted(PAPER_STACKS))
def test_every_paper_stack_parses_and_instantiates(name: str, tmp_cwd: Path) -> None:
    """Each stack of a benchmark base, a mode and a method builds its trainer, model and data objects (no weights
    are loaded)."""
    cli = main(config_args(PAPER_STACKS[name]), run=False)
    assert isinstance(cli.model, UnlearnModule) and cli.model.model is None
    assert (cli.model.hparams.large_model is not None) == is_offset(name)
    assert isinstance(cli.datamodule, UnlearnDataModule)


LOGIT_METHODS = {"UNDIAL": "undial", "WGA": "wga", "SatImp": "satimp", "CEU": "ceu", "PDU": "pdu"}


@pytest.mark.parametrize("mode", ["offset", "direct"])
@pytest.mark.parametrize("name", sorted(LOGIT_METHODS))
def test_logit_method_configs_train_a_step(name: str, mode: str, tiny_world: dict, tmp_cwd: Path) -> None:
    """The TOFU config of each logit method (issue 14), on the tiny models in place of Llama-2, one step."""
    stack = PAPER_STACKS[f"tofu/{mode}/{LOGIT_METHODS[name]}"]
    large = ["--model.large_model", tiny_world["large"]] if mode == "offset" else []
    cli = main(["fit", *config_args(stack), "--model.small_model", tiny_world["small"], *large,
                "--model.large_dtype", "float32", "--model.small_dtype", "float32", "--trainer.fast_dev_run", "1",
                "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--data.batch_size", "2",
                "--data.max_length", "256", "--data.evaluation", "loss", "--data.eval_subset", "2",
                "--data.lm_eval_tasks", "[]"])
    assert type(cli.model).__name__ == name and cli.trainer.global_step == 1
    assert (cli.model.large is not None) == (mode == "offset")
    assert "train/forget_loss" in cli.trainer.callback_metrics


@pytest.mark.parametrize("name", sorted(LOGIT_METHODS))
def test_logit_methods_print_a_commented_config(name: str, capsys: pytest.CaptureFixture) -> None:
    """``python main.py fit --model X --print_config`` lists the method's hyper-parameters with their help."""
    with pytest.raises(SystemExit):
        main(["fit", "--model", name, "--model.small_model", "x", "--print_config"])
    printed = capsys.readouterr().out
    assert f"class_path: lightning_unlearn.modules.{name}" in printed
    help_line = {"UNDIAL": "# how far the true token's logit is lowered", "WGA": "# exponent of the token weight",
                 "SatImp": "# saturation exponent", "CEU": "# answer tokens at the start of each sequence",
                 "PDU": "# the constraint's bound on the retain loss"}[name]
    assert help_line in printed


def test_values_given_win_over_the_checkpoints_and_the_rest_comes_from_it(tiny_world: dict, tmp_cwd: Path) -> None:
    """Train, move the large model and delete its old folder, then test with the new path and another dtype.

    Before: LightningCLI parsed the checkpoint's hyper-parameters over the command line, so ``test`` loaded the
    large model from the deleted folder in bfloat16 (only alpha, retain_reference and max_new_tokens were exempt).
    """
    large = tmp_cwd / "large"
    shutil.copytree(tiny_world["large"], large)
    trained = main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                    "--model.large_model", str(large), "--model.beta", "0.3", "--model.alpha", "0.7",
                    "--data.seed", "5"])
    assert trained.model.hparams.large_dtype == "bfloat16"
    checkpoint = tmp_cwd / "run.ckpt"
    trained.trainer.save_checkpoint(checkpoint)
    moved = tmp_cwd / "moved" / "large"
    shutil.copytree(large, moved)
    shutil.rmtree(large)
    (tmp_cwd / "dtype.yaml").write_text("model:\n  init_args:\n    large_dtype: float32\n")

    for dtype_args in (["--model.large_dtype", "float32"], ["--config", str(tmp_cwd / "dtype.yaml")]):
        cli = main(["test", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                    "--model.large_model", str(moved), *dtype_args, "--data.max_length", "128",
                    "--ckpt_path", str(checkpoint)])
        module = cli.model
        assert module.hparams.large_model == str(moved) and module.large.name_or_path == str(moved)
        assert module.hparams.large_dtype == "float32"
        assert {p.dtype for p in module.large.parameters()} == {torch.float32}
        assert cli.datamodule.hparams.max_length == 128
        # Not given: the checkpoint's values, not the defaults (beta 0.1, alpha 1.0, seed 0).
        assert module.hparams.beta == 0.3 and module.alpha == 0.7 and cli.datamodule.hparams.seed == 5
        assert "test/forget_nll" in cli.trainer.callback_metrics


def test_print_config_shows_the_checkpoints_values_under_the_given_ones(tiny_world: dict, tmp_cwd: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    trained = main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                    "--model.large_model", tiny_world["large"], "--model.beta", "0.3"])
    trained.trainer.save_checkpoint(tmp_cwd / "run.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["test", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
              "--model.large_dtype", "float16", "--ckpt_path", str(tmp_cwd / "run.ckpt"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (model["large_model"], model["beta"], model["large_dtype"]) == (tiny_world["large"], 0.3, "float16")


OPTIMIZERS = ["AdamW", "SGD", "Adam", "RMSprop"]


def own_defaults(name: str) -> dict:
    return getattr(torch.optim, name)([torch.nn.Parameter(torch.zeros(1))]).defaults


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_chosen_optimizer_gets_its_own_defaults(name: str, tiny_world: dict, tmp_cwd: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Before: the default AdamW's values that the chosen class also takes carried over to it (SGD, Adam and
    RMSprop got weight_decay 0.01 instead of 0; RMSprop lr 0.001 instead of its 0.01)."""
    choice = [] if name == "AdamW" else ["--model.optimizer", f"torch.optim.{name}"]
    command = ["fit", "--config", FAST, "--model", "GA", "--model.small_model", tiny_world["small"], *choice]
    with pytest.raises(SystemExit):
        main([*command, "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optimizer"]
    own = own_defaults(name)
    assert resolved["class_path"] == f"torch.optim.{name}"
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in resolved["init_args"].items()} == {
        k: own[k] for k in resolved["init_args"]}
    assert resolved["init_args"]["weight_decay"] == {"AdamW": 0.01}.get(name, 0)
    assert resolved["init_args"]["lr"] == {"RMSprop": 0.01}.get(name, 0.001)

    cli = main([*command, "--model.optimizer.lr", "0.02"])  # what the user sets is kept
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is getattr(torch.optim, name)
    group = optimizer.param_groups[0]
    assert {k: group[k] for k in own} == {**own, "lr": 0.02}


def test_optimizer_values_set_in_a_config_stay_when_the_class_changes_later(tiny_world: dict, tmp_cwd: Path) -> None:
    """Values the user wrote (here in a config, for AdamW) are the user's: they follow the class chosen after."""
    (tmp_cwd / "adamw.yaml").write_text("model:\n  init_args:\n    optimizer:\n      class_path: torch.optim.AdamW\n"
                                        "      init_args:\n        lr: 1.0e-05\n")
    cli = main(["--config", FAST, "--model", "GA", "--model.small_model", tiny_world["small"], "--config",
                str(tmp_cwd / "adamw.yaml"), "--model.optimizer", "torch.optim.SGD"], run=False)
    init_args = cli.config.model.init_args.optimizer.init_args
    assert (init_args.lr, init_args.weight_decay, init_args.momentum) == (1e-5, 0, 0)
