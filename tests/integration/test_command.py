"""The one command (``lightning-unlearn SUBCOMMAND``) and the method registry behind ``--model``."""

from __future__ import annotations

import ast
import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_unlearn.commands import SUBCOMMANDS
from lightning_unlearn.commands import main as command
from lightning_unlearn.modules import registry
from lightning_unlearn.modules.registry import UnknownMethod, resolve

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")

OPEN_UNLEARNING = {"GradAscent": "GA", "GradDiff": "GD", "IdkDPO": "DPO", "SimNPO": "SimNPO", "NPO": "NPO",
                   "RMU": "RMU", "UNDIAL": "UNDIAL", "WGA": "WGA", "SatImp": "SatImp", "CE-U": "CEU", "PDU": "PDU"}
"""open-unlearning's method names and the classes they name here."""


@pytest.mark.parametrize("name,canonical", sorted(OPEN_UNLEARNING.items()))
def test_open_unlearning_names_resolve_in_any_case(name: str, canonical: str) -> None:
    for spelling in (name, name.lower(), name.upper()):
        assert resolve(spelling).name == canonical


def test_aliases_are_the_class_own_and_modes_are_declared() -> None:
    assert resolve("KL").aliases == (), "KL subclasses GA but does not answer to GradAscent"
    assert resolve("EUL").modes == ("direct",) and resolve("RMU").modes == ("direct",)
    assert resolve("ULD").modes == ("offset",) and resolve("NPO").modes == ("offset", "direct")
    assert "SFT" not in registry.method_names() and "SFT" in registry.method_names(unlearning_only=False)
    assert {m.name for m in registry.unlearning_methods("offset")} == set(registry.method_names()) - {"EUL", "RMU"}


def test_an_unknown_name_answers_in_a_few_lines_with_the_closest() -> None:
    with pytest.raises(UnknownMethod) as err:
        resolve("NP0")
    lines = str(err.value).splitlines()
    assert len(lines) < 15 and lines[1] == "Did you mean NPO?"
    assert all(name in lines[-1] for name in registry.method_names(unlearning_only=False))


