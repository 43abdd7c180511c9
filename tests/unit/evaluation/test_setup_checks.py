"""What cannot be computed is refused when the trainer sets up, before the first training step: monitors on
metrics the validation never logs, and lm-eval tasks whose data is missing (issue 23, item 10).

Before, each of these trained a whole epoch (here: 2 steps) and then failed at the first validation: a
``KeyError`` blaming ``retain_reference`` for ``max_new_tokens 0``, Lightning's "could not find the monitored
key", or lm-eval's missing data file after the TOFU validation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.cli import main
from lightning_unlearn.harness.registry import LOCAL_TASKS

ROOT = Path(__file__).resolve().parents[3]
TOFU_EVAL = str(ROOT / "configs" / "tests" / "tofu_eval.yaml")
FLOOR = "lightning_unlearn.evaluation.selection.UtilityFloorCheckpoint"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
EARLY_STOPPING = "lightning.pytorch.callbacks.EarlyStopping"


@pytest.fixture
def reference(tmp_path: Path) -> str:
    """A retain model's TOFU_EVAL.json with what forget quality, privleak and the utility ratio read."""
    report = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {"0": {"score": 0.5}, "1": {"score": 0.7},
                                                                          "2": {"score": 0.75}}},
              "mia_min_k": {"agg_value": 0.42}, "model_utility": {"agg_value": 0.5}}
    path = tmp_path / "retain" / "TOFU_EVAL.json"
    path.parent.mkdir()
    path.write_text(json.dumps(report))
    return str(path)


def built(world: dict, *extra: str):
    """The CLI's trainer, model and data of a 2-step, 1-epoch NPO fit, not yet run."""
    return main(["--config", TOFU_EVAL, "--model", "NPO", "--model.small_model", world["small"],
                 "--model.large_model", world["large"], "--trainer.max_epochs", "1", "--trainer.callbacks", "null",
                 *extra], run=False)


def fit_fails_before_training(cli, error: type[Exception], match: str) -> str:
    with pytest.raises(error, match=match) as caught:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0, "refused before the first training step"
    assert cli.model.history == [], "no validation ran"
    return str(caught.value)


@pytest.mark.parametrize("callback", [
    [FLOOR],
    [CHECKPOINT, "--trainer.callbacks.monitor", "val/model_utility", "--trainer.callbacks.mode", "max"],
    [EARLY_STOPPING, "--trainer.callbacks.monitor", "val/retain_Q_A_ROUGE", "--trainer.callbacks.mode", "max"],
], ids=["UtilityFloorCheckpoint", "ModelCheckpoint", "EarlyStopping"])
def test_a_monitor_needing_generation_with_max_new_tokens_0_is_refused_at_setup(
        tiny_world: dict, tmp_cwd: Path, reference: str, callback: list[str]) -> None:
    """The issue's example: model utility (and ROUGE) need generated answers; max_new_tokens 0 generates none."""
    cli = built(tiny_world, "--model.retain_reference", reference, "--model.max_new_tokens", "0",
                "--trainer.callbacks+", *callback)
    message = fit_fails_before_training(cli, ValueError, "model.max_new_tokens is 0")
    assert "ROUGE" in message and "val/forget_quality" in message, "the cause, and what the validation does log"
    assert "retain_reference" not in message, "the reference is there: it is not the cause"


def test_a_monitor_the_evaluation_never_logs_is_refused_with_the_logged_metrics(
        tiny_world: dict, tmp_cwd: Path) -> None:
    cli = built(tiny_world, "--trainer.callbacks+", CHECKPOINT, "--trainer.callbacks.monitor", "val/forget_qualty")
    message = fit_fails_before_training(cli, ValueError, "no such metric")
    assert "val/forget_Q_A_ROUGE" in message and "val/model_utility" in message
    cli = built(tiny_world, "--trainer.callbacks+", CHECKPOINT, "--trainer.callbacks.monitor", "forget_Q_A_ROUGE")
    fit_fails_before_training(cli, ValueError, "did you mean 'val/forget_Q_A_ROUGE'")
    cli = built(tiny_world, "--trainer.callbacks+", CHECKPOINT, "--trainer.callbacks.monitor", "val/privleak")
    fit_fails_before_training(cli, ValueError, "set model.retain_reference")


