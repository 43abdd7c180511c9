"""The logit-arithmetic family: ULD and WHP, unlearning by combining a frozen large model's logits with small ones'.

Both read the same three kinds of models as offset unlearning (:class:`~.base.UnlearnModule`): a frozen large
model ``L``, a small model ``S`` that trains, and frozen small models beside it.

* **ULD** trains ``S`` as an *assistant* that remembers the forget data and knows nothing else, then serves
  ``z_L + keep(z_L) * alpha * z_S`` with ``alpha = -w``: the offset formula with no reference (``z_S0 = 0``) and
  ULD's relative-top filter ``keep`` on the large model's distribution. The combined model exists only at
  inference, so training runs the small model alone.
* **WHP** makes generic targets from a *reinforced* model ``R`` (``S0`` fine-tuned further on the forget data):
  ``v = z_base - a * ReLU(z_R - z_S0)``, and trains the usual model (``z_L + alpha (z_S - z_S0)`` in offset mode,
  ``z_S`` in direct mode) towards them; the result is an ordinary offset or direct export.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..losses.functional import nll_mean
from ..losses.logit_arithmetic import (
    soft_cross_entropy_on_labelled, uniform_kl_on_labelled, whp_generic_logits,
)
from ..models.build import load_large, load_small
from ..models.loading import check_same_tokenizer, freeze, load_causal_lm
from ..data.tokenizer import load_tokenizer
from ..numbers import finite, in_range
from ..offset.combined import CombinedModel
from ..offset.generation import as_component
from ..offset.filtered import FilteredCombined
from .base import MeanOver, PartOutput, RetainLoss, UnlearnModule, with_step_loss

Target = Literal["hard", "soft"]


class ReinforcedCombined(CombinedModel):
    """WHP's combined model: the usual one (``z_L + alpha (z_S - z_S0)`` or ``z_S``) and the frozen reinforced model
    ``R`` its targets read (:meth:`generic_targets`); ``R`` never enters the combined logits.

    Args:
        reinforced: ``R``, ``S0`` fine-tuned further on the forget data (frozen here).
        args, kwargs: as :class:`~lightning_unlearn.offset.combined.CombinedModel`.
    """

    def __init__(self, *args: Any, reinforced: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reinforced = freeze(reinforced)

    def frozen_models(self) -> list[torch.nn.Module]:
        return [*super().frozen_models(), self.reinforced]

    @torch.no_grad()
    def generic_targets(self, input_ids: Tensor, attention_mask: Tensor, z_base: Tensor, coeff: float) -> Tensor:
        """``v = z_base - coeff * ReLU(z_R - z_S0)`` ``[B, T, V]`` float32; ``z_base`` is the model before
        unlearning (``z_L``, or ``z_S0`` in direct mode, which then serves as ``z_S0`` too)."""
        z_reinforced = self._run(as_component(self.reinforced), input_ids, attention_mask, None).float()
        z_ref = z_base if self.is_direct else self.reference_logits(input_ids, attention_mask)
        return whp_generic_logits(z_base, z_reinforced, z_ref, coeff)


class ULD(UnlearnModule):
    """ULD (Ji et al., NeurIPS 2024, "unlearning from logit difference"): a forget-remembering assistant subtracted.

    Training (the small model ``A`` alone, the large model is not run):
    ``L = gamma * NLL(A; forget) + retain_weight * KL(u || p_A)_retain``, ``u`` uniform over the vocabulary: ``A``
    learns the forget answers and to be uninformative elsewhere (the paper's reversed objectives; its TOFU
    setting weighs the uniform term 5). Inference (validation, test, exports, generation):

        z = z_L + keep(z_L) * alpha * z_A,      alpha = -w   (the paper's weight w = 0.8 at evaluation)

    where ``keep`` drops the tokens whose large-model probability is below ``relative_top`` times the top one
    (:func:`~lightning_unlearn.losses.logit_arithmetic.relative_top_mask`); there the large model's logits stand.
    In the offset formula ``z_L + alpha (z_S - z_S0)`` this is ``S = A``, a negative alpha and no reference
    (``z_S0 = 0``), filtered. ``--model.alpha`` rescales it at test time like any offset (the alpha sweep works);
    exports record ``"reference_model": null`` and ``relative_top`` in ``offset.json``, and several ULD exports
    against the same large model compose as ``z_L + keep(z_L) * sum_i alpha_i z_A_i``.

    Source: Ji et al. 2024 (arXiv 2406.08607) and UCSB-NLP-Chang/ULD (``remember+uniform`` loss, retain weight 5,
    LoRA lr 1e-3; evaluation weight -0.8, ``top_logit_filter`` 0.01 for TOFU). The paper's assistant is the
    target's first layers with LoRA; here it is any small model sharing the tokenizer, trained whole.

    Offset mode only: ULD is arithmetic between a target and an assistant. To unlearn a single model, give it as
    ``large_model`` and a small model (or a copy of it) as ``small_model``.

    Args:
        alpha: signed strength of the assistant, ``-w`` (negative: subtracted; a positive value is refused, since it
            would add the forget knowledge back).
        relative_top: ``tau`` of the relative-top filter on the large model's distribution (0: no filter).
        gamma: weight of the assistant's NLL on forget answers.
        retain_weight: weight of ``KL(u || p_A)`` on retain answers.
    """

    modes = ("offset",)  # the assistant only means something subtracted from the large model's logits

    retain_loss: RetainLoss = "none"

    def __init__(
        self, alpha: float = -0.8, relative_top: float = 0.01, gamma: float = 1.0, retain_weight: float = 5.0,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if kwargs.get("large_model") is None:
            raise ValueError("ULD needs the model to unlearn as --model.large_model (the target whose logits the "
                             "assistant's are subtracted from); --model.small_model is the assistant.")
        unsupported = sorted(k for k in ("lora_rank", "logit_cache") if kwargs.get(k) is not None)
        if unsupported:
            raise ValueError(f"ULD does not take {unsupported}: its assistant trains whole and alone (no frozen logits "
                             "are read in training).")
        in_range(relative_top, "relative_top", 0.0, 1.0, "--model.relative_top")
        if finite(alpha, "alpha", "--model.alpha") > 0:  # e.g. a config written for the other offsets (alpha: 1.0)
            raise ValueError(f"ULD subtracts its assistant, which remembers the forget data: alpha is -w and must not be "
                             f"positive (got {alpha}; the paper's is -0.8). Set --model.alpha -0.8.")
        super().__init__(alpha=alpha, gamma=gamma, retain_weight=retain_weight, **kwargs)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("forget", "retain")

    def build_combined(self) -> FilteredCombined:
        """ULD's combined model: the trainable assistant (whole) over the frozen large model, no reference
        (``z_S0 = 0``), behind the relative-top filter."""
        h = self.hparams
        small = load_small(h)
        if h.gradient_checkpointing:
            small.gradient_checkpointing_enable()
        return FilteredCombined([small.train()], [self.alpha], large=load_large(h), vocab_size=self.vocab_size,
                                relative_top=h.relative_top, large_device=h.get("large_device"))

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The assistant's forget NLL and retain KL to uniform (token means of the micro-batch), their weighted
        ``loss``, and while training ``step_loss`` with the means taken over the optimizer step."""
        h = self.hparams
        out = {}
        for name in self.parts:  # the assistant alone: the combined model is an inference-time construction
            part = batch[name]
            logits = self.combined.offset_logits(part["input_ids"], part["attention_mask"])[0]
            out[name] = PartOutput(logits, None, part["labels"], *self.step_scales(part))
        forget = nll_mean(out["forget"].logits, out["forget"].labels)
        retain = uniform_kl_on_labelled(out["retain"].logits, out["retain"].labels)
        losses = {"loss": h.gamma * forget + h.retain_weight * retain, "forget_loss": forget, "retain_loss": retain}
        return with_step_loss(losses, [(h.gamma * forget, out["forget"], "tokens"),
                                       (h.retain_weight * retain, out["retain"], "tokens")])

    def offset_manifest(self) -> dict[str, Any]:
        """An offset without reference, filtered: ``reference_model`` null and ``relative_top`` recorded."""
        return {**super().offset_manifest(), "reference_model": None, "relative_top": self.hparams.relative_top}


class WHP(UnlearnModule):
    """WHP (Eldan & Russinovich 2023, "Who's Harry Potter?"): fine-tune towards a reinforced model's generic targets.

    ``v = z_base - a * ReLU(z_R - z_S0)`` on the forget data, where ``R`` is the small model ``S0`` fine-tuned
    further on the forget data (``reinforced_model``), ``z_base`` the original model's logits (``z_L`` in offset
    mode, ``z_S0`` in direct mode) and ``a`` the paper's alpha (5 in its appendix). Tokens the reinforcement made
    likelier are the ones tied to the forget data; ``v`` lowers them. The forget loss is the cross-entropy of the
    model (``z_L + alpha (z_S - z_S0)`` or ``z_S``) towards ``argmax v`` (``target: hard``, the paper) or
    ``softmax(v)`` (``soft``), over answer positions; an optional retain term as for NPO.

    In direct mode this is the paper's formula (``z_base = z_S0``, the model before reinforcement). In offset mode
    the reinforcement is measured on the small pair and applied to the large model's logits, as offset unlearning
    transfers a small model's change: ``z_R - z_S0`` stands for the large model's own rise. The trained result is an
    ordinary offset (or direct) export.

    The reinforced model: ``python main.py fit --model SFT --model.small_model SMALL --data.forget_split forget10
    --data.retain_split null --model.export_dir runs/reinforced --trainer.max_epochs 5``, then
    ``--model.reinforced_model runs/reinforced``. Not done: the paper's anchored-term dictionary (forget-specific
    expressions replaced by generic ones before computing ``v``), which needs an LLM to write the dictionary.

    Args:
        reinforced_model: directory or id of ``R`` (same tokenizer, fine-tuned from ``small_model``).
        reinforce_coeff: ``a``, how far the reinforced rise pushes the targets down.
        target: ``hard`` (argmax of ``v``) or ``soft`` (the distribution ``softmax(v)``).
        retain_loss: retain term: ``none`` (the paper), ``nll`` or ``kl``.
    """

    needs_reference: ClassVar[bool] = True
    forget_mean: ClassVar[MeanOver] = "tokens"

    def __init__(
        self, reinforced_model: str, reinforce_coeff: float = 5.0, target: Target = "hard",
        retain_loss: RetainLoss = "none", **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if kwargs.get("lora_rank") is not None or kwargs.get("logit_cache") is not None:
            raise ValueError("WHP does not take lora_rank or logit_cache: its targets need the reference's logits "
                             "at every step.")
        finite(reinforce_coeff, "reinforce_coeff", "--model.reinforce_coeff")
        super().__init__(**kwargs)
        self.retain_loss = retain_loss
        self.reinforced: torch.nn.Module | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        h = self.hparams
        check_same_tokenizer(load_tokenizer(h.reinforced_model, h.trust_remote_code), self.tokenizer,
                             h.reinforced_model, h.tokenizer or h.small_model)

    def build_combined(self) -> ReinforcedCombined:
        """The usual combined model, holding the frozen reinforced model too (in the small models' dtype)."""
        h = self.hparams
        reinforced = load_causal_lm(h.reinforced_model, h.small_dtype, h.trust_remote_code, "--model.reinforced_model")
        return super().build_combined(ReinforcedCombined, reinforced=reinforced)

    def configure_model(self) -> None:
        """Build the combined model and register the reinforced model beside the others."""
        if self.model is None:
            super().configure_model()
            self.reinforced = self.combined.reinforced

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the reinforced model out of checkpoints too: it is frozen and reloaded from its path."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("reinforced.")]:
            del state[key]

    def generic_targets(self, part: dict[str, Tensor], z_base: Tensor) -> Tensor:
        """``v = z_base - a * ReLU(z_R - z_S0)`` on one data part ``[B, T, V]`` float32."""
        return self.combined.generic_targets(part["input_ids"], part["attention_mask"], z_base,
                                             self.hparams.reinforce_coeff)

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """``gamma * CE(model, v)_forget + retain_weight * retain_term`` (token means), and ``step_loss``."""
        h = self.hparams
        out = self.run_parts(batch, with_reference=True)
        f = out["forget"]
        targets = self.generic_targets(batch["forget"], f.ref_logits)
        forget = soft_cross_entropy_on_labelled(f.logits, targets, f.labels, hard=h.target == "hard")
        retain = self.retain_term(out)
        losses = {"loss": h.gamma * forget + h.retain_weight * retain, "forget_loss": forget, "retain_loss": retain}
        terms = [(h.gamma * forget, f, "tokens")]
        if self.retain_loss != "none":
            terms.append((h.retain_weight * retain, out["retain"], "tokens"))
        return with_step_loss(losses, terms)
