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

TESTS = Path(__file__).resolve().parent
STEPS = 3  # one epoch of 3 batches, then the TOFU validation (which once hung DDP: a collective on rank 0 only)


class ThreadProbe(L.Callback):
    """Prints the intra-op thread count each rank trains with (the DDP child process is a fresh interpreter)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        print(f"THREADS rank={trainer.global_rank} threads={torch.get_num_threads()}", flush=True)


def args(world: dict, root: Path, batch_size: int) -> list[str]:
    return [
        "fit", "--model", "NPO", "--model.retain_loss", "none",
        "--model.small_model", world["small"], "--model.large_model", world["large"],
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
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.callbacks+=test_ddp.ThreadProbe",
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
    missing = {k for k, v in metrics_one.items() if v is None}  # forget quality etc. without a reference
    assert missing == {k for k, v in metrics_two.items() if v is None}
    numbers_two = {k: v for k, v in metrics_two.items() if k not in missing}
    assert numbers_two == pytest.approx({k: v for k, v in metrics_one.items() if k not in missing}, rel=1e-4, abs=1e-6)
