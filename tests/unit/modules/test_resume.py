"""Checkpoints hold only the trainable model, and a run killed mid-epoch resumes to exactly the same result."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.datasets import PairingSampler
from lightning_unlearn.modules.rng import rng_state, set_rng_state
from probes import KillAt

# forget01 has 40 examples: 5 batches of 8 per epoch; runs end with the second epoch and its validation.
BATCH, STEPS = 8, 10
# Three in-process runs per case, about 20 s on one thread: a resumption that hangs (a DataLoader worker waiting
# on a sampler, a collective) fails here instead of stalling the suite.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dropout_small(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny small model with attention dropout, so the result also depends on the RNG state."""
    folder = tmp_path_factory.mktemp("dropout") / "small"
    shutil.copytree(tiny_world["small"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    return str(folder)


def fit(world: dict, small: str, root: Path, *extra: str, num_workers: int = 0) -> L.LightningModule:
    args = [
        "fit", "--model", "NPO", "--model.small_model", small, "--model.large_model", world["large"],
        "--model.lr_scheduler", "linear", "--model.warmup_steps", "2",
        "--data.forget_split", "forget01", "--data.retain_split", "retain99", "--data.batch_size", str(BATCH),
        "--data.max_length", "128", "--data.evaluation", "loss", "--data.eval_subset", "4",
        "--data.num_workers", str(num_workers),
        "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root / "logs"),
        "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(root / "ckpt"),
        "--trainer.callbacks.save_last", "true", "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.save_top_k", "0", *extra,
    ]
    return main(args).model


def logged(root: Path) -> dict[tuple[str, str], str]:
    """Every (step, metric) -> value of every CSV log under ``root``, as written."""
    rows = [row for path in sorted(root.glob("logs/**/metrics.csv")) for row in csv.DictReader(path.open())]
    return {(row["step"], key): value for row in rows for key, value in row.items() if value and key != "step"}


def weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


@pytest.mark.parametrize(
    ("kill_at", "num_workers"),
    # Mid-epoch, with a DataLoader worker (its indices are drawn before Lightning's set_epoch); and at an
    # epoch boundary, where the uninterrupted run validates and starts an epoch between checkpoint and step.
    [(7, 1), (5, 0)], ids=["mid-epoch-worker", "epoch-boundary"],
)
def test_killed_run_resumes_exactly(
    kill_at: int, num_workers: int, tiny_world: dict, dropout_small: str, tmp_path: Path,
    recwarn: pytest.WarningsRecorder,
) -> None:
    full = fit(tiny_world, dropout_small, tmp_path / "full", num_workers=num_workers)

    killed = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed at step"):
        fit(tiny_world, dropout_small, killed, "--trainer.callbacks+=probes.KillAt",
            "--trainer.callbacks.step", str(kill_at), num_workers=num_workers)
    assert torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == kill_at
    resumed = fit(tiny_world, dropout_small, killed, "--ckpt_path", "last", num_workers=num_workers)

    assert resumed.trainer.global_step == STEPS
    reference, result = weights(full), weights(resumed)
    for name, tensor in reference.items():
        torch.testing.assert_close(result[name], tensor, rtol=0, atol=1e-6, msg=name)
    before, after = logged(tmp_path / "full"), logged(killed)
    assert ("9", "val/forget_nll") in before and ("8", "train/loss") in before
    assert after == before
    assert not [w for w in recwarn if "dataloader is not resumable" in str(w.message)]


def test_checkpoint_holds_only_the_trainable_model(tiny_world: dict, tmp_path: Path) -> None:
    module = fit(tiny_world, tiny_world["small"], tmp_path, "--trainer.max_steps", "2")
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)

    trainable = {f"model.{k}" for k in module.model.state_dict()}
    assert set(checkpoint["state_dict"]) == trainable
    optimizer = checkpoint["optimizer_states"][0]
    assert len(optimizer["state"]) == len(list(module.model.parameters())) > 0
    assert checkpoint["UnlearnDataModule"] == {"train_epoch": 0, "train_batches_done": 2}
    (rng,) = (v for k, v in checkpoint["callbacks"].items() if k.startswith("RestoreRNG"))
    assert len(rng["per_rank"]) == 1
    frozen = sum(p.numel() for m in module.frozen_models() for p in m.parameters())
    assert (tmp_path / "ckpt" / "last.ckpt").stat().st_size < 4 * frozen  # float32 copies of them would not fit


def test_sampler_resumes_inside_an_epoch_once() -> None:
    data = list(range(10))
    for replicas in (1, 2):
        for rank in range(replicas):
            sampler = PairingSampler(data, num_replicas=replicas, rank=rank, seed=5)  # type: ignore[arg-type]
            sampler.set_epoch(3)
            epoch3 = list(sampler)
            sampler.set_epoch(0)
            sampler.resume_at(3, 2)
            assert list(sampler) == epoch3[2:]
            assert list(sampler) == epoch3


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