def test_a_limit_on_validation_batches_that_cuts_the_utility_sets_off_is_refused_at_setup(
        tiny_world: dict, tmp_cwd: Path, reference: str) -> None:
    """One batch of 8 of the 15 evaluation items (3 per set) reaches forget, retain and real authors only: no world
    facts, so no model utility. Before: an epoch, then UtilityFloorCheckpoint's KeyError blaming retain_reference."""
    cli = built(tiny_world, "--model.retain_reference", reference, "--trainer.limit_val_batches", "1",
                "--trainer.callbacks+", FLOOR)
    message = fit_fails_before_training(cli, ValueError, "limit_val_batches 1 serves only the first 8 of 15")
    assert "['forget', 'retain', 'ra']" in message
    cli = built(tiny_world, "--model.retain_reference", reference, "--trainer.limit_val_batches", "2",
                "--trainer.callbacks+", FLOOR)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.history[0]["model_utility_vs_retain"] is not None


def test_a_reference_without_model_utility_is_named_for_the_utility_floor(
        tiny_world: dict, tmp_cwd: Path, reference: str) -> None:
    report = json.loads(Path(reference).read_text())
    del report["model_utility"]
    Path(reference).write_text(json.dumps(report))
    cli = built(tiny_world, "--model.retain_reference", reference, "--trainer.callbacks+", FLOOR)
    fit_fails_before_training(cli, ValueError, "retain reference has no model_utility")


def test_monitors_that_the_evaluation_logs_train(tiny_world: dict, tmp_cwd: Path, reference: str) -> None:
    cli = built(tiny_world, "--model.retain_reference", reference, "--trainer.callbacks+", FLOOR,
                "--trainer.callbacks+", EARLY_STOPPING, "--trainer.callbacks.monitor", "train/loss",
                "--trainer.callbacks.patience", "5")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and len(cli.model.history) == 1


@pytest.mark.parametrize("max_new_tokens, lm_eval, limit", [(8, True, None), (0, False, None), (8, False, "1")])
def test_the_plan_is_what_the_validation_logs(tiny_world: dict, tmp_cwd: Path, reference: str,
                                              max_new_tokens: int, lm_eval: bool, limit: str | None) -> None:
    """The setup check's list of logged metrics equals what a validation logs (with and without generation,
    with the offline lm-eval tasks, with a limit on validation batches), so that it refuses exactly the monitors
    that would fail."""
    from lightning_unlearn.evaluation.monitors import MetricPlan
    from lightning_unlearn.harness.hooks import LmEvalSettings, task_metrics
    from lightning_unlearn.modules.evaluator import _served_sets

    tasks = ["--data.lm_eval_tasks", "[tofu_general]"] if lm_eval else []
    limits = ["--trainer.limit_val_batches", limit] if limit else []
    cli = built(tiny_world, "--model.retain_reference", reference, "--model.max_new_tokens", str(max_new_tokens),
                "--trainer.limit_train_batches", "1", *tasks, *limits)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = {k.removeprefix("val/") for k in cli.trainer.logged_metrics if k.startswith("val/")}
    served, _ = _served_sets(cli.trainer)
    assert (served is None) == (limit is None), served
    plan = cli.model.evaluation.plan(max_new_tokens > 0, served)
    if lm_eval:
        plan = plan | MetricPlan(task_metrics(LmEvalSettings(("tofu_general",))))
        assert {"tofu_world_facts_mc/acc", "tofu_real_authors_mc/acc_norm"} <= plan.logged
    assert plan.logged == logged
    assert ("model_utility" in logged) == (max_new_tokens > 0 and limit is None)
    assert not set(plan.missing) & logged


