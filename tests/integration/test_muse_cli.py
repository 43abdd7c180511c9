"""The MUSE commands on a tiny local folder in MUSE's layout: every text loss in offset and direct mode, the result
files, the retain reference, the per-epoch history, the logit cache on text, and each MUSE paper stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.cli import main
from lightning_unlearn.data.muse_world import build_muse_world
from lightning_unlearn.evaluation.muse import MuseReference
from paper_configs import config_args, is_offset, paper_stacks

ROOT = Path(__file__).resolve().parents[2]
MUSE_TEST = str(ROOT / "configs" / "tests" / "muse.yaml")
MUSE_STACKS = {name: stack for name, stack in paper_stacks().items() if name.startswith("muse/")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One in-context example per knowmem set: the tiny test models have 512 positions."""
    return str(build_muse_world(tmp_path_factory.mktemp("muse") / "world", icl=1))


def args(tiny: dict, world: str, offset: bool = True) -> list[str]:
    return ["--data.dataset", world, "--model.small_model", tiny["small"],
            "--model.large_model", tiny["large"] if offset else "null"]


@pytest.mark.parametrize("loss,offset", [("NPO", True), ("NPO", False), ("GA", True), ("GD", False), ("KL", True),
                                         ("SimNPO", False), ("EUL", False)])
def test_fit_unlearns_text_with_every_text_loss(loss: str, offset: bool, tiny_world: dict, world: str,
                                                tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", MUSE_TEST, "--model", loss, *args(tiny_world, world, offset)])
    assert cli.trainer.global_step == 1
    assert {"train/loss", "val/forget_verbmem_ROUGE", "val/retain_knowmem_ROUGE"} <= set(cli.trainer.callback_metrics)


@pytest.mark.parametrize("loss,needs", [("DPO", "a refusal answer"), ("LLMU", "random answers")])
def test_question_answer_losses_are_refused_on_text(loss: str, needs: str, tiny_world: dict, world: str,
                                                    tmp_cwd: Path) -> None:
    with pytest.raises(ValueError, match=f"needs {needs}.*raw text, which has no questions"):
        main(["fit", "--config", MUSE_TEST, "--model", loss, *args(tiny_world, world)])


def test_test_writes_muse_files_and_privleak_against_a_reference(tiny_world: dict, world: str, tmp_cwd: Path) -> None:
    common = ["test", "--config", MUSE_TEST, *args(tiny_world, world), "--trainer.fast_dev_run", "false",
              "--data.eval_subset", "3"]
    main([*common, "--trainer.default_root_dir", "ref"])
    summary = json.loads((tmp_cwd / "ref" / "MUSE_SUMMARY.json").read_text())
    report = json.loads((tmp_cwd / "ref" / "MUSE_EVAL.json").read_text())
    assert {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "extraction_strength",
            "mia_min_k"} <= set(summary) and summary["privleak"] is None
    assert set(report["forget_verbmem_ROUGE"]["value_by_index"]) == {"0", "1", "2"}
    assert "generation" in report["retain_knowmem_ROUGE"]["value_by_index"]["0"]
    main([*common, "--trainer.default_root_dir", "again", "--model.retain_reference", "ref/MUSE_EVAL.json"])
    again = json.loads((tmp_cwd / "again" / "MUSE_SUMMARY.json").read_text())
    assert again["privleak"] == pytest.approx(0.0), "the same model as its reference leaks as much as it"


def test_fit_evaluates_every_epoch_and_keeps_the_best(tiny_world: dict, world: str, tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", MUSE_TEST, *args(tiny_world, world), "--trainer.fast_dev_run", "false",
                "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1", "--trainer.num_sanity_val_steps", "0",
                "--trainer.default_root_dir", "run", "--model.logit_cache", "memory",
                "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/forget_verbmem_ROUGE",
                "--trainer.callbacks.mode", "min"])
    history = json.loads((tmp_cwd / "run" / "MUSE_HISTORY.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1] and all("forget_verbmem_ROUGE" in h for h in history)
    assert (tmp_cwd / "run" / "tradeoff_by_epoch.png").is_file()
    assert cli.trainer.checkpoint_callback.best_model_path
    logged = {k.removeprefix("val/") for k in cli.trainer.logged_metrics if k.startswith("val/")}
    assert cli.model.evaluation.plan(True).logged == logged, "the setup check of monitors knows what is logged"


def test_a_monitor_on_muse_rouge_without_generation_is_refused_at_setup(tiny_world: dict, world: str,
                                                                       tmp_cwd: Path) -> None:
    cli = main(["--config", MUSE_TEST, *args(tiny_world, world), "--trainer.fast_dev_run", "false",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--model.max_new_tokens", "0",
                "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor", "val/forget_verbmem_ROUGE"],
               run=False)
    with pytest.raises(ValueError, match="model.max_new_tokens is 0"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_evaluation_muse_needs_a_muse_dataset(tiny_world: dict, tmp_cwd: Path) -> None:
    with pytest.raises(ValueError, match="data.evaluation: muse needs a MUSE dataset"):
        main(["fit", "--config", MUSE_TEST, *args(tiny_world, "bundled"), "--data.forget_split", "forget01",
              "--data.retain_split", "retain99"])


@pytest.mark.parametrize("name", sorted(MUSE_STACKS))
def test_every_muse_config_runs_on_tiny_models_and_the_local_folder(name: str, tiny_world: dict, world: str,
                                                                    tmp_cwd: Path) -> None:
    """The hub configs (each stack of the MUSE base, a corpus's mode and a method) with their models and data
    replaced by tiny local ones (offline)."""
    offset = is_offset(name)
    cli = main(["fit", *config_args(MUSE_STACKS[name]), *args(tiny_world, world, offset), "--model.tokenizer", "null",
                "--model.large_dtype", "float32", "--model.small_dtype", "float32",
                "--model.gradient_checkpointing", "false", "--data.max_length", "64", "--data.batch_size", "2",
                "--data.eval_subset", "1", "--model.max_new_tokens", "4", "--trainer.accumulate_grad_batches", "1",
                "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 1 and (cli.model.large is not None) == offset


@pytest.mark.parametrize("content", [{"mia_min_k": 0.42}, {"mia_min_k": {"auc": 0.42}}, {"forget_quality": 0.1}],
                         ids=["a-number", "no-agg-value", "another-benchmark"])
def test_a_retain_reference_without_mia_min_k_agg_value_is_refused_clearly(content: dict, tmp_path: Path) -> None:
    path = tmp_path / "MUSE_EVAL.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="has no mia_min_k.agg_value: is it the MUSE_EVAL.json"):
        MuseReference.from_file(path)
    path.write_text(json.dumps({"mia_min_k": {"agg_value": 0.42}}))
    assert MuseReference.from_file(path) == MuseReference(0.42)
