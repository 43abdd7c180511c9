"""The checkpoint rule: the best forget quality among the epochs that keep the utility floor."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_unlearn.evaluation.selection import UtilityFloorCheckpoint, select, selection_score


def test_score_is_quality_above_the_floor_and_below_it_ranks_by_utility() -> None:
    assert selection_score(0.25, 0.95, floor=0.9) == 0.25
    assert selection_score(0.25, 0.9, floor=0.9) == 0.25, "the floor itself is acceptable"
    assert selection_score(0.99, 0.85, floor=0.9) == pytest.approx(-1.15)
    assert selection_score(1e-9, 0.91, floor=0.9) > selection_score(1.0, 0.89, floor=0.9)
    assert selection_score(0.5, 0.7, floor=0.9) < selection_score(0.0, 0.8, floor=0.9) < 0
    assert selection_score(None, 0.95, floor=0.9) == -math.inf
    assert selection_score(0.5, float("nan"), floor=0.9) == -math.inf


class ScriptedValidation(BoringModel):
    """A model whose validation logs the given (forget quality, utility ratio) of each epoch."""

    def __init__(self, script: list[tuple[float, float]]) -> None:
        super().__init__()
        self.script = script

    def on_validation_epoch_end(self) -> None:
        quality, ratio = self.script[self.current_epoch]
        self.log_dict({"val/forget_quality": quality, "val/model_utility_vs_retain": ratio})


@pytest.mark.parametrize(("script", "best"), [
    ([(0.001, 0.98), (0.5, 0.85), (0.2, 0.93), (0.05, 0.95)], 2),  # epoch 1 forgets most but is below the floor
    ([(0.3, 0.5), (0.1, 0.8), (0.4, 0.7)], 1),  # none keeps the floor: the closest to it
])
def test_checkpoint_keeps_the_epoch_the_rule_picks(tmp_path: Path, script: list, best: int) -> None:
    torch.manual_seed(0)
    callback = UtilityFloorCheckpoint(floor=0.9, dirpath=tmp_path, filename="best-{epoch}")
    trainer = L.Trainer(max_epochs=len(script), limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(ScriptedValidation(script))
    assert Path(callback.best_model_path).name == f"best-epoch={best}.ckpt"
    assert float(callback.best_model_score) == pytest.approx(selection_score(*script[best], floor=0.9))


def test_validation_without_the_utility_ratio_names_the_fix(tmp_path: Path) -> None:
    class NoRatio(BoringModel):
        def on_validation_epoch_end(self) -> None:
            self.log("val/forget_quality", 0.5)

    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[UtilityFloorCheckpoint(dirpath=tmp_path)], default_root_dir=tmp_path)
    with pytest.raises(KeyError, match="retain_reference"):
        trainer.fit(NoRatio())


def test_mode_must_be_max() -> None:
    with pytest.raises(ValueError, match="max"):
        UtilityFloorCheckpoint(mode="min")


def test_select_picks_among_summaries_by_the_same_rule() -> None:
    sweep = [{"alpha": 0.5, "forget_quality": 1e-4, "model_utility_vs_retain": 0.99},
             {"alpha": 1.0, "forget_quality": 0.2, "model_utility_vs_retain": 0.92},
             {"alpha": 2.0, "forget_quality": 0.8, "model_utility_vs_retain": 0.6}]
    assert select(sweep)["alpha"] == 1.0
    assert select(sweep, floor=0.5)["alpha"] == 2.0
    assert select(sweep, floor=1.0)["alpha"] == 0.5, "none keeps the floor: the closest to it"
    with pytest.raises(ValueError, match="at least one"):
        select([])
