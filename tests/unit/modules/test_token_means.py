"""Token and sequence means over the whole optimizer step: the update does not depend on how a step is split.

One SGD step over four forget examples whose answers are 23, 101, 73 and 36 labelled tokens long (issue 10),
taken as 1 micro-batch of 4, 2 accumulated micro-batches of 2 and 4 accumulated micro-batches of 1. Before
the means spanned the step (each micro-batch averaged over its own tokens and sequences, Lightning then
averaging the micro-batches), the relative difference of the update from 1 x 4, ``||u - u_1x4|| / ||u_1x4||``,
was, for 2 x 2 and 4 x 1:

    GA 0.0522, 0.566 | GD 0.0519, 0.470 | KL 0.0522, 0.566 | NPO 6.35e-4, 1.21e-3 | DPO 5.36e-4, 1.02e-3 |
    SimNPO 0.0493, 0.0937 | LLMU 0.0480, 0.353 | EUL 0.0309, 0.115 | SFT 0.0522, 0.566

(NPO and DPO only through their ``nll`` retain term: their forget terms are means over sequences, and the
micro-batches were equal). Now every loss gives the same update to about 1e-7 (float32 rounding).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_unlearn.data.datasets import PairedDataset, PairingSampler
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.data.steps import STEP_KEY, StepDataset, StepIndex, StepSampler, collate_steps
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import GA, GD
from token_means_cases import LOSSES, SPLITS, one_step, relative_difference, trainables, write_dataset


@pytest.fixture(scope="module")
def data(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tiny_world["tokenizer"], tmp_path_factory.mktemp("token_means"))


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_split_of_a_step_gives_the_same_update(loss: str, tiny_world: dict, data: Path, tmp_path: Path) -> None:
    updates = {name: one_step(tiny_world, data, loss, *split, tmp_path / name) for name, split in SPLITS.items()}
    reference = updates["1x4"]
    assert sum(float(u.abs().sum()) for u in reference.values()) > 1e-3  # a real update to compare
    for name in ("2x2", "4x1"):
        assert relative_difference(updates[name], reference) < 1e-6, name


def test_the_last_shorter_step_of_an_epoch_is_exact_too(tiny_world: dict, data: Path, tmp_path: Path) -> None:
    """Four examples in steps of three: the second step is one micro-batch, which Lightning still divides by 3."""

    def two_steps(batch_size: int, accumulate: int, root: Path) -> dict[str, torch.Tensor]:
        module = GD(small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="float32",
                    optimizer=partial(torch.optim.SGD, lr=1.0))
        datamodule = UnlearnDataModule(forget_split="forget", retain_split="retain", dataset=str(data),
                                       batch_size=batch_size, max_length=256, evaluation="loss")
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, limit_val_batches=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root)
        trainer.fit(module, datamodule=datamodule)
        assert trainer.global_step == 2
        return trainables(module)

    accumulated, whole = two_steps(1, 3, tmp_path / "accumulated"), two_steps(3, 1, tmp_path / "whole")
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-6, msg=name)


def test_logged_losses_are_means_over_the_micro_batch(tiny_world: dict, data: Path, tmp_path: Path) -> None:
    """What is logged stays a per-token mean (of the last micro-batch), not the step-scaled objective."""
    module = GA(small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="float32")
    datamodule = UnlearnDataModule(forget_split="forget", retain_split="retain", dataset=str(data), batch_size=1,
                                   max_length=256, evaluation="loss")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=4, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    assert "train/step_loss" not in metrics
    assert 3.0 < -metrics["train/forget_loss"].item() < 10.0  # an NLL per token of a 400-token vocabulary
    assert metrics["train/loss"].item() == pytest.approx(metrics["train/forget_loss"].item())


# --- the step plan -----------------------------------------------------------------------------------------


def plan(n: int, replicas: int, batch_size: int, accumulate: int, limit: int | float = 1.0) -> list[list[StepIndex]]:
    """Every rank's indices of one epoch of ``n`` examples."""
    samplers = [StepSampler(list(range(n)), num_replicas=replicas, rank=r, seed=3,  # type: ignore[arg-type]
                            batch_size=batch_size, accumulate_grad_batches=accumulate, limit_train_batches=limit)
                for r in range(replicas)]
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize(("n", "replicas", "batch_size", "accumulate", "limit"),
                         [(7, 2, 2, 2, 1.0), (10, 1, 3, 2, 1.0), (9, 3, 1, 2, 2), (8, 2, 1, 3, 0.75)])
