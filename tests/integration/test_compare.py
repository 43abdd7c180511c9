"""The comparison's cells, caching, failure handling and table (fast), and a reduced table on the tiny world
(slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_unlearn.compare import runner
from lightning_unlearn.compare.main import main as compare
from lightning_unlearn.compare.spec import CONFIGS, CompareSpec, registered_methods
from lightning_unlearn.compare.table import general_accuracy, markdown, rows, write_outputs

TINY = CONFIGS / "tiny.yaml"


def budget_of(command: list[str]) -> dict[str, str]:
    flags = ("--trainer.max_epochs", "--data.batch_size", "--model.optimizer.init_args.lr")
    return {f: command[command.index(f) + 1] for f in flags if f in command}


def test_tiny_config_makes_every_method_in_both_modes_on_one_budget() -> None:
    spec = CompareSpec.load(TINY)
    cells = spec.cells()
    names = [c.name for c in cells]
    losses = ["GA", "GD", "KL", "NPO", "DPO", "SimNPO", "LLMU"]
    assert names == [f"{m}-{mode}" for m in losses for mode in ("offset", "direct")] + ["EUL-direct"]
    for offset, direct in zip(cells[0:14:2], cells[1:14:2]):
        assert budget_of(offset.fit) == budget_of(direct.fit) == {
            "--trainer.max_epochs": "10", "--data.batch_size": "8", "--model.optimizer.init_args.lr": "0.001"}
        assert offset.fit[offset.fit.index("--model.large_model") + 1].endswith("models/large_ft")
        assert direct.fit[direct.fit.index("--model.large_model") + 1] == "null"
        assert direct.fit[direct.fit.index("--model.small_model") + 1].endswith("models/large_ft"), \
            "direct mode unlearns the large model itself"
    assert all(c.fit[0] == "fit" and c.test[0] == "test" for c in cells)


def test_methods_come_from_the_registered_losses(tmp_path: Path) -> None:
    assert {"GA", "GD", "KL", "NPO", "DPO", "SimNPO", "LLMU", "EUL"} <= set(registered_methods())
    assert "SFT" not in registered_methods()
    spec = CompareSpec.load(TINY)
    spec.select(["all"])
    assert list(spec.methods) == registered_methods()
    assert spec.methods["EUL"]["modes"] == ["direct"], "a listed method keeps its options"
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("  GA: {}", "  Nope: {}"))
    with pytest.raises(ValueError, match="'Nope' is not a registered loss"):
        CompareSpec.load(bad)


def test_cell_key_follows_the_commands_the_config_files_and_the_world(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\n")
    config = tmp_path / "c.yaml"
    config.write_text(TINY.read_text().replace("config: configs/demo/unlearn.yaml", f"config: {base}"))
    cell = CompareSpec.load(config).cells()[0]
    key = cell.key("world-1")
    assert cell.key("world-1") == key
    assert cell.key("world-2") != key, "a rebuilt world reruns the cells"
    base.write_text("seed_everything: 1\n")
    assert cell.key("world-1") != key, "an edited base config reruns the cells"


class FakeMain:
    """Stands in for ``main.py`` (the test is about the runner's bookkeeping, not training): ``fit`` writes a
    checkpoint, ``test`` a TOFU summary; methods in ``failing`` raise."""

    def __init__(self, failing: set[str] = frozenset()) -> None:
        self.calls: list[str] = []
        self.failing = failing

    def __call__(self, args: list[str]) -> None:
        method = args[args.index("--model") + 1]
        folder = Path(args[args.index("--trainer.default_root_dir") + 1])
        self.calls.append(f"{args[0]} {method}")
        if method in self.failing:
            raise RuntimeError(f"{method} diverged")
        folder.mkdir(parents=True, exist_ok=True)
        if args[0] == "fit":
            (folder / "epoch=0.ckpt").write_text("")
        else:
            assert args[-2] == "--ckpt_path" and args[-1].endswith("epoch=0.ckpt")
            general = {"tofu_world_facts_mc/acc": 0.4} if "--data.lm_eval_tasks" in args else {}
            (folder / "TOFU_SUMMARY.json").write_text(json.dumps({"forget_quality": 0.5, "model_utility": 0.9,
                                                                  **general}))


def spec_in(tmp_path: Path, methods: list[str]) -> CompareSpec:
    spec = CompareSpec.load(TINY)
    spec.select(methods)
    spec.output = str(tmp_path / "out")
    return spec


def test_done_cells_are_skipped_and_a_failed_cell_does_not_stop_the_others(tmp_path: Path) -> None:
    cells = spec_in(tmp_path, ["GA", "NPO"]).cells()
    fake = FakeMain(failing={"GA"})
    results = runner.run_cells(cells, "w", fake, progress=False)
    assert [r["status"] for r in results] == ["failed", "failed", "ok", "ok"]
    assert results[0]["error"] == "RuntimeError: GA diverged" and "fit_command" in results[0]
    assert fake.calls == ["fit GA", "fit GA", "fit NPO", "test NPO", "fit NPO", "test NPO"]
    assert results[2]["summary"]["forget_quality"] == 0.5 and results[2]["train_s"] >= 0

    again = FakeMain()
    results = runner.run_cells(cells, "w", again, progress=False)
    assert again.calls == ["fit GA", "test GA", "fit GA", "test GA"], "only the failed cells are rerun"
    assert all(r["status"] == "ok" for r in results)
    third = FakeMain()
    runner.run_cells(cells, "w", third, progress=False)
    assert third.calls == []
    runner.run_cells(cells, "rebuilt world", third, progress=False)
    assert len(third.calls) == 8


def test_general_accuracy_is_filled_only_from_lm_eval_metrics() -> None:
    """The lm-eval hook's ``task/metric`` keys: acc_norm where a task has it, else acc; stderr and TOFU keys ignored."""
    assert general_accuracy({"forget_Q_A_ROUGE": 0.3, "model_utility": 0.9}) is None
    assert general_accuracy({"arc_easy/acc": 0.6, "arc_easy/acc_norm": 0.8, "arc_easy/acc_stderr": 0.01,
                             "winogrande/acc": 0.5}) == pytest.approx(0.65)
    assert general_accuracy({"arc_easy/acc_norm": 0.8, "arc_easy/acc": 0.6}) == pytest.approx(0.8)


def test_table_reports_failed_cells_and_writes_its_files(tmp_path: Path) -> None:
    results = [{"method": "NPO", "mode": "offset", "status": "ok", "train_s": 12.0,
                "summary": {"forget_quality": 0.02, "model_utility": 0.8, "forget_Q_A_ROUGE": 0.1}},
               {"method": "NPO", "mode": "direct", "status": "failed", "error": "RuntimeError: boom"}]
    table = rows(results, {"fine-tuned": {"forget_quality": 1e-8, "model_utility": 0.9}})
    assert table[0]["forget_quality"] == 1e-8 and table[1]["train_s"] == 12.0
    assert [r["mode"] for r in table] == ["reference", "offset", "direct"]
    text = markdown(table, "# t")
    assert "| NPO | offset | 0.020 | 0.800 | 0.100 |" in text and "| NPO | direct |" in text
    assert "| fine-tuned | reference | 1.00e-08 | 0.900 |" in text and "| 12 |" in text
    assert "FAILED" in text and "- NPO direct: RuntimeError: boom" in text
    write_outputs(tmp_path, results, {}, "# t", {"command": "x"})
    assert {p.name for p in tmp_path.iterdir()} == {"COMPARE.md", "COMPARE.json", "COMPARE.png"}
    assert json.loads((tmp_path / "COMPARE.json").read_text())["table"][1]["error"] == "RuntimeError: boom"


@pytest.mark.slow
def test_reduced_table_on_the_tiny_world_has_every_metric(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two losses in both modes, 2 epochs each, on the quick tiny world (cached between runs in pytest's cache,
    its stages skipped when unchanged): every cell ends ``ok`` with every TOFU column of the table."""
    world = request.config.cache.mkdir("compare_tiny_world")
    table = compare(["--world", "tiny", "--methods", "GA", "NPO", "--epochs", "2", "--output", str(tmp_path),
                     "--world-folder", str(world), "--no-progress"])
    cells = [r for r in table if r["mode"] != "reference"]
    assert [(r["method"], r["mode"]) for r in cells] == [("GA", "offset"), ("GA", "direct"), ("NPO", "offset"),
                                                        ("NPO", "direct")]
    for r in cells:
        assert r["error"] is None, r
        for key in ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "ra_Q_A_ROUGE",
                    "wf_Q_A_ROUGE"):
            assert r[key] is not None and math.isfinite(r[key]), (r, key)
        assert r["general_accuracy"] is not None and 0 <= r["general_accuracy"] <= 1, r
    assert {r["method"] for r in table if r["mode"] == "reference"} == {"fine-tuned", "retain model"}
    assert (tmp_path / "COMPARE.png").is_file()


def test_every_cell_tests_the_general_tasks_the_references_have() -> None:
    """The tiny world's fine-tuned and retain models are evaluated with configs/demo/eval.yaml's lm-eval tasks;
    every cell's test runs the same ones (its fit does not validate), so no method row lacks general accuracy."""
    import yaml

    eval_tasks = yaml.safe_load((CONFIGS.parent / "demo" / "eval.yaml").read_text())["data"]["lm_eval_tasks"]
    for cell in CompareSpec.load(TINY).cells():
        assert cell.test[cell.test.index("--data.lm_eval_tasks") + 1] == "[" + ", ".join(eval_tasks) + "]", cell.name
        assert "--data.lm_eval_tasks" not in cell.fit
    for name in ("tofu_llama3", "tofu_llama2"):
        spec = CompareSpec.load(CONFIGS / f"{name}.yaml")
        assert "tofu_general" in spec.general_tasks and len(spec.general_tasks) > 1, name
        assert all(c.general_tasks == spec.general_tasks for c in spec.cells())


def test_a_cell_row_carries_general_accuracy(tiny_world: dict, tmp_path: Path) -> None:
    """A real cell (main.py fit then test, in-process) on tiny models, one training step: its row has the mean
    accuracy of the offline general tasks, as the reference rows do (before: blank for every method row)."""
    config = tmp_path / "compare.yaml"
    config.write_text(yaml_dump({
        "output": str(tmp_path / "out"), "config": str(CONFIGS.parents[0] / "tests" / "tofu_eval.yaml"),
        "offset": {"large_model": tiny_world["large"], "small_model": tiny_world["small"]},
        "budget": {"max_epochs": 1, "batch_size": 2}, "args": ["--trainer.limit_train_batches", "1"],
        "methods": {"GA": {"modes": ["offset"]}}}))
    spec = CompareSpec.load(config)
    results = runner.run_cells(spec.cells(), "w", runner.in_process, progress=False)
    assert results[0]["status"] == "ok", results[0]
    summary = results[0]["summary"]
    assert {"tofu_world_facts_mc/acc", "tofu_real_authors_mc/acc"} <= set(summary)
    table = rows(results, {})
    assert table[0]["general_accuracy"] == pytest.approx(general_accuracy(summary))
    assert 0 <= table[0]["general_accuracy"] <= 1


def yaml_dump(value: dict) -> str:
    import yaml

    return yaml.safe_dump(value)


def test_a_general_task_without_data_stops_the_comparison_before_any_training(tmp_path: Path) -> None:
    """A hub task offline (the test suite runs offline) is refused before the world or a cell is trained."""
    from lightning_unlearn.harness.hooks import LmEvalSettings, task_metrics

    try:
        task_metrics(LmEvalSettings(("arc_easy",)))
        pytest.skip("arc_easy's data is in this machine's datasets cache")
    except FileNotFoundError:
        pass
    config = tmp_path / "compare.yaml"
    config.write_text(yaml_dump({"config": "configs/demo/unlearn.yaml", "direct": {"small_model": str(tmp_path)},
                                 "general_tasks": ["tofu_general", "arc_easy"], "methods": {"GA": {"modes": ["direct"]}}}))
    with pytest.raises(FileNotFoundError, match="arc_easy"):
        compare(["--config", str(config), "--output", str(tmp_path / "out"), "--no-progress"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["tiny", "tofu_llama3", "tofu_llama2"])
def test_every_compare_config_gives_both_modes_of_a_method_one_budget(name: str) -> None:
    cells = CompareSpec.load(CONFIGS / f"{name}.yaml").cells()
    assert cells and {c.method for c in cells} <= set(registered_methods())
    by_method: dict[str, list] = {}
    for cell in cells:
        by_method.setdefault(cell.method, []).append(budget_of(cell.fit))
    assert all(len({tuple(sorted(b.items())) for b in budgets}) == 1 for budgets in by_method.values())
    assert [c.mode for c in cells if c.method == "EUL"] == ["direct"]


def test_llama3_base_config_runs_on_tiny_models(tiny_world: dict, tmp_cwd: Path) -> None:
    from lightning_unlearn.cli import main

    main(["fit", "--config", str(CONFIGS / "tofu_llama3_unlearn.yaml"), "--model.large_model", tiny_world["large"],
          "--model.small_model", tiny_world["small"], "--model.retain_reference", "null", "--data.evaluation", "loss",
          "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu"])