def test_cli_refuses_an_unknown_method_in_a_few_lines(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        command(["fit", "--model", "NP0", "--model.small_model", "x"])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert "NPO" in captured.err and len((captured.out + captured.err).splitlines()) < 15


@pytest.mark.parametrize("spelling", ["GradAscent", "npo", "--model=idkdpo", "ce-u"])
def test_print_config_shows_the_canonical_class(spelling: str, capsys: pytest.CaptureFixture) -> None:
    given = [spelling] if spelling.startswith("--") else ["--model", spelling]
    with pytest.raises(SystemExit):
        command(["fit", *given, "--model.small_model", "x", "--print_config"])
    name = spelling.partition("=")[2] or spelling
    expected = f"lightning_unlearn.modules.{resolve(name).name}"
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"] == expected


@pytest.mark.parametrize("name", ["GradAscent", "npo"])
def test_fit_runs_with_an_alias_or_another_case(name: str, tiny_world: dict, tmp_cwd: Path) -> None:
    cli = command(["fit", "--config", FAST, "--model", name, "--model.small_model", tiny_world["small"],
                   "--model.large_model", tiny_world["large"]])
    assert type(cli.model).__name__ == resolve(name).name and cli.trainer.global_step == 1


def test_help_lists_every_subcommand_with_one_line(capsys: pytest.CaptureFixture) -> None:
    command(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "export", "generate", "lm-eval", "compare", "memory", "fuse"):
        assert sum(line.split()[:1] == [name] for line in out.splitlines()) == 1, name
    fit_help = subprocess.run([sys.executable, str(ROOT / "main.py"), "fit", "--help"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert all(m.label() in fit_help for m in registry.all_methods()), "fit --help lists every method"


@pytest.mark.parametrize("name", [n for n in SUBCOMMANDS if n not in ("fit", "validate", "test", "predict")])
def test_each_subcommand_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        command([name, "--help"])
    assert exit_.value.code == 0
    assert f"lightning-unlearn {name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["fit", "validate", "test"])
def test_lightning_subcommands_have_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        command([name, "--help"])
    assert exit_.value.code == 0 and "--model" in capsys.readouterr().out


def test_an_unknown_subcommand_names_the_closest(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        command(["exprot"])
    assert "Did you mean export?" in capsys.readouterr().err


def test_export_refuses_what_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="a folder: give a checkpoint file"):
        command(["export", str(tmp_path), str(tmp_path / "out")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a checkpoint"):
        command(["export", str(tmp_path / "notes.txt"), str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        command(["export", str(tmp_path / "gone.ckpt"), str(tmp_path / "out")])


def test_export_a_checkpoint_then_generate_from_it_after_moving_the_runs(tiny_world: dict, tmp_cwd: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    runs = tmp_cwd / "runs"
    shutil.copytree(tiny_world["large"], runs / "models" / "large")
    shutil.copytree(tiny_world["small"], runs / "models" / "small")
    trained = command(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", "runs/models/small",
                       "--model.large_model", "runs/models/large", "--model.alpha", "0.7"])
    trained.trainer.save_checkpoint(runs / "npo.ckpt")

    target = command(["export", "runs/npo.ckpt", "runs/export"])
    manifest = json.loads((target / "offset.json").read_text())
    assert manifest["alpha"] == 0.7 and manifest["method"] == "NPO", "the checkpoint's alpha"
    source = json.loads((target / "source.json").read_text())
    assert source == {"checkpoint": "../npo.ckpt", "epoch": trained.trainer.current_epoch,
                      "global_step": trained.trainer.global_step, "alpha": 0.7, "alpha_from": "checkpoint"}
    assert "alpha 0.7 (the checkpoint's" in capsys.readouterr().out
    assert manifest["large_model"] == "../models/large" and manifest["reference_model"] == "../models/small"
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert command(["export", "runs/npo.ckpt", "runs/export2", "--alpha", "1.25"]) and json.loads(
        (runs / "export2" / "offset.json").read_text())["alpha"] == 1.25
    assert json.loads((runs / "export2" / "source.json").read_text())["alpha_from"] == "--alpha"
    printed = capsys.readouterr().out
    assert "alpha 1.25 (given)" in printed and "test --ckpt_path runs/npo.ckpt --model.alpha 1.25" in printed

    shutil.move(runs, tmp_cwd / "moved")  # the export names its models relative to itself: they move together
    capsys.readouterr()
    answers = command(["generate", "moved/export", "--prompt", "Who is Basil?", "--max-new-tokens", "4"])
    assert len(answers) == 1 and capsys.readouterr().out.strip() == answers[0].strip()


def test_the_methods_that_run_on_text_come_from_the_registry() -> None:
    """The data layer's refusal of a question-needing method on text: the command line names the methods that fit."""
    from lightning_unlearn.data.datasets import QA_ONLY_PARTS

    on_text = [m.name for m in registry.methods_without_parts(QA_ONLY_PARTS)]
    assert {"GA", "GD", "KL", "NPO", "SimNPO", "EUL"} <= set(on_text) and not {"DPO", "LLMU", "SFT"} & set(on_text)


def test_compare_takes_aliases_and_each_method_its_own_modes() -> None:
    from lightning_unlearn.compare.spec import CONFIGS, CompareSpec

    spec = CompareSpec.load(CONFIGS / "tiny.yaml")
    spec.select(["npo", "GradAscent", "rmu"])
    assert list(spec.methods) == ["NPO", "GA", "RMU"]
    assert [c.name for c in spec.cells() if c.method == "RMU"] == ["RMU-direct"], "RMU runs in direct mode only"
    with pytest.raises(ValueError, match="Did you mean NPO"):
        spec.select(["NP0"])


@pytest.mark.parametrize("extra,offset", [(["--model.large_model", "null"], False),
                                          (["--model.lora_rank", "2"], True)], ids=["direct", "lora"])
def test_export_writes_what_fit_export_dir_writes(extra: list[str], offset: bool, tiny_world: dict,
                                                  tmp_cwd: Path) -> None:
    common = ["--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
              "--model.large_model", tiny_world["large"], *extra]
    trained = command(["fit", *common, "--model.export_dir", "by_fit"])
    trained.trainer.save_checkpoint(tmp_cwd / "run.ckpt")
    target = command(["export", "run.ckpt", "by_export"])
    assert sorted(p.name for p in target.iterdir()) == sorted([*(p.name for p in (tmp_cwd / "by_fit").iterdir()),
                                                               "source.json"])
    assert (target / "offset.json").is_file() == offset
    weights = [p.name for p in target.glob("*.safetensors")]
    assert weights and all(filecmp.cmp(target / w, tmp_cwd / "by_fit" / w, shallow=False) for w in weights)
    if offset:
        assert json.loads((target / "offset.json").read_text()) == json.loads(
            (tmp_cwd / "by_fit" / "offset.json").read_text())


def test_no_library_module_imports_the_command() -> None:
    """The command sits above everything: it imports the library, never the other way round."""
    package = ROOT / "lightning_unlearn"
    importers = []
    for path in package.rglob("*.py"):
        if "commands" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # ``from ..commands import x`` and ``from .. import commands``
                names = [node.module or ""] if node.module else [a.name for a in node.names]
            else:
                continue
            if any(n == "commands" or n.startswith(("commands.", "lightning_unlearn.commands")) for n in names):
                importers.append(str(path.relative_to(package)))
    assert importers == []
