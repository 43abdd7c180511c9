"""A diverging run stops with a message naming the step, the loss and what to change, and never saves
non-finite weights; gradient ascent stops at a bound on the forget NLL.

On the tiny test models (AdamW, batches of 4 from forget01, a checkpoint after every step, 40 steps), before:
GA at lr 1e3 went from a loss of -6.0 (step 0) to -9.7e6 (step 1) and nan from step 2, NPO at lr 1e4 to nan
losses from step 2; both ran to step 40 without a word and left a last.ckpt of NaN weights. Now the
gradients of step 1 are infinite in both runs (losses -9.68e6 and 18.7): ``DivergenceError`` is raised before
that update is applied, and last.ckpt keeps the finite weights after step 0 (global step 1).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.modules import GA, NPO, divergence
from lightning_unlearn.modules.divergence import DivergenceError

MAX_STEPS = 40


class PoisonAt(L.Callback):
    """Makes one weight NaN right after the optimizer step that ends at ``step`` (as an overflowing update would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad)[0, 0] = float("nan")


def fit(world: dict, root: Path, loss: str, lr: float, *extra: str):
    return main([
        "fit", "--model", loss, "--model.small_model", world["small"], "--model.large_model", world["large"],
        "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", str(lr),
        "--data.forget_split", "forget01", "--data.retain_split", "retain99", "--data.batch_size", "4",
        "--data.max_length", "256", "--data.evaluation", "loss", "--data.eval_subset", "4",
        "--trainer.max_steps", str(MAX_STEPS), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
        "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(root / "ckpt"),
        "--trainer.callbacks.save_last", "true", "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.callbacks.save_top_k", "0", *extra,
    ])


def saved(root: Path) -> dict:
    (path,) = (root / "ckpt").iterdir()  # the last checkpoint only, no other file
    return torch.load(path, weights_only=True)


def all_finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


@pytest.mark.parametrize(
    ("loss", "lr", "advice"),
    [("GA", 1e3, "stop_forget_nll, now unset"), ("NPO", 1e4, "raise the retain weight")],
    ids=["GA-lr1e3", "NPO-lr1e4"],
)
def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    loss: str, lr: float, advice: str, tiny_world: dict, tmp_path: Path
) -> None:
    with pytest.raises(DivergenceError) as raised:
        fit(tiny_world, tmp_path, loss, lr)
    message = str(raised.value)
    assert message.startswith("Training diverged at step 1 (epoch 0): the gradients of")
    assert "Losses of the micro-batch: loss=" in message and "forget_loss=" in message
    assert f"Training stopped; this step's update was not applied; the last checkpoint written, {tmp_path}/ckpt/last.ckpt," \
        in message
    assert f"lower the learning rate (now {lr:g})" in message and advice in message
    checkpoint = saved(tmp_path)
    assert checkpoint["global_step"] == 1 and all_finite(checkpoint)


def test_the_message_names_the_best_checkpoint_when_no_last_one_is_kept() -> None:
    # ModelCheckpoint without save_last leaves last_model_path "": the message then names best_model_path.
    trainer = SimpleNamespace(global_step=3, current_epoch=0, optimizers=[SimpleNamespace(param_groups=[{"lr": 1e-3}])],
                              checkpoint_callback=SimpleNamespace(last_model_path="", best_model_path="ck/best.ckpt"))
    module = SimpleNamespace(hparams={})
    message = divergence.DivergenceGuard().message(trainer, module, "a NaN", applied=False)
    assert "the last checkpoint written, ck/best.ckpt, holds finite weights" in message, message
    trainer.checkpoint_callback = None
    assert "no checkpoint was written" in divergence.DivergenceGuard().message(trainer, module, "a NaN", applied=False)


def test_weights_made_non_finite_by_an_update_are_never_saved(tiny_world: dict, tmp_path: Path) -> None:
    """The update of step 1 (the second) poisons a weight: the checkpoint after step 0 stays, even with a checkpoint
    on exception."""
    with pytest.raises(DivergenceError) as raised:
        fit(tiny_world, tmp_path, "GA", 1e-3, "--trainer.callbacks.save_on_exception", "true",
            "--trainer.callbacks+=test_divergence.PoisonAt", "--trainer.callbacks.step", "2")
    chain = [str(raised.value), str(raised.value.__context__ or "")]
    assert any(m.startswith("Training diverged at step 1 (epoch 0): the update made 1 weight tensors non-finite")
               for m in chain), chain
    checkpoint = saved(tmp_path)
    assert checkpoint["global_step"] == 1 and all_finite(checkpoint)


def test_checkpoints_and_exports_of_non_finite_weights_are_refused(tiny_world: dict, tmp_path: Path) -> None:
    module = NPO(small_model=tiny_world["small"], large_model=tiny_world["large"])
    module.setup("fit")
    module.configure_model()
    module.on_save_checkpoint({"state_dict": module.state_dict()})  # finite: fine
    with torch.no_grad():
        module.model.lm_head.weight[3, 1] = float("inf")
    with pytest.raises(DivergenceError, match=r"Refusing to write a checkpoint: 1 trainable weight tensors .*lm_head"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(DivergenceError, match="Refusing to export"):
        module.export(tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_refusal_counts_every_bad_tensor_and_names_the_first_three() -> None:
    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(3)))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    model.append(frozen)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    # 6 trainable tensors are bad (the frozen layer's NaNs are not trainable weights); named in parameter order.
    with pytest.raises(DivergenceError, match=r"^Refusing to save: 6 trainable weight tensors hold NaN or infinite "
                                              r"values \(e\.g\. \['0\.weight', '0\.bias', '1\.weight'\]\); "):
        divergence.require_finite_weights(model, "to save")


def test_the_forget_nll_bound_stops_gradient_ascent_once_reached(
    tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GA at lr 0.1 ascends to a forget loss of -606 in 40 steps; a bound of 30 stops it once reached."""
    messages: list[str] = []
    monkeypatch.setattr(divergence, "rank_zero_info", messages.append)
    cli = fit(tiny_world, tmp_path, "GA", 0.1, "--model.stop_forget_nll", "30")
    assert isinstance(cli.model, GA) and cli.trainer.should_stop
    step = cli.trainer.global_step
    assert 1 < step < MAX_STEPS
    (message,) = messages
    assert message.startswith("GA: forget NLL ") and message.endswith(
        f"exceeds stop_forget_nll=30 at step {step - 1}: stopping training.")
    assert float(message.split()[3]) > 30
    assert -cli.model.last_losses["forget_loss"].item() > 30  # one micro-batch per step: the step's NLL
    assert saved(tmp_path)["global_step"] == step  # the step that reached the bound was applied and saved


@pytest.mark.parametrize("loss", ["GD", "KL", "EUL", "LLMU", "WGA", "SatImp"])
def test_every_ascent_loss_takes_the_bound(loss: str, tiny_world: dict, tmp_path: Path) -> None:
    large = [] if loss == "EUL" else ["--model.large_model", tiny_world["large"]]
    cli = main(["--model", loss, "--model.small_model", tiny_world["small"], *large,
                "--model.stop_forget_nll", "12.5", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, divergence.ForgetNLLBound) and cli.model.hparams.stop_forget_nll == 12.5