def test_each_index_carries_the_pairs_of_its_whole_step(n: int, replicas: int, batch_size: int, accumulate: int,
                                                         limit: int | float) -> None:
    ranks = plan(n, replicas, batch_size, accumulate, limit)
    batches = -(-len(ranks[0]) // batch_size)
    trained = (min(batches, limit) if isinstance(limit, int) else int(batches * limit)) * batch_size
    per_step = batch_size * accumulate
    for start in range(0, trained, per_step):  # the last step takes what remains of the trained batches
        end = min(start + per_step, trained)
        expected = sorted((i.forget_index, i.draw) for rank in ranks for i in rank[start:end])
        for rank in ranks:
            for index in rank[start:end]:
                assert sorted(index.group) == expected and index.micro_batches == accumulate * replicas
    assert all(i.group is None for rank in ranks for i in rank[trained:])  # never trained: Lightning stops before
    for r, rank in enumerate(ranks):  # the plan changes no order: each rank's pairs are the pairing sampler's
        assert [(i.forget_index, i.draw) for i in rank] == list(
            PairingSampler(list(range(n)), num_replicas=replicas, rank=r, seed=3))  # type: ignore[arg-type]


def test_a_resumed_epoch_keeps_its_steps() -> None:
    sampler = StepSampler(list(range(10)), seed=1, batch_size=2, accumulate_grad_batches=2)  # type: ignore[arg-type]
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(0)
    sampler.resume_at(2, 4)
    assert list(sampler) == whole[4:]


def test_batches_carry_the_label_counts_of_their_step(tiny_world: dict) -> None:
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=256)
    forget, retain = load_split("bundled", "forget01")[:5], load_split("bundled", "retain99")[:9]
    dataset = StepDataset(PairedDataset(forget, retain, formatter, ("forget", "retain")))
    sampler = StepSampler(dataset, num_replicas=2, rank=1, seed=0, batch_size=2, accumulate_grad_batches=1)
    indices = list(sampler)  # rank 1 of 2 takes 3 of the 6 padded pairs: batches of 2 and 1
    pad = formatter.tokenizer.pad_token_id
    batch = collate_steps([dataset[i] for i in indices[:2]], pad)
    items = [dataset.dataset[pair] for pair in indices[0].group]
    assert len(items) == 4  # two micro-batches of 2, one per rank
    for part in ("forget", "retain"):
        assert batch[part]["step_tokens"].item() == sum(
            sum(1 for label in item[part].labels[1:] if label >= 0) for item in items)
        assert batch[part]["step_sequences"].item() == 4 and batch[part]["step_micro_batches"].item() == 2
    plain = collate_parts([dataset.dataset[(i.forget_index, i.draw)] for i in indices[:2]], pad)
    for part in plain:
        for key, value in plain[part].items():
            assert torch.equal(batch[part][key], value)
    assert STEP_KEY not in batch
    last = collate_steps([dataset[indices[2]]], pad)  # the epoch's last, shorter step: 1 item on each rank
    assert last["forget"]["step_sequences"].item() == 2
    with pytest.raises(RuntimeError, match="spans two optimizer steps"):
        collate_steps([dataset[indices[0]], dataset[indices[2]]], pad)


def test_one_micro_batch_per_step_gives_plain_means_and_a_mismatched_plan_is_refused(tiny_world: dict) -> None:
    module = GD(small_model=tiny_world["small"], large_model=tiny_world["large"])
    module.setup("fit")
    module.configure_model()
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=256)
    forget, retain = load_split("bundled", "forget01")[:3], load_split("bundled", "retain99")[:3]
    dataset = StepDataset(PairedDataset(forget, retain, formatter, ("forget", "retain")))
    indices = list(StepSampler(dataset, seed=0, batch_size=3))
    batch = collate_steps([dataset[i] for i in indices], formatter.tokenizer.pad_token_id)
    plain = module.compute_losses(batch)  # no trainer: plain means, no step objective
    assert "step_loss" not in plain
    module._trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1)  # what a trainer exposes here
    module.train()
    stepped = module.compute_losses(batch)
    assert stepped["step_loss"].item() == pytest.approx(stepped["loss"].item(), rel=1e-6)
    assert stepped["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)
    module.eval()  # validation and test take plain means, whatever the batch carries
    assert "step_loss" not in module.compute_losses(batch)
    module.train()
    module._trainer = SimpleNamespace(accumulate_grad_batches=2, world_size=1)
    with pytest.raises(RuntimeError, match="planned for 1 micro-batches per optimizer step, but the trainer runs 2"):
        module.compute_losses(batch)
