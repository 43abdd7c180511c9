"""The LightningModule every unlearning method derives from: one combined model, one loss hook, the training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from ..losses.functional import kl_on_labelled, nll_mean
from ..models.loading import DType
from ..models.lora import DEFAULT_TARGETS
from ..numbers import finite
from ..offset.logit_cache import CacheMode
from .checkpoints import check_trainable_keys, prune_checkpoint, trainable_keys
from .combined_module import CombinedModule
from ..distributed.strategy import gather_for_export
from .divergence import DivergenceError, DivergenceGuard, non_finite, require_finite_weights
from .export_target import write_export
from .parts import MeanOver, PartOutput, RetainLoss, step_scales, with_step_loss
from .rng import RestoreRNG

__all__ = ["FROZEN_PREFIXES", "MeanOver", "Mode", "PartOutput", "RetainLoss", "UnlearnModule", "with_step_loss"]

Mode = Literal["offset", "direct"]
"""How a method trains: an offset on a large model (``z_L + alpha (z_S - z_S0)``), or the model itself."""
FROZEN_PREFIXES = ("large.", "reference.")


class UnlearnModule(CombinedModule):
    """Offset unlearning (and its white-box baseline) with the loss left to subclasses.

    Holds one :class:`~lightning_unlearn.offset.combined.CombinedModel` (``self.combined``, built and evaluated by
    :class:`~.combined_module.CombinedModule`): a frozen large model ``L``, a frozen small reference ``S0`` and a
    trainable copy ``S`` of ``S0``; :meth:`forward` returns ``z_L + alpha * (z_S - z_S0)``, so at initialisation the
    combined model *is* ``L`` and training moves only the small offset. With ``large_model: null`` the same losses
    unlearn ``S`` directly (the usual white-box baseline) and ``S0`` serves as the reference. This class keeps the
    training concerns: the loss hooks, the step-normalised objective, the optimizer, checkpoints and the export. A
    method that combines logits otherwise overrides :meth:`build_combined` to supply its own combined model.

    Reference logits for KL/NPO/DPO come for free in offset mode: they are ``z_L``, already computed
    for the offset. In direct mode the frozen copy is run only when the loss needs it.

    Subclasses implement :meth:`forget_loss`; the total is
    ``gamma * forget_loss + retain_weight * retain_term``.

    Args:
        small_model: Hugging Face id or directory of the small model (``S0`` and the start of ``S``). Required:
            its default ``None`` only lets ``--print_config`` print a configuration to fill in; building the
            module without it raises a ``ValueError`` naming ``--model.small_model``.
        large_model: id or directory of the frozen large model, or the address ``http://HOST:PORT/v1`` of a vLLM
            server serving it (a black box: only its log-probabilities are read, see
            :mod:`lightning_unlearn.offset.sources`); ``null`` for direct unlearning.
        tokenizer: tokenizer id or directory; ``null`` takes the small model's.
        alpha: offset strength; can be changed at test time without retraining. Must be finite (NaN or
            infinity is refused here and wherever ``alpha`` is set later, see :attr:`alpha`).
        gamma: weight of the forget loss (finite).
        retain_weight: weight of the retain term (finite).
        large_dtype: dtype of the frozen large model.
        small_dtype: dtype of the small pair (trained in it: keep float32 unless memory forces otherwise).
        optimizer: optimizer over the trainable parameters only.
        lr_scheduler: learning-rate schedule after warmup.
        warmup_steps: optimizer steps of linear warmup.
        gradient_checkpointing: trade compute for memory in the trainable model.
        trust_remote_code: allow models whose code lives on the hub.
        retain_reference: ``TOFU_EVAL.json`` of a model trained on retain data only; forget quality and
            privleak are computed against it (reported as missing without it).
        max_new_tokens: longest greedy generation scored by ROUGE; 0 skips generation.
        export_dir: at the end of ``fit``, save the trained model there as a Hugging Face directory (with
            the tokenizer, and in offset mode an ``offset.json`` naming the large model, the reference and
            alpha), for the next stage of a pipeline or for use outside training. With LoRA only the
            adapter is saved (peft's format; the manifest says ``"adapter": "lora"``).
        lora_rank: train a LoRA adapter of this rank on the small model instead of all its weights
            (``null``: full fine-tuning). The reference ``S0`` is then the same model with the adapter
            disabled, so one small model is in memory; checkpoints and exports hold only the adapter.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``);
            ``null`` means ``2 * lora_rank``.
        lora_dropout: dropout on the adapter's input during training.
        lora_target_modules: module names to adapt, or ``all-linear`` (every linear layer but the head).
        logit_cache: keep the frozen models' logits of every training sequence (``memory`` or ``disk``)
            so that later epochs run only the trainable model; ``null`` recomputes them at every step. See
            :mod:`lightning_unlearn.offset.logit_cache` for what is stored and the precision.
        logit_cache_dir: folder of the disk cache (required with ``disk``; each rank uses a subfolder).
        logit_cache_dtype: storage dtype of cached logits (float16: relative error at most 2**-11).
        large_device: device of the frozen large model (e.g. ``cuda:1``) when it should not sit with the
            small pair; inputs are moved to it and its logits back. ``null``: the module's device.
        large_logprobs: with a served large model, the top-k log-probabilities asked per position (the rest of
            the vocabulary shares the remaining mass, :mod:`lightning_unlearn.offset.topk`); ``null``: the whole
            vocabulary, exact (the server needs ``--max-logprobs`` at least the vocabulary size).
    """

    # What the method registry (:mod:`.registry`) reads: the other names ``--model`` takes for the class (besides its
    # own, matched without regard to case), the modes it runs in, and whether it unlearns (SFT fine-tunes).
    aliases: ClassVar[tuple[str, ...]] = ()
    modes: ClassVar[tuple[Mode, ...]] = ("offset", "direct")
    unlearns: ClassVar[bool] = True
    forget_mean: ClassVar[MeanOver] = "tokens"  # what the forget loss averages over (NPO & co: sequences)

    def __init__(
        self, small_model: str | None = None, large_model: str | None = None, tokenizer: str | None = None,
        alpha: float = 1.0, gamma: float = 1.0, retain_weight: float = 1.0, large_dtype: DType = "bfloat16",
        small_dtype: DType = "float32", optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "linear", "cosine"] = "constant", warmup_steps: int = 0,
        gradient_checkpointing: bool = False, trust_remote_code: bool = False, retain_reference: str | None = None,
        max_new_tokens: int = 200, export_dir: str | None = None, lora_rank: int | None = None,
        lora_alpha: float | None = None, lora_dropout: float = 0.0, lora_target_modules: str | list[str] = DEFAULT_TARGETS,
        logit_cache: CacheMode | None = None, logit_cache_dir: str | None = None, logit_cache_dtype: DType = "float16",
        large_device: str | None = None, large_logprobs: int | None = None,
    ) -> None:  # pragma: no mutate block
        super().__init__(small_model, large_model, tokenizer, alpha, retain_reference, max_new_tokens, logit_cache,
                         logit_cache_dir, large_device)
        self.optimizer_factory = optimizer
        for name, value in (("gamma", gamma), ("retain_weight", retain_weight)):
            finite(value, name, f"--model.{name}")
        self.last_losses: dict[str, Tensor] = {}  # the last training micro-batch's means, as logged
        self.strict_loading = False

    # --- losses -------------------------------------------------------------------------------------------

    def logits_and_reference(self, input_ids: Tensor, attention_mask: Tensor,
                             with_reference: bool = False) -> tuple[Tensor, Tensor | None]:
        """The combined logits and, if asked, the reference's (:meth:`.CombinedModel.logits_and_reference`; the
        frozen logits from the cache while training)."""
        return self.combined.logits_and_reference(input_ids, attention_mask, with_reference, use_cache=self.training)

    def run_parts(self, batch: dict[str, dict[str, Tensor]], with_reference: bool) -> dict[str, PartOutput]:
        """Run every part of the batch through each model in one forward pass and split the results."""
        names = list(batch)
        sizes = [batch[n]["input_ids"].shape[0] for n in names]
        input_ids = torch.cat([batch[n]["input_ids"] for n in names])
        attention_mask = torch.cat([batch[n]["attention_mask"] for n in names])
        logits, ref = self.logits_and_reference(input_ids, attention_mask, with_reference)
        ref_parts = ref.split(sizes) if ref is not None else [None] * len(names)
        return {n: PartOutput(lg, rf, batch[n]["labels"], *self.step_scales(batch[n]))
                for n, lg, rf in zip(names, logits.split(sizes), ref_parts)}

    def step_scales(self, part: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """A training part's step factors (:func:`~.parts.step_scales`); ``(None, None)`` outside training."""
        if not self.training or "step_tokens" not in part or self._trainer is None:
            return None, None
        return step_scales(part, self.trainer.accumulate_grad_batches, self.trainer.world_size)

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        """The method's forget term on ``out["forget"]`` (and any extra parts it asked for)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forget_loss().")

    def retain_term(self, out: dict[str, PartOutput]) -> Tensor:
        """NLL on retain data, KL from the reference on retain data, or nothing."""
        if self.retain_loss == "none":
            return torch.zeros((), device=self.device)
        retain = out["retain"]
        if self.retain_loss == "nll":
            return nll_mean(retain.logits, retain.labels)
        return kl_on_labelled(retain.ref_logits, retain.logits, retain.labels)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """``loss = gamma * forget_loss + retain_weight * retain_loss``, each a mean over the micro-batch, and
        during training ``step_loss``: the same with each mean scaled to its share of the optimizer step's
        mean (what is back-propagated; equal to ``loss`` with one device and no accumulation)."""
        out = self.run_parts(batch, with_reference=self.uses_reference)
        forget, retain = self.forget_loss(out), self.retain_term(out)
        h = self.hparams
        losses = {"loss": h.gamma * forget + h.retain_weight * retain, "forget_loss": forget, "retain_loss": retain}
        terms = [(h.gamma * forget, out["forget"], self.forget_mean)]
        if self.retain_loss != "none":
            terms.append((h.retain_weight * retain, out["retain"], "tokens"))
        return with_step_loss(losses, terms)

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        """Back-propagate ``step_loss`` (the step-normalised objective) and log the micro-batch means."""
        losses = self.compute_losses(batch)
        objective = losses.pop("step_loss", losses["loss"])
        self.last_losses = {k: v.detach() for k, v in losses.items()}
        size = batch["forget"]["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in self.last_losses.items()}, prog_bar=True, batch_size=size)
        return objective

    # --- optimisation, checkpoints, export ----------------------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        """Checkpoint the RNG state too, so that resuming gives the run it interrupted (Lightning does not), and stop
        a diverging run before it applies or saves non-finite values; the evaluator as :class:`.CombinedModule`."""
        return [RestoreRNG(), DivergenceGuard(), *super().configure_callbacks()]

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimise only what requires a gradient: the frozen models never reach the optimizer."""
        from transformers import get_scheduler  # imports peft (through transformers' Trainer utilities): fit only

        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        h = self.hparams
        scheduler = get_scheduler(h.lr_scheduler if h.lr_scheduler != "constant" else "constant_with_warmup",
                                  optimizer, num_warmup_steps=h.warmup_steps,
                                  num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpointed_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: the whole trainable model, or with LoRA its adapter only (the
        base weights are frozen and reloaded from ``small_model``); :mod:`.checkpoints`."""
        return trainable_keys(self, "model.", adapter_only=self.uses_lora)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the frozen models out of checkpoints: they are reloaded from their ids, unchanged; refuse to
        write non-finite weights (raises ``DivergenceError``), so the last checkpoint stays a good one."""
        require_finite_weights(self, "to write a checkpoint")
        prune_checkpoint(checkpoint["state_dict"], FROZEN_PREFIXES, self.checkpointed_keys() if self.uses_lora else None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that lacks trainable weights (``KeyError``), since loading is not strict."""
        if self.model is not None:
            check_trainable_keys(checkpoint["state_dict"], self.checkpointed_keys())

    def on_fit_end(self) -> None:
        if not self.hparams.export_dir:
            return
        full = gather_for_export(self)  # under fsdp2 every rank gathers the sharded weights; None unsharded
        if self.trainer.is_global_zero:
            self.export(self.hparams.export_dir, full)

    def export(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Save the trainable model (with LoRA the adapter only) and the offset manifest to ``directory``, replacing
        it atomically (:func:`~.export_target.write_export`).

        ``state_dict``: the model's full weights when the model itself is sharded (``fsdp2``: see
        :func:`~lightning_unlearn.distributed.strategy.gather_for_export`), saved in place of its own.

        Raises:
            DivergenceError: if a trainable weight is non-finite (nothing is written).
        """
        if state_dict is None:
            require_finite_weights(self, f"to export to {directory}")
        elif bad := non_finite(state_dict):
            raise DivergenceError(f"Non-finite weights {bad[:3]}: refusing to export to {directory}.")
        manifest = self.offset_manifest() if self.offset_mode else None
        return write_export(self.model, self.tokenizer, manifest, directory, state_dict)

    def offset_manifest(self) -> dict[str, Any]:
        """What ``offset.json`` records: the large model, the reference, alpha, the method, the dtypes the models were
        trained and evaluated in (so that a reload computes the same logits), and ``"adapter": "lora"`` when the
        export is an adapter on the reference; see :mod:`lightning_unlearn.deploy.manifest`."""
        h = self.hparams
        manifest = {"large_model": h.large_model, "reference_model": h.small_model, "alpha": self.alpha,
                    "method": type(self).__name__, "large_dtype": h.large_dtype, "small_dtype": h.small_dtype}
        if self.uses_lora:  # the export is an adapter on the reference, not a model
            manifest["adapter"] = "lora"
        return manifest
