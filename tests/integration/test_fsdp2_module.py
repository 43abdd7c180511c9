"""The unlearning module under ``--trainer.strategy fsdp2`` (FSDP2 through Lightning's ModelParallelStrategy), 2 gloo
processes on CPU, against one process.

* One optimizer step over the four forget examples of ``token_means_cases`` (23/101/73/36 labelled tokens), two
  processes with batches of 2 and every model sharded over both, against one process with a batch of 4: NPO, GD and
  KL in offset and direct mode and NPO with LoRA. The update is the same to float32 rounding (measured: at most a few
  1e-7 relative, see the test), where the tolerance is 1e-5.
* ``fit`` from the command line: a run interrupted after 2 of 4 steps and resumed from its distributed checkpoint
  exports the same weights as the uninterrupted run, and both export what one unsharded process exports.
* A distributed checkpoint resumed with another strategy is refused before any model is loaded, naming fsdp2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from fsdp2_module_cases import CASES, one_step, write_dataset
from lightning_unlearn.cli import main
from lightning_unlearn.distributed.strategy import FSDP2Strategy, check_checkpoint_strategy
from tests.integration.test_ddp import run_ddp
from token_means_cases import relative_difference

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def env() -> dict[str, str]:
    variables = {**os.environ, "OMP_NUM_THREADS": "1"}
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), variables.get("PYTHONPATH")]))
    return variables


@pytest.mark.slow
def test_two_sharded_processes_take_the_step_one_process_takes(tiny_world: dict, tmp_path: Path) -> None:
    data = write_dataset(tiny_world["tokenizer"], tmp_path / "data")
    (tmp_path / "world.json").write_text(json.dumps(tiny_world))
    run_ddp([sys.executable, str(TESTS / "fsdp2_module_cases.py"), str(tmp_path / "world.json"), str(data),
             str(tmp_path / "fsdp2")], tmp_path, env(), timeout=800)
    sharded = torch.load(tmp_path / "fsdp2" / "updates.pt", weights_only=True)
    assert set(sharded) == set(CASES)
    differences = {}
    for case in CASES:
        start, single = one_step(tiny_world, data, case, 1, 4, tmp_path / "single" / case.replace("/", "_"))
        moved = sum(float(u.double().pow(2).sum()) for u in single.values()) ** 0.5
        assert moved > 1e-3, case  # the step moved the weights: equal updates are not both zero
        differences[case] = relative_difference(sharded[case], single)
    assert max(differences.values()) < 1e-5, differences


def fit_args(world: dict, root: Path, steps: int, *extra: str) -> list[str]:
    """GD with AdamW (its moments must be restored too) and a schedule that does not depend on ``max_steps`` (a
    linear decay to ``max_steps`` would differ between a 2-step run resumed to 4 and a 4-step run)."""
    return [
        "fit", "--model", "GD", "--model.small_model", world["small"], "--model.large_model", world["large"],
        "--model.large_dtype", "float32", "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "0.01",
        "--model.lr_scheduler", "constant", "--model.warmup_steps", "1", "--model.export_dir", str(root / "export"),
        "--data.forget_split", "forget01", "--data.retain_split", "retain99", "--data.batch_size", "4",
        "--data.max_length", "96", "--data.evaluation", "loss", "--trainer.limit_val_batches", "0",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", str(steps), "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
        "false", "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(root / "ckpt"),
        "--trainer.callbacks.save_last", "true", "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.save_top_k", "0", *extra,
    ]


def exported(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def sharded_fit(world: dict, root: Path, steps: int, *extra: str) -> None:
    args = fit_args(world, root, steps, "--data.batch_size", "2", "--trainer.devices", "2", "--trainer.strategy",
                    "fsdp2", *extra)
    run_ddp([sys.executable, "-m", "lightning_unlearn.cli", *args], root.parent, env(), timeout=400)


@pytest.mark.slow
def test_sharded_fit_resumes_exactly_and_exports_what_one_process_exports(tiny_world: dict, tmp_path: Path) -> None:
    sharded_fit(tiny_world, tmp_path / "whole", 4)
    sharded_fit(tiny_world, tmp_path / "part", 2)
    checkpoint = tmp_path / "part" / "ckpt" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / ".metadata").is_file()  # distributed: one shard per rank
    sharded_fit(tiny_world, tmp_path / "part", 4, "--ckpt_path", str(checkpoint))
    main(fit_args(tiny_world, tmp_path / "single", 4))

    whole, resumed, single = (exported(tmp_path / name / "export") for name in ("whole", "part", "single"))
    start = exported(Path(tiny_world["small"]))
    assert set(whole) == set(single) == set(resumed)
    assert max(float((single[k] - start[k]).abs().max()) for k in single) > 1e-3
    for name in single:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0, msg=name)  # exact resumption
    assert relative_difference(whole, single) < 1e-5, relative_difference(whole, single)
    for extra in ("tokenizer.json", "config.json", "offset.json"):
        assert (tmp_path / "whole" / "export" / extra).is_file()


def test_a_distributed_checkpoint_is_refused_by_another_strategy(tiny_world: dict, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    with pytest.raises(ValueError, match="fsdp2; the strategy 'ddp' cannot read it"):
        check_checkpoint_strategy(folder, "ddp")
    check_checkpoint_strategy(folder, FSDP2Strategy())  # fsdp2 reads it
    check_checkpoint_strategy(tmp_path / "file.ckpt", "ddp")  # a file: every strategy reads it
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without a distributed checkpoint"):
        check_checkpoint_strategy(tmp_path / "empty", FSDP2Strategy())
    # from the command line, before any model is built: one short error naming the strategy to use
    args = fit_args(tiny_world, tmp_path / "run", 2, "--ckpt_path", str(folder))
    args[args.index("--model.large_model") + 1] = "null"
    with pytest.raises(ValueError, match="Resume with --trainer.strategy fsdp2"):
        main(args)


def test_fsdp2_is_a_registered_strategy_with_every_device_data_parallel() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy
    strategy = StrategyRegistry.get("fsdp2")
    assert isinstance(strategy, FSDP2Strategy) and strategy._tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        FSDP2Strategy(tensor_parallel_size=2)


@pytest.mark.parametrize("devices,nodes,batch", [("fsdp2_8gpu", 1, 4), ("fsdp2_2nodes", 2, 2)])
def test_device_configs_stack_on_the_paper_configs(devices: str, nodes: int, batch: int) -> None:
    from paper_configs import CONFIGS, config_args, paper_stacks
    from tests.integration.test_configs import resolved

    stack = [*paper_stacks()["tofu/offset/npo"], CONFIGS / "devices" / f"{devices}.yaml"]
    config = resolved(config_args(stack))
    trainer = config["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning_unlearn.distributed.strategy.FSDP2Strategy"
    assert trainer["strategy"]["init_args"]["param_dtype"] == "bfloat16"
    assert (trainer["devices"], trainer["num_nodes"], config["data"]["batch_size"]) == (8, nodes, batch)
    # the paper's effective batch of 32 (base: 8 x 4 accumulated x 1 device)
    assert batch * trainer["accumulate_grad_batches"] * 8 * nodes == 32
    # the device config changes where the models run, never which models: those are the base's
    base = resolved(config_args(paper_stacks()["tofu/offset/npo"]))["model"]["init_args"]
    assert {k: config["model"]["init_args"][k] for k in ("large_model", "small_model")} == {
        k: base[k] for k in ("large_model", "small_model")}


@pytest.mark.slow
def test_two_sharded_processes_evaluate_what_one_process_evaluates(tiny_world: dict, tmp_path: Path) -> None:
    """``test`` (TOFU, with generation, and an offline lm-eval task) under fsdp2 on 2 processes: the same report as
    one process, each sample once (generation stops at different steps on the two ranks: the models are gathered
    whole for evaluation; lm-eval runs on rank 0 inside that window)."""
    from tests.integration.test_ddp import assert_same_report, eval_args

    main(eval_args(tiny_world, tmp_path / "reference", "--model.large_model", "null"))
    reference = ["--model.retain_reference", str(tmp_path / "reference" / "TOFU_EVAL.json"),
                 "--data.lm_eval_tasks", "[tofu_world_facts_mc]", "--data.lm_eval_limit", "8"]
    main(eval_args(tiny_world, tmp_path / "single", *reference))
    run_ddp([sys.executable, "-m", "lightning_unlearn.cli", *eval_args(tiny_world, tmp_path / "fsdp2", *reference),
             "--trainer.strategy", "fsdp2", "--trainer.devices", "2"], tmp_path, env(), timeout=600)
    one = json.loads((tmp_path / "single" / "TOFU_SUMMARY.json").read_text())
    two = json.loads((tmp_path / "fsdp2" / "TOFU_SUMMARY.json").read_text())
    assert 0.0 < one["forget_quality"] < 1.0
    assert {"tofu_world_facts_mc/acc", "tofu_world_facts_mc/acc_norm"} <= set(one), sorted(one)
    assert_same_report(two, one)
    assert_same_report(json.loads((tmp_path / "fsdp2" / "TOFU_EVAL.json").read_text()),
                       json.loads((tmp_path / "single" / "TOFU_EVAL.json").read_text()))


@pytest.mark.slow
def test_sharded_fit_with_tofu_validation_equals_one_process(tiny_world: dict, tmp_path: Path) -> None:
    """test_ddp's fit (NPO, 3 steps, then the TOFU validation with generation) under fsdp2 writing one checkpoint
    file (``save_distributed_checkpoint: false``, read back like any other): the weights and the gathered TOFU
    metrics of one process."""
    from tests.integration.test_ddp import args, evaluated, trained

    command = [sys.executable, "-m", "lightning_unlearn.cli", *args(tiny_world, tmp_path / "fsdp2", batch_size=2),
               "--trainer.strategy", "lightning_unlearn.distributed.strategy.FSDP2Strategy",
               "--trainer.strategy.save_distributed_checkpoint", "false", "--trainer.devices", "2"]
    run_ddp(command, tmp_path, env(), timeout=600)
    main(args(tiny_world, tmp_path / "single", batch_size=4))
    two, one = trained(tmp_path / "fsdp2", 2), trained(tmp_path / "single", 1)
    assert set(two) == set(one)
    assert relative_difference(two, one) < 1e-5, relative_difference(two, one)
    metrics_two, metrics_one = evaluated(tmp_path / "fsdp2"), evaluated(tmp_path / "single")
    assert metrics_one["forget_truth_ratio"] is not None
    numbers = {k for k, v in metrics_one.items() if isinstance(v, float)}
    assert numbers and {k: metrics_two[k] for k in numbers} == pytest.approx({k: metrics_one[k] for k in numbers},
                                                                             rel=1e-4, abs=1e-6)
