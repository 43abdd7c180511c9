"""Stopping a run that diverges, and stopping ascent once forgetting is reached.

Gradient ascent is unbounded: with a large learning rate the forget NLL grows without limit (a loss of
-6.5e5 and more) and weights overflow; NPO at an absurd learning rate trains on with ``nan`` losses. Two
mechanisms, both used by every method:

- :class:`DivergenceGuard` (a callback every module installs) raises :class:`DivergenceError` as soon as a
  loss, a gradient or a weight is non-finite, naming the step, the loss and what to change; it stops before
  the optimizer applies a non-finite gradient and before ``ModelCheckpoint`` can save non-finite weights,
  and :func:`require_finite_weights` makes every checkpoint write and export refuse them, so the last good
  checkpoint stays the last one.
- :class:`ForgetNLLBound`, the ``stop_forget_nll`` option of the losses whose forget term is ascent (GA,
  GD, KL, LLMU, EUL): training stops once the forget NLL of an optimizer step exceeds a bound, LLMU's
  stopping rule (Yao et al. 2023), instead of running on until it blows up.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from .parts import PartOutput


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""


def non_finite(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (one device synchronisation for all of them).

    A sharded tensor (FSDP2's ``DTensor``) is checked in this rank's shard only, with no collective, so that a rank
    may check alone; callers that act on all ranks reduce the decision (``DivergenceGuard``)."""
    names = list(tensors)
    if not names:
        return []
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors.values()]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def trainable_parameters(module: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def require_finite_weights(module: torch.nn.Module, action: str) -> None:
    """Refuse ``action`` (a checkpoint write, an export) when a trainable weight is NaN or infinite.

    Raises:
        DivergenceError: naming the first non-finite weights.
    """
    bad = non_finite({n: p.detach() for n, p in trainable_parameters(module).items()})
    if bad:
        raise DivergenceError(
            f"Refusing {action}: {len(bad)} trainable weight tensors hold NaN or infinite values (e.g. {bad[:3]}); "
            "training diverged. Earlier checkpoints are kept. Lower the learning rate, raise the retain weight or "
            "stop earlier (stop_forget_nll)."
        )


def _format(value: Tensor | float) -> str:
    return f"{float(value):.6g}"


class DivergenceGuard(L.Callback):
    """Raises :class:`DivergenceError` when training goes non-finite, before anything non-finite is saved.

    Per micro-batch it records (without a device synchronisation) whether the back-propagated loss is
    finite; before each optimizer step it checks that and the gradients, after the step the weights. The
    decision is taken jointly by all processes (a process stopping alone would leave the others waiting at
    their next collective). Runs before ``ModelCheckpoint``, which Lightning calls last.
    """

    def __init__(self) -> None:
        self._finite: Tensor | None = None
        self._losses: list[dict[str, Tensor]] = []
        self._checked_step = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._finite is None:
            self._losses = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        self._losses.append({**getattr(pl_module, "last_losses", {}), "back-propagated": loss.detach()})

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        loss_ok = bool(self._finite) if self._finite is not None else True
        self._finite = None
        grads = {n: p.grad for n, p in trainable_parameters(pl_module).items() if p.grad is not None}
        bad_grads = non_finite(grads)
        if trainer.strategy.reduce_boolean_decision(not loss_ok or bool(bad_grads), all=False):
            if not loss_ok:
                what = "the loss is not finite"
            elif bad_grads:
                what = f"the gradients of {len(bad_grads)} weight tensors are not finite (e.g. {bad_grads[:2]})"
            else:
                what = "another process's loss or gradients are not finite"
            raise DivergenceError(self.message(trainer, pl_module, what, applied=False))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._checked_step or self._finite is not None:
            return  # no optimizer step since the last check (accumulating)
        self._checked_step = trainer.global_step
        bad = non_finite({n: p.detach() for n, p in trainable_parameters(pl_module).items()})
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            what = f"the update made {len(bad)} weight tensors non-finite (e.g. {bad[:2]})"
            raise DivergenceError(self.message(trainer, pl_module, what, applied=True))

    def message(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str, applied: bool) -> str:
        """What happened (step, losses), what was kept, and what to change."""
        step = trainer.global_step - 1 if applied else trainer.global_step
        losses = next((r for r in self._losses if non_finite(r)), self._losses[-1] if self._losses else {})
        values = ", ".join(f"{k}={_format(v)}" for k, v in losses.items()) or "not recorded"
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", "")
        kept = (f"the last checkpoint written, {checkpoint}, holds finite weights" if checkpoint
                else "no checkpoint was written")
        h = pl_module.hparams
        lrs = ", ".join(f"{group['lr']:g}" for opt in trainer.optimizers for group in opt.param_groups)
        fixes = [f"lower the learning rate (now {lrs})"]
        if "retain_weight" in h and "retain" in getattr(pl_module, "parts", ()):
            fixes.append(f"raise the retain weight (model.retain_weight, now {h.retain_weight:g}) so the retain term "
                         "holds the model")
        if "stop_forget_nll" in h:
            bound = h.stop_forget_nll
            fixes.append("stop once forgetting is reached with a bound on the forget NLL (model.stop_forget_nll, "
                         f"now {'unset' if bound is None else f'{bound:g}'})")
        else:
            fixes.append("train fewer steps (trainer.max_steps)")
        state = ("the weights in memory are non-finite and were not saved" if applied
                 else "this step's update was not applied")
        return (f"Training diverged at step {step} (epoch {trainer.current_epoch}): {what}. Losses of the micro-batch: "
                f"{values}. Training stopped; {state}; {kept}. To fix it, " + "; or ".join(fixes) + ".")


class ForgetNLLBound:
    """``stop_forget_nll``: stop training once the forget NLL of an optimizer step exceeds the bound.

    For the losses whose forget term is ascent, which is unbounded. The value compared is the mean of the
    forget NLL over every forget answer token of the step (all micro-batches and processes, using the
    step factors of :func:`~lightning_unlearn.losses.functional.step_scale`), so every process takes the same
    decision; the step that reaches the bound still applies its update. The module's hyper-parameters must
    hold ``stop_forget_nll`` (``None``: no bound). Mixed into a :class:`~.base.UnlearnModule` subclass.
    """

    _forget_nll_step: tuple[int, Tensor] | None = None

    def note_forget_nll(self, forget: PartOutput, nll: Tensor) -> None:
        """Add this micro-batch's forget NLL (its token mean) to the current optimizer step's mean."""
        bound = self.hparams.get("stop_forget_nll")  # type: ignore[attr-defined]
        if bound is None or not self.training or self._trainer is None:  # type: ignore[attr-defined]
            return
        trainer = self.trainer  # type: ignore[attr-defined]
        scale = forget.token_scale if forget.token_scale is not None else 1.0
        share = nll.detach() * scale / trainer.accumulate_grad_batches
        if self._forget_nll_step is None:
            self._forget_nll_step = (trainer.global_step, share)
        else:
            self._forget_nll_step = (self._forget_nll_step[0], self._forget_nll_step[1] + share)

    def on_train_start(self) -> None:
        self._forget_nll_step = None
        super().on_train_start()  # type: ignore[misc]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step, compare its forget NLL (averaged over processes) with the bound."""
        super().on_train_batch_end(outputs, batch, batch_idx)  # type: ignore[misc]
        noted, trainer = self._forget_nll_step, self.trainer  # type: ignore[attr-defined]
        if noted is None or trainer.global_step == noted[0]:
            return  # nothing noted, or the step is still accumulating
        self._forget_nll_step = None
        step, share = noted
        value = float(trainer.strategy.reduce(share, reduce_op="mean"))
        bound = self.hparams.stop_forget_nll  # type: ignore[attr-defined]
        if value > bound:
            trainer.should_stop = True
            rank_zero_info(f"{type(self).__name__}: forget NLL {value:.4g} exceeds stop_forget_nll={bound:g} at step "
                           f"{step}: stopping training.")
