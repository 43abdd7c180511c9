"""PDU's dual variable: the update rule, the warm-up, checkpoints and resumption, and DDP (one value on all ranks)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_unlearn.cli import main
from tests.integration.test_ddp import run_ddp
from probes import DualProbe

pytestmark = pytest.mark.timeout(600)
TESTS = Path(__file__).resolve().parents[1]
STEP, EPS = 0.05, 5.0


def pdu_args(world: dict, root: Path, *extra: str, batch_size: int = 2) -> list[str]:
    return [
        "fit", "--model", "PDU", "--model.small_model", world["small"], "--model.large_model", world["large"],
        "--model.large_dtype", "float32", "--model.retain_weight", "0.5", "--model.dual_step_size", str(STEP),
        "--model.retain_loss_eps", str(EPS), "--model.dual_warmup_epochs", "0",
        "--data.forget_split", "forget01", "--data.retain_split", "retain99", "--data.batch_size", str(batch_size),
        "--data.max_length", "256", "--data.evaluation", "loss", "--data.eval_subset", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "4", "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root), *extra,
    ]


def probed(world: dict, root: Path, *extra: str) -> tuple[L.LightningModule, list[tuple[int, int, float, float, float]]]:
    cli = main([*pdu_args(world, root, *extra), "--trainer.callbacks+=probes.DualProbe"])
    (probe,) = [c for c in cli.trainer.callbacks if isinstance(c, DualProbe)]
    return cli.model, probe.rows


def test_dual_ascends_on_the_constraint_violation_and_stays_non_negative(tiny_world: dict, tmp_path: Path) -> None:
    """``lambda <- max(0, lambda + step * (retain - eps))`` after every step; the tiny models' retain NLL is ~6 nats."""
    _, rows = probed(tiny_world, tmp_path / "above")  # eps 5 < retain NLL: lambda grows from 0.5
    assert rows[0][2] == 0.5 and len(rows) == 4
    for _, _, before, retain, after in rows:
        assert after == pytest.approx(max(0.0, before + STEP * (retain - EPS)), rel=1e-6)
        assert retain > EPS
    assert [r[2] for r in rows[1:]] == pytest.approx([r[4] for r in rows[:-1]]), "the next step uses the new lambda"

    _, rows = probed(tiny_world, tmp_path / "below", "--model.retain_loss_eps", "100")  # satisfied: lambda falls to 0
    assert [r[4] for r in rows] == [0.0] * 4


def test_dual_waits_for_the_warmup_epochs(tiny_world: dict, tmp_path: Path) -> None:
    _, rows = probed(tiny_world, tmp_path, "--model.dual_warmup_epochs", "1", "--trainer.max_steps", "-1",
                     "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2")
    assert [r[0] for r in rows] == [0, 0, 1, 1]
    assert [r[4] for r in rows[:2]] == [0.5, 0.5]
    assert rows[2][4] > rows[2][2] > 0.5 - 1e-9 and rows[3][4] > rows[2][4]


def test_dual_survives_a_checkpoint_and_a_killed_run_resumes_to_it(tiny_world: dict, tmp_path: Path) -> None:
    checkpointing = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", "CKPT",
                     "--trainer.callbacks.save_last", "true", "--trainer.callbacks.every_n_train_steps", "1",
                     "--trainer.callbacks.save_top_k", "0"]

    def run(root: Path, *extra: str) -> L.LightningModule:
        args = [a.replace("CKPT", str(root / "ckpt")) for a in checkpointing]
        return main([*pdu_args(tiny_world, root), *args, *extra]).model

    full = run(tmp_path / "full")
    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed at step"):
        run(killed, "--trainer.callbacks+=probes.KillAt", "--trainer.callbacks.step", "2")
    saved = torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and saved["pdu_dual"] not in (0.5, full.dual), "lambda of step 2 is saved"
    resumed = run(killed, "--ckpt_path", "last")
    assert resumed.dual == pytest.approx(full.dual, rel=1e-6) and resumed.dual != 0.5
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_two_processes_hold_one_dual_value_equal_to_one_process(tiny_world: dict, tmp_path: Path) -> None:
    """2 ranks x batch 2 against 1 process x batch 4: lambda follows the step's retain loss over both ranks."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "lightning_unlearn.cli", *pdu_args(tiny_world, tmp_path / "ddp"),
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.callbacks+=probes.DualProbe"]
    out = run_ddp(command, tmp_path, env)
    seen: dict[int, dict[int, float]] = {}
    for rank, step, value in re.findall(r"DUAL rank=(\d) step=(\d+) after=([0-9.e+-]+)", out):
        seen.setdefault(int(step), {})[int(rank)] = float(value)
    assert sorted(seen) == [1, 2, 3, 4], out[-2000:]
    assert all(values[0] == values[1] for values in seen.values()), seen

    _, rows = probed(tiny_world, tmp_path / "single", "--data.batch_size", "4")
    assert [seen[step][0] for step in (1, 2, 3, 4)] == pytest.approx([r[4] for r in rows], rel=1e-5)
