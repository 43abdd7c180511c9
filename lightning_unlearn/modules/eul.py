"""EUL (Chen & Yang, EMNLP 2023): train small unlearning layers inside a frozen model, one set per request.

The teacher ``F`` is the frozen model and the student ``F'`` the same model with its adapters
(:mod:`lightning_unlearn.models.adapters`) switched on, so one copy of the weights serves both. At the end
of ``fit`` the request's adapters and the Gram matrices of their inputs are saved to
``<log dir>/unlearning_layers/``; ``lightning-unlearn fuse`` merges the sets of
several requests and ``--model.adapters DIR`` loads a (fused) set to test or continue from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..losses.functional import kl_on_labelled, nll_mean
from ..models.adapters import (
    ATTRIBUTE, Activation, adapters_disabled, apply_adapter_set, collect_grams, extract_adapter_set,
    insert_adapters, load_adapter_set, load_grams, recording_grams, save_adapter_set,
)
from ..models.build import load_small
from ..models.loading import DType, resolve_dtype
from ..offset.combined import CombinedModel
from .base import PartOutput, UnlearnModule, with_step_loss
from .divergence import ForgetNLLBound

Schedule = Literal["mixed", "alternate"]
ADAPTER_KEY = f".{ATTRIBUTE}."
GRAMS_KEY = "eul_grams"


def eul_objective(
    forget: PartOutput | None, retain: PartOutput | None, alpha: float = 0.8, retain_weight: float = 1.0,
    gamma: float = 0.2,
) -> dict[str, Tensor]:
    """``alpha * KL(F||F')_retain - KL(F||F')_forget + retain_weight * NLL(retain) - gamma * NLL(forget)``.

    ``logits`` of each part are the student's ``F'``, ``ref_logits`` the teacher's ``F``; KL and NLL are
    means over answer (labelled) tokens. A missing part contributes no terms (alternating schedule).
    ``forget_loss`` and ``retain_loss`` are the two halves of the total.
    """
    anchor = (forget or retain).logits
    zero = anchor.new_zeros(())
    kl_f = kl_on_labelled(forget.ref_logits, forget.logits, forget.labels) if forget else zero
    nll_f = nll_mean(forget.logits, forget.labels) if forget else zero
    kl_r = kl_on_labelled(retain.ref_logits, retain.logits, retain.labels) if retain else zero
    nll_r = nll_mean(retain.logits, retain.labels) if retain else zero
    forget_loss = -kl_f - gamma * nll_f
    retain_loss = alpha * kl_r + retain_weight * nll_r
    return {
        "loss": forget_loss + retain_loss, "forget_loss": forget_loss, "retain_loss": retain_loss,
        "kl_forget": kl_f, "nll_forget": nll_f, "kl_retain": kl_r, "nll_retain": nll_r,
    }


class UnlearningLayersCombined(CombinedModel):
    """EUL's combined model: the student ``F'`` (the model with its unlearning layers on) as the one model, and the
    teacher ``F`` (the same weights with them off) as its reference; no copy, no large model.

    While :attr:`recording` is set (EUL's training steps), the student's forward adds its inputs to the layers' Gram
    matrices (over attended tokens), which fusion needs. Shared-prefix scoring is not offered: the evaluation scores
    whole rows through :meth:`forward`, as it always has for EUL.
    """

    def __init__(self, model: nn.Module, vocab_size: int) -> None:
        super().__init__([model], vocab_size=vocab_size)
        self.recording = False

    def logits_and_reference(self, input_ids: Tensor, attention_mask: Tensor, with_reference: bool = False,
                             use_cache: bool | None = None) -> tuple[Tensor, Tensor | None]:
        """Student logits (float32; Gram matrices recorded while :attr:`recording`) and, if asked, the teacher's
        (layers off, eval mode, no gradient)."""
        model = self.trainable
        with recording_grams(model, attention_mask if self.recording else None):
            logits = self.offset_logits(input_ids, attention_mask)[0]
        if not with_reference:
            return logits, None
        was_training = model.training
        model.eval()  # a deterministic teacher, whatever dropout the model has
        try:
            with adapters_disabled(model), torch.no_grad():
                return logits, self.offset_logits(input_ids, attention_mask)[0]
        finally:
            model.train(was_training)

    @property
    def continuation_fn(self) -> None:
        return None


class EUL(ForgetNLLBound, UnlearnModule):
    """Efficient unlearning with unlearning layers: only the adapters train, the model stays frozen.

    ``L = alpha * KL(F||F')_retain - KL(F||F')_forget + retain_weight * NLL(retain) - gamma * NLL(forget)``
    (the paper's alpha, lambda, gamma = 0.8, 1.0, 0.2). Direct mode only.

    The Gram matrices that make fusion possible are accumulated over every attended (non-padding) token
    of the training batches the student sees, prompt tokens included: the adapters transform those
    hidden states too, and answers depend on them through attention. Every epoch adds to them, so a
    request's weight in a fusion grows with its tokens times its epochs.

    Args:
        alpha: weight of the KL to the teacher on retain data.
        gamma: weight of the negated NLL on forget data.
        retain_weight: weight of the NLL on retain data (lambda in the paper).
        schedule: ``mixed``: every batch has forget and retain terms; ``alternate``: the paper's
            alternation by epoch, forget terms only in even epochs (0, 2, ...) and retain terms only in
            odd ones, so an even ``max_epochs`` ends on a retain epoch.
        bottleneck: adapter width; ``null`` sizes the adapters to ``param_fraction`` of the model.
        param_fraction: share of the model's parameters the adapters take when ``bottleneck`` is null.
        activation: non-linearity of the adapters.
        adapter_dtype: dtype of the adapters, whatever ``small_dtype`` the frozen model is loaded in.
        adapter_seed: seed of the adapters' initialisation; keep it equal across requests to be fused.
        adapters: directory of a saved (e.g. fused) adapter set to start from or to test; its Gram
            matrices are not carried over (a run records only its own data).
        record_grams: accumulate the Gram matrices (float64, ``(d+1)^2`` per layer) needed for fusion.
        stop_forget_nll: stop training once the forget NLL of an optimizer step exceeds this (its forget terms
            are ascent, unbounded; see :class:`.divergence.ForgetNLLBound`); ``null``: no bound.
        large_model: must stay ``null``: EUL unlearns one model directly.
    """

    modes = ("direct",)  # its unlearning layers sit inside the one model it unlearns

    def __init__(
        self,
        alpha: float = 0.8,
        gamma: float = 0.2,
        retain_weight: float = 1.0,
        schedule: Schedule = "mixed",
        bottleneck: int | None = None,
        param_fraction: float = 0.005,
        activation: Activation = "gelu",
        adapter_dtype: DType = "float32",
        adapter_seed: int = 0,
        adapters: str | None = None,
        record_grams: bool = True,
        stop_forget_nll: float | None = None,
        large_model: str | None = None,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if large_model is not None:
            raise ValueError(
                f"EUL runs in direct mode only (large_model={large_model!r} given): its unlearning layers sit "
                "inside the model being unlearned. Set --model.large_model null."
            )
        unsupported = {k: kwargs[k] for k in ("lora_rank", "large_device", "logit_cache") if kwargs.get(k) is not None}
        if unsupported:  # its own adapters are the trainable part, and its teacher is computed in place
            raise ValueError(f"EUL does not take {sorted(unsupported)}: its unlearning layers are the only trainable "
                             "parameters and its teacher is the same model with them off.")
        super().__init__(alpha=alpha, gamma=gamma, retain_weight=retain_weight, large_model=None, **kwargs)
        self._pending_grams: dict[str, Tensor] | None = None
        self.adapters_path: Path | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        return ("forget", "retain")

    def build_combined(self) -> UnlearningLayersCombined:
        """The model loaded frozen with the only trainable parameters inserted: the unlearning layers."""
        h = self.hparams
        model = load_small(h, frozen=True)
        if h.adapters:
            apply_adapter_set(model, load_adapter_set(h.adapters), dtype=resolve_dtype(h.adapter_dtype))
        else:
            insert_adapters(model, h.bottleneck, h.param_fraction, h.activation, h.adapter_seed,
                            resolve_dtype(h.adapter_dtype))
        model.train()  # Hugging Face checkpoints layers only in training mode
        if h.gradient_checkpointing:  # reentrant checkpointing would cut the gradient to adapters behind frozen layers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return UnlearningLayersCombined(model, self.vocab_size)

    def configure_model(self) -> None:
        """Build the model, then resume Gram sums a checkpoint loaded before it was built."""
        if self.model is not None:
            return
        super().configure_model()
        if self._pending_grams is not None:
            load_grams(self.model, self._pending_grams)

    def active_parts(self) -> tuple[str, ...]:
        """The data parts whose terms this step optimises (see ``schedule``)."""
        if self.hparams.schedule == "mixed":
            return ("forget", "retain")
        return ("forget",) if self.current_epoch % 2 == 0 else ("retain",)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        parts = {name: batch[name] for name in self.active_parts()}
        self.combined.recording = self.training and self.hparams.record_grams
        try:
            out = self.run_parts(parts, with_reference=True)
        finally:
            self.combined.recording = False
        h = self.hparams
        forget, retain = out.get("forget"), out.get("retain")
        losses = eul_objective(forget, retain, h.alpha, h.retain_weight, h.gamma)
        terms = []  # each half is a combination of token means over one part
        if forget is not None:
            self.note_forget_nll(forget, losses["nll_forget"])
            terms.append((losses["forget_loss"], forget, "tokens"))
        if retain is not None:
            terms.append((losses["retain_loss"], retain, "tokens"))
        return with_step_loss(losses, terms)

    # --- the request's adapter set and checkpoints ----------------------------------------------------------

    def summed_grams(self) -> dict[str, Tensor]:
        """Gram matrices summed over all processes (each saw its own shard of the data); collective call."""
        grams = collect_grams(self.model)
        if self._trainer is not None and self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            grams = {k: strategy.reduce(v.to(self.device).clone(), reduce_op="sum") for k, v in grams.items()}
        return grams

    def on_train_end(self) -> None:
        """Save this request's adapters and Gram matrices to ``<log dir>/unlearning_layers/``."""
        grams = self.summed_grams()
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / ATTRIBUTE
        if self.trainer.is_global_zero:
            self.adapters_path = save_adapter_set(extract_adapter_set(self.model, grams), out)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapters (the base model reloads from its id) and the Gram matrices so far."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if ADAPTER_KEY not in k]:
            del state[key]
        checkpoint[GRAMS_KEY] = {k: v.cpu() for k, v in self.summed_grams().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint without adapter weights; resume the Gram sums (on one process only)."""
        if self.model is not None:
            missing = [k for k in self.state_dict() if ADAPTER_KEY in k and k not in checkpoint["state_dict"]]
            if missing:
                raise KeyError(f"The checkpoint lacks {len(missing)} adapter weights, e.g. {missing[:3]}: is it "
                               "from another model or bottleneck?")
        grams = checkpoint.get(GRAMS_KEY)
        if grams is None or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        if self.model is None:
            self._pending_grams = grams
        else:
            load_grams(self.model, grams)
