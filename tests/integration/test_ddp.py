"""DDP on CPU (gloo): two processes with the global batch split between them train and evaluate what one
process does.

This holds for per-sequence losses (NPO, DPO, SimNPO without a token-mean retain term): each rank's loss is
a mean over its sequences and DDP averages gradients, which is the mean over the global batch. Token means
(GA, GD, KL, the ``nll``/``kl`` retain terms) are not split-invariant when the ranks' token counts differ.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.models.loading import load_causal_lm
from probes import ThreadProbe

pytestmark = pytest.mark.timeout(900)

TESTS = Path(__file__).resolve().parents[1]
STEPS = 3  # one epoch of 3 batches, then the TOFU validation (which once hung DDP: a collective on rank 0 only)


def args(world: dict, root: Path, batch_size: int) -> list[str]:
    return [
        "fit", "--model", "NPO", "--model.retain_loss", "none",
        "--model.small_model", world["small"], "--model.large_model", world["large"],
        "--model.large_dtype", "float32",
        "--data.forget_split", "forget01", "--data.retain_split", "retain99", "--data.batch_size", str(batch_size),
        "--data.max_length", "128", "--data.evaluation", "tofu", "--data.eval_subset", "2",
        "--model.max_new_tokens", "4", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", str(STEPS), "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(root / "ckpt"),
        "--trainer.callbacks.save_last", "true", "--trainer.callbacks.save_top_k", "0",
    ]


def trained(root: Path, processes: int) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    (rng,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("RestoreRNG")]
    assert len(rng["per_rank"]) == processes  # gathered from every rank, for an exact resumption
    return checkpoint["state_dict"]


def evaluated(root: Path) -> dict[str, float | None]:
    (history,) = json.loads((root / "TOFU_HISTORY.json").read_text())
    return history


def run_ddp(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a DDP command; on a hang kill its whole process group (the launched rank outlives its parent)."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"DDP run hung for {timeout} s:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_train_what_one_trains_with_the_same_global_batch(tiny_world: dict, tmp_path: Path) -> None:
    # Without OMP_NUM_THREADS Lightning's launcher gives each process its share of the cores; check it does.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "lightning_unlearn.cli", *args(tiny_world, tmp_path / "ddp", batch_size=2),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.callbacks+=probes.ThreadProbe",
    ]
    out = run_ddp(command, tmp_path, env)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    # Both ranks write to the same pipe: their lines may interleave with other output, so search, not split.
    threads = sorted(re.findall(r"THREADS rank=\d+ threads=\d+", out))
    assert threads == [f"THREADS rank={r} threads={share}" for r in range(2)], out[-2000:]

    main(args(tiny_world, tmp_path / "single", batch_size=4))

    two, one = trained(tmp_path / "ddp", 2), trained(tmp_path / "single", 1)
    assert set(two) == set(one)
    start = load_causal_lm(tiny_world["small"], "float32").state_dict()
    moved = max((one[k] - start[k.removeprefix("model.")]).abs().max().item() for k in one)
    assert moved > 1e-4  # the tolerance below is small against what training changed
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)

    # The TOFU metrics gathered from both ranks' halves of the evaluation sets equal one process's.
    metrics_two, metrics_one = evaluated(tmp_path / "ddp"), evaluated(tmp_path / "single")
    assert metrics_two.keys() == metrics_one.keys() and metrics_one["forget_truth_ratio"] is not None
    # The non-finite flag (a bool and a dict of what was not finite) is the same, and every number is finite.
    assert metrics_one.pop("all_finite") is True and metrics_two.pop("all_finite") is True
    assert metrics_one.pop("non_finite") == metrics_two.pop("non_finite")
    missing = {k for k, v in metrics_one.items() if v is None}  # forget quality etc. without a reference
    assert missing == {k for k, v in metrics_two.items() if v is None}
    numbers_two = {k: v for k, v in metrics_two.items() if k not in missing}
    assert numbers_two == pytest.approx({k: v for k, v in metrics_one.items() if k not in missing}, rel=1e-4, abs=1e-6)


def eval_args(world: dict, root: Path, *extra: str) -> list[str]:
    """``test`` on 15 samples per TOFU set (75 in all: 2 processes get 38 each, one sample twice)."""
    return [
        "test", "--model", "NPO", "--model.small_model", world["small"], "--model.large_model", world["large"],
        "--model.large_dtype", "float32",
        "--data.forget_split", "forget01", "--data.retain_split", "retain99", "--data.max_length", "256",
        "--data.evaluation", "tofu", "--data.eval_subset", "15", "--data.eval_batch_size", "4",
        "--model.max_new_tokens", "6", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks", "null", "--trainer.default_root_dir", str(root), *extra,
    ]


def assert_same_report(two: dict, one: dict, path: str = "") -> None:
    """Same keys and texts everywhere; numbers equal to float32 rounding, 1e-5 relative (None where the other is
    None). Each process pools other rows with a sample's rows (other pass widths, other prompt padding), which
    moves values by ~1e-6 relative (a truth ratio of 0.9968 by 1.4e-6); a sample scored twice or mixed up with
    another moves them by orders of magnitude more."""
    if isinstance(one, dict):
        assert isinstance(two, dict) and two.keys() == one.keys(), f"{path}: {sorted(two)} vs {sorted(one)}"
        for key in one:
            assert_same_report(two[key], one[key], f"{path}/{key}")
    elif "/mia_min_k_plus_plus/" in path and path.endswith("/score"):
        # A sample's Min-K%++ divides each token's log-probability gap by the spread sigma of its distribution,
        # which scales the ~1e-6 rounding up: seen 1.0e-5 relative (1.226935 vs 1.226947). Another sample's
        # score differs by 7.7e-4 or more here (6e-4 relative, the closest pair of 15), so a sample scored twice or
        # mixed up with another still fails.
        assert two == pytest.approx(one, rel=1e-4, abs=1e-6), path
    elif isinstance(one, float) or isinstance(two, float):
        assert two == pytest.approx(one, rel=1e-5, abs=1e-6), path
    else:
        assert two == one, path


def test_two_processes_evaluate_each_sample_once(tiny_world: dict, tmp_path: Path) -> None:
    """A set size that 2 processes do not divide: the sampler repeats a sample, which must not count twice."""
    # The reference is another model (the small model alone), so forget quality is a real KS p-value.
    main(eval_args(tiny_world, tmp_path / "reference", "--model.large_model", "null"))
    reference = ["--model.retain_reference", str(tmp_path / "reference" / "TOFU_EVAL.json")]
    main(eval_args(tiny_world, tmp_path / "single", *reference))

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    run_ddp([sys.executable, "-m", "lightning_unlearn.cli", *eval_args(tiny_world, tmp_path / "ddp", *reference),
             "--trainer.strategy", "ddp", "--trainer.devices", "2"], tmp_path, env)

    one = json.loads((tmp_path / "single" / "TOFU_SUMMARY.json").read_text())
    two = json.loads((tmp_path / "ddp" / "TOFU_SUMMARY.json").read_text())
    assert 0.0 < one["forget_quality"] < 1.0 and one["privleak"] is not None
    assert_same_report(two, one)
    # Per-sample values (forget quality's KS sample among them), in dataset order, each sample once.
    report_one = json.loads((tmp_path / "single" / "TOFU_EVAL.json").read_text())
    report_two = json.loads((tmp_path / "ddp" / "TOFU_EVAL.json").read_text())
    assert list(report_one["forget_truth_ratio"]["value_by_index"]) == [str(i) for i in range(15)]
    assert_same_report(report_two, report_one)
