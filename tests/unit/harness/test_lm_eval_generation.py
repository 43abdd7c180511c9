"""Every registered method answers lm-eval's generative requests (``generate_until``) during ``fit`` validation and in
``test``: one generation interface (``generate(input_ids, attention_mask, max_new_tokens, stop=None)``) for all.

The task is a small generative one written here (the bundled world facts, greedy answers cut at a newline), run by
real lm-eval through the training module's hook on tiny models with ``fast_dev_run``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from lightning_unlearn import modules
from lightning_unlearn.cli import main
from lightning_unlearn.modules import UnlearnModule, registry

ROOT = Path(__file__).resolve().parents[3]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
DATA = ROOT / "lightning_unlearn" / "data" / "tofu" / "world_facts_perturbed.jsonl"
TASK = "tofu_world_facts_gen_test"

METHODS = sorted(registry.method_names(unlearning_only=False))


def method_args(name: str, world: dict, reinforced: str) -> list[str]:
    """Each method in offset mode where it has one (the generation path with most models), else direct."""
    offset = ["--model.small_model", world["small"], "--model.large_model", world["large"]]
    special = {
        "EUL": ["--model.small_model", world["small"], "--model.large_model", "null"],
        "RMU": ["--model.small_model", world["large"], "--model.large_model", "null", "--model.layer_id", "1"],
        "SFT": ["--model.small_model", world["small"], "--model.large_model", "null"],
        "WHP": [*offset, "--model.reinforced_model", reinforced],
    }
    return ["--model", name, *special.get(name, offset)]


@pytest.fixture(scope="module")
def generative_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one ``generate_until`` task: two world-fact questions, at most 4 greedy tokens each."""
    folder = tmp_path_factory.mktemp("gen_task")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \" {{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\", \"Question:\"]\n  max_gen_toks: 4\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return folder


def test_no_method_changes_the_generation_signature() -> None:
    """A method decodes its own way through ``logit_components``; ``generate`` itself keeps the base signature."""
    base = inspect.signature(UnlearnModule.generate)
    assert "stop" in base.parameters
    for name in METHODS:
        assert inspect.signature(getattr(modules, name).generate) == base, name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_answers_a_generative_lm_eval_task_in_fit_and_test(
        name: str, tiny_world: dict, reinforced: str, generative_task: Path, tmp_cwd: Path) -> None:
    data = ["--data.lm_eval_tasks", f"[{TASK}]", "--data.lm_eval_include_path", str(generative_task),
            "--data.lm_eval_limit", "2"]
    cli = main(["fit", "--config", FAST, *method_args(name, tiny_world, reinforced), *data])
    assert type(cli.model).__name__ == name
    value = cli.trainer.callback_metrics[f"val/{TASK}/exact_match"]
    assert 0.0 <= float(value) <= 1.0
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert 0.0 <= float(cli.trainer.callback_metrics[f"test/{TASK}/exact_match"]) <= 1.0