def missing_data_task(folder: Path) -> Path:
    """A copy of the bundled world-facts task whose local data file does not exist."""
    text = (LOCAL_TASKS / "tofu_world_facts_mc.yaml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith(("tag:", "  - tofu_general", "custom_dataset"))]
    text = "\n".join(lines).replace("task: tofu_world_facts_mc", "task: facts_without_data")
    text = text.replace("../../data/tofu/world_facts_perturbed.jsonl", str(folder / "absent.jsonl"))
    folder.mkdir(exist_ok=True)
    (folder / "facts_without_data.yaml").write_text(text + "\n")
    (folder / "utils.py").write_text((LOCAL_TASKS / "utils.py").read_text())  # the task's !function helpers
    return folder


def test_lm_eval_task_data_missing_is_refused_at_setup(tiny_world: dict, tmp_cwd: Path) -> None:
    """Before: two training steps and a TOFU validation, then lm-eval's FileNotFoundError."""
    tasks = missing_data_task(tmp_cwd / "tasks")
    cli = built(tiny_world, "--data.lm_eval_tasks", "[facts_without_data]", "--data.lm_eval_include_path", str(tasks))
    message = fit_fails_before_training(cli, FileNotFoundError, "facts_without_data")
    assert "absent.jsonl" in message


def test_an_unknown_lm_eval_task_is_refused_at_setup(tiny_world: dict, tmp_cwd: Path) -> None:
    cli = built(tiny_world, "--data.lm_eval_tasks", "[tofu_genral]")
    fit_fails_before_training(cli, ValueError, "did you mean")


def test_an_export_over_the_small_model_is_refused_at_setup(tiny_world: dict, tmp_cwd: Path) -> None:
    """Before: the fit trained, then replaced the small model (the reference its offset.json names) with the
    trained weights, silently."""
    import shutil

    small = tmp_cwd / "models" / "small"
    shutil.copytree(tiny_world["small"], small)
    before = (small / "model.safetensors").read_bytes()
    for target in (small, small.parent):
        cli = main(["--config", TOFU_EVAL, "--model", "NPO", "--model.small_model", str(small),
                    "--model.large_model", tiny_world["large"], "--trainer.max_epochs", "1",
                    "--trainer.callbacks", "null", "--model.export_dir", str(target)], run=False)
        fit_fails_before_training(cli, ValueError, "export_dir .* model.small_model")
    assert (small / "model.safetensors").read_bytes() == before


def test_an_export_dir_that_is_a_file_is_refused_at_setup(tiny_world: dict, tmp_cwd: Path) -> None:
    """Before: the whole fit, then NotADirectoryError when the export replaced the 'folder'."""
    (tmp_cwd / "export").write_text("not a folder")
    cli = built(tiny_world, "--model.export_dir", str(tmp_cwd / "export"))
    fit_fails_before_training(cli, ValueError, "is a file")


def test_the_lm_eval_names_known_at_setup_are_those_logged_groups_included(tiny_world: dict, tmp_cwd: Path) -> None:
    """A group with an aggregate metric over the two offline tasks: its ``group/acc`` and each task's metrics."""
    from lightning_unlearn.harness.hooks import LmEvalSettings, task_metrics

    (tmp_cwd / "group").mkdir()
    (tmp_cwd / "group" / "mean.yaml").write_text(
        "group: tofu_mc_mean\ntask: [tofu_world_facts_mc, tofu_real_authors_mc]\naggregate_metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\nmetadata:\n  version: 1.0\n")
    main(["test", "--config", TOFU_EVAL, "--model", "SFT", "--model.small_model", tiny_world["small"],
          "--trainer.callbacks", "null", "--trainer.default_root_dir", "run", "--data.lm_eval_tasks", "[tofu_mc_mean]",
          "--data.lm_eval_include_path", str(tmp_cwd / "group"), "--data.lm_eval_limit", "5", "--verbose", "false"])
    summary = json.loads(next((tmp_cwd / "run").rglob("TOFU_SUMMARY.json")).read_text())
    names = task_metrics(LmEvalSettings(("tofu_mc_mean",), str(tmp_cwd / "group")))
    assert "tofu_mc_mean/acc" in names
    assert names == {k for k in summary if "/" in k}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_paper_config_offline_without_its_hub_tasks_data_stops_before_any_weight_loads(
        tiny_world: dict, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TOFU paper configs list the delta paper's four lm-eval tasks, whose data comes from the hub. Offline (the
    suite is) with an empty datasets cache, fit stops when the trainer sets up: no training step, no model weight
    loaded (a 8B download would come first otherwise), and the message names the option to change. Slow: an
    unknown-to-the-package task makes lm-eval index its ~15,000 task files (10-70 s)."""
    import datasets

    from paper_configs import config_args, paper_stacks

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_cwd / "empty_cache")
    stack = paper_stacks()["tofu/offset/npo"]
    cli = main([*config_args(stack), "--model.small_model", tiny_world["small"], "--model.large_model",
                tiny_world["large"], "--model.small_dtype", "float32", "--model.large_dtype", "float32",
                "--model.gradient_checkpointing", "false", "--trainer.max_epochs", "1", "--data.forget_split",
                "forget01", "--data.retain_split", "retain99", "--trainer.accumulate_grad_batches", "1"], run=False)
    message = fit_fails_before_training(cli, FileNotFoundError, "arc_easy")
    assert "--data.lm_eval_tasks" in message and "cannot be downloaded" in message
    assert cli.model.model is None, "refused before any model weight was loaded"
