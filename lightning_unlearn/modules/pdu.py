"""PDU (Entesari et al. 2025): forgetting as a constrained problem, solved by primal-dual descent.

    minimise  L_forget(theta)   subject to   L_retain(theta) <= eps

with ``L_forget`` the logit-flattening loss (:func:`~lightning_unlearn.losses.per_token.logit_flattening_loss`)
and ``L_retain`` the retain NLL (or KL to the original). The Lagrangian
``gamma * L_forget + lambda * (L_retain - eps)`` is minimised in the weights while the dual variable follows the
constraint's violation after every optimizer step, ``lambda <- max(0, lambda + dual_step_size * (L_retain - eps))``:
it grows while the retain loss is above ``eps`` and shrinks back once it is below, so ``eps`` (in the retain
loss's units, nats per token for the NLL) replaces a hand-tuned retain weight.

How this differs from open-unlearning's ``src/trainer/unlearn/pdu.py`` (defaults there: dual step 1, 5 warm-up
epochs, ``retain_loss_eps`` required; its TOFU runs: initial lambda 100, step 5, eps 0.3, lr 1e-5, 10 epochs):

- lambda is updated once per optimizer step with the step's retain loss (its token mean over every
  accumulated micro-batch and every process); the reference updates it at every micro-batch with that
  micro-batch's loss, so under DDP each process ends with its own lambda;
- lambda is saved in checkpoints and restored on resume (the reference keeps it in memory only);
- only the per-step update is implemented (the reference can also update once per epoch).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ..losses.per_token import logit_flattening_loss
from .base import PartOutput, UnlearnModule, with_step_loss


class PDU(UnlearnModule):
    """Primal-dual unlearning: ``loss = gamma * mean_t (max_v z - mean_v z)^2 + lambda * (L_retain - eps)``.

    ``retain_weight`` is the dual variable's initial value; the current one is logged as ``train/dual`` and
    kept in checkpoints. With ``dual_step_size: 0`` lambda stays fixed (a plain weighted sum).

    Args:
        retain_loss_eps: the constraint's bound on the retain loss ``eps``: set it somewhat above the retain
            loss of the model before unlearning (open-unlearning's TOFU runs: 0.3).
        dual_step_size: step of the dual ascent on lambda per optimizer step.
        dual_warmup_epochs: epochs before lambda starts to move (lambda stays at ``retain_weight`` until then).
        retain_loss: what the constraint bounds: ``nll`` (the paper) or ``kl`` to the original model.
        retain_weight: lambda's initial value (open-unlearning's TOFU runs: 100, the forget loss being in
            squared logits).
    """

    def __init__(
        self,
        retain_loss_eps: float = 0.3,
        dual_step_size: float = 1.0,
        dual_warmup_epochs: int = 5,
        retain_loss: Literal["nll", "kl"] = "nll",
        retain_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if dual_step_size < 0 or dual_warmup_epochs < 0 or retain_weight < 0:
            raise ValueError("PDU needs dual_step_size, dual_warmup_epochs and retain_weight (lambda's start) >= 0, "
                             f"got {dual_step_size}, {dual_warmup_epochs}, {retain_weight}.")
        super().__init__(retain_weight=retain_weight, **kwargs)
        self.retain_loss = retain_loss
        self.dual = float(retain_weight)
        self._retain_step: Tensor | None = None  # this optimizer step's retain loss so far (its share of the mean)

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        forget = out["forget"]
        return logit_flattening_loss(forget.logits, forget.labels)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """``loss = gamma * forget + lambda * (retain - eps)`` with lambda the current dual variable; ``retain_loss``
        is the retain term itself; during training also ``step_loss`` (the step's token means) and the step's
        retain loss is noted for the dual update."""
        out = self.run_parts(batch, with_reference=self.uses_reference)
        forget, retain = self.forget_loss(out), self.retain_term(out)
        h = self.hparams
        slack = retain - h.retain_loss_eps
        losses = {"loss": h.gamma * forget + self.dual * slack, "forget_loss": forget, "retain_loss": retain,
                  "dual": torch.tensor(self.dual, device=forget.device)}
        self._note_retain(out["retain"], retain)
        return with_step_loss(losses, [(h.gamma * forget, out["forget"], "tokens"),
                                       (self.dual * slack, out["retain"], "tokens")])

    def _note_retain(self, retain: PartOutput, value: Tensor) -> None:
        """Add this micro-batch's retain loss to the optimizer step's mean (what the dual update reads)."""
        if not self.training or self._trainer is None:
            return
        scale = retain.token_scale if retain.token_scale is not None else 1.0
        share = value.detach() * scale / self.trainer.accumulate_grad_batches
        self._retain_step = share if self._retain_step is None else self._retain_step + share

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Apply the weights' update, then the dual ascent step on lambda with this step's retain loss.

        The retain loss is averaged over processes, so every process takes the same lambda. The update comes
        before ``on_train_batch_end``, where ``ModelCheckpoint`` saves: a checkpoint holds the weights and the
        lambda of the same step.
        """
        super().optimizer_step(*args, **kwargs)
        noted, self._retain_step = self._retain_step, None
        h = self.hparams
        if noted is None or self.current_epoch < h.dual_warmup_epochs or h.dual_step_size == 0:
            return
        step_retain = float(self.trainer.strategy.reduce(noted, reduce_op="mean"))
        self.dual = max(0.0, self.dual + h.dual_step_size * (step_retain - h.retain_loss_eps))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["pdu_dual"] = self.dual

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "pdu_dual" in checkpoint:
            self.dual = float(checkpoint["pdu_dual"])
