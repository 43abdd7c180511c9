"""The LightningModule every unlearning method derives from: three models, offset logits, one loss hook."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..losses.functional import IGNORE_INDEX, kl_on_labelled, nll_mean, step_scale
from ..models import memory
from ..evaluation.passes import ContinuationFn
from ..offset.generation import LogitsComponent, as_component, offset_components
from ..offset.prefix import continuation_logits, supports_continuation
from ..models.loading import DType, check_same_tokenizer, freeze, load_causal_lm, resolve_dtype
from ..data.tokenizer import load_tokenizer
from ..offset.logit_cache import CacheMode, FrozenLogitCache, model_fingerprint, tokenizer_fingerprint
from ..models.lora import DEFAULT_TARGETS, AdapterComponent, add_lora, reference_mode
from ..models.files import check_model_path, portable_models
from ..numbers import finite
from ..offset.logits import cached_offset_logits, offset_logits
from ..offset.sources import (ServedLargeModel, check_served_context, check_served_tokenizer, is_served,
                              large_source)
from .divergence import DivergenceGuard, require_finite_weights
from .eval_hooks import EvaluationHooks
from .parts import MeanOver, PartOutput, RetainLoss, with_step_loss
from .rng import RestoreRNG

Mode = Literal["offset", "direct"]
"""How a method trains: an offset on a large model (``z_L + alpha (z_S - z_S0)``), or the model itself."""
FROZEN_PREFIXES = ("large.", "reference.")


class UnlearnModule(EvaluationHooks):
    """Offset unlearning (and its white-box baseline) with the loss left to subclasses.

    Holds a frozen large model ``L``, a frozen small reference ``S0`` and a trainable copy ``S`` of
    ``S0``; :meth:`forward` returns ``z_L + alpha * (z_S - z_S0)``, so at initialisation the combined
    model *is* ``L`` and training moves only the small offset. With ``large_model: null`` the same
    losses unlearn ``S`` directly (the usual white-box baseline) and ``S0`` serves as the reference.

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

    needs_reference: ClassVar[bool] = False
    extra_parts: ClassVar[tuple[str, ...]] = ()
    # What the method registry (:mod:`.registry`) reads: the other names ``--model`` takes for the class (besides its
    # own, matched without regard to case), the modes it runs in, and whether it unlearns (SFT fine-tunes).
    aliases: ClassVar[tuple[str, ...]] = ()
    modes: ClassVar[tuple[Mode, ...]] = ("offset", "direct")
    unlearns: ClassVar[bool] = True
    retain_loss: RetainLoss = "none"
    forget_mean: ClassVar[MeanOver] = "tokens"  # what the forget loss averages over (NPO & co: sequences)

    def __init__(
        self,
        small_model: str | None = None,
        large_model: str | None = None,
        tokenizer: str | None = None,
        alpha: float = 1.0,
        gamma: float = 1.0,
        retain_weight: float = 1.0,
        large_dtype: DType = "bfloat16",
        small_dtype: DType = "float32",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        retain_reference: str | None = None,
        max_new_tokens: int = 200,
        export_dir: str | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: str | list[str] = DEFAULT_TARGETS,
        logit_cache: CacheMode | None = None,
        logit_cache_dir: str | None = None,
        logit_cache_dtype: DType = "float16",
        large_device: str | None = None,
        large_logprobs: int | None = None,
    ) -> None:  # pragma: no mutate block
        super().__init__()
        if not small_model:  # a default only so that ``--print_config`` needs no model paths
            raise ValueError("no small model: set --model.small_model to a Hugging Face id or a model folder (the "
                             "model to unlearn in direct mode, the offset's small model with --model.large_model).")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.alpha = alpha
        for name, value in (("gamma", gamma), ("retain_weight", retain_weight)):
            finite(value, name, f"--model.{name}")
        for name, path in (("small_model", small_model), ("large_model", large_model)):
            if path is not None:  # before any data or evaluation is built: a plain model is expected there
                check_model_path(path, f"--model.{name}")
        self.large: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.evaluation = None
        self.history: list[dict[str, Any]] = []
        self.last_losses: dict[str, Tensor] = {}  # the last training micro-batch's means, as logged
        self.strict_loading = False
        if logit_cache == "disk" and not logit_cache_dir:
            raise ValueError("logit_cache: disk needs a folder: set model.logit_cache_dir.")
        if is_served(large_model) and large_device is not None:
            raise ValueError(f"large_device={large_device!r} places a local large model; {large_model} is served "
                             "elsewhere: set --model.large_device null.")
        self._logit_cache: FrozenLogitCache | None = None

    @property
    def alpha(self) -> float:
        """The offset strength ``alpha`` of ``z_L + alpha (z_S - z_S0)`` (a loss weight for EUL, direct mode).

        Setting it refuses a non-finite value (``ValueError`` naming ``--model.alpha``): a NaN strength would make
        every logit NaN and let ``test`` finish with NaN metrics."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = finite(value, "alpha", "--model.alpha")

    @property
    def offset_mode(self) -> bool:
        return self.hparams.large_model is not None

    @property
    def uses_lora(self) -> bool:
        """Whether the trainable model is a LoRA adapter on the reference weights (one small model)."""
        return self.hparams.get("lora_rank") is not None

    @property
    def uses_reference(self) -> bool:
        """Whether the loss reads reference logits (the frozen copy is loaded in direct mode only then)."""
        return self.needs_reference or self.retain_loss == "kl"

    @property
    def parts(self) -> tuple[str, ...]:
        """Data parts each training item must carry for this loss."""
        return ("forget",) + (("retain",) if self.retain_loss != "none" else ()) + self.extra_parts

    @property
    def data_options(self) -> dict[str, Any]:
        """Keyword options for the data module's ``connect`` beyond tokenizer and parts: settings of the
        data that are the loss's hyper-parameters (LLMU's random answers per question), none by default."""
        return {}

    # --- building -----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Load and check the tokenizers (cheap), then hand the tokenizer and parts to the data module."""
        if self.tokenizer is None:
            h = self.hparams
            self.tokenizer = load_tokenizer(h.tokenizer or h.small_model, h.trust_remote_code)
            if is_served(h.large_model):
                self._connect_served_large()
            elif h.large_model is not None:
                large_tok = load_tokenizer(h.large_model, h.trust_remote_code)
                check_same_tokenizer(large_tok, self.tokenizer, h.large_model, h.tokenizer or h.small_model)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        max_length = getattr(datamodule, "hparams", {}).get("max_length") if datamodule is not None else None
        if isinstance(self.large, ServedLargeModel) and max_length:  # before any training or evaluation
            check_served_context(self.large, int(max_length), "data.max_length")
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.tokenizer, self.parts, **self.data_options)
            benchmark = getattr(datamodule, "hparams", {}).get("evaluation", "tofu")
            budget = datamodule.eval_token_budget() if hasattr(datamodule, "eval_token_budget") else None
            self.build_evaluation([spec.name for spec in datamodule.eval_specs()], benchmark, budget)
        if self.model is None and self._trainer is not None:
            self.plan_memory(stage, datamodule)

    def plan_memory(self, stage: str, datamodule: Any) -> None:
        """Print the memory plan before any weight is loaded, and refuse one that cannot fit
        (:mod:`lightning_unlearn.models.memory`); rank 0 prints, every rank checks its own device."""
        d = getattr(datamodule, "hparams", {})
        training = stage == "fit"
        batch = d.get("batch_size", 8) if training else d.get("eval_batch_size") or d.get("batch_size", 8)
        sequences = len(getattr(datamodule, "forget", [])) * len(self.parts) * (self.trainer.max_epochs or 1)
        memory.report({"hparams": self.hparams, "stage": stage, "batch_size": batch,
                       "max_length": d.get("max_length", 512), "parts": len(self.parts),
                       "device": str(self.trainer.strategy.root_device), "cache_sequences": sequences,
                       "uses_reference": self.uses_reference},
                      verbose=self.global_rank == 0)

    def _connect_served_large(self) -> None:
        """The served large model as the logit source ``self.large``, once its tokenizer is checked against ours."""
        h = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(h.tokenizer or h.small_model, h.trust_remote_code)
        served = ServedLargeModel(h.large_model, len(self.tokenizer), h.get("large_logprobs"))
        check_served_tokenizer(served.client, self.tokenizer, h.tokenizer or h.small_model)
        self.large = served

    def configure_model(self) -> None:
        """Build the models once, on the right device, after the strategy is set up."""
        if self.model is not None:
            return
        h = self.hparams
        small = load_causal_lm(h.small_model, h.small_dtype, h.trust_remote_code, "--model.small_model")
        if self.uses_lora:  # the reference is ``small`` itself with the adapter disabled: no copy
            small = add_lora(small, h.lora_rank, h.lora_alpha, h.lora_dropout, h.lora_target_modules, h.small_model)
        elif self.offset_mode or self.uses_reference:
            self.reference = freeze(copy.deepcopy(small))
        if is_served(h.large_model):
            if self.large is None:  # setup() connects it; configure_model() alone (outside a trainer) does here
                self._connect_served_large()
        elif self.offset_mode:
            self._load_local_large()
        small.train()
        if h.gradient_checkpointing:
            # Non-reentrant: with reentrant checkpointing no gradient reaches adapters behind frozen layers.
            kwargs = {"use_reentrant": False} if self.uses_lora else None
            small.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model = small

    def _load_local_large(self) -> None:
        """Load the large model from ``large_model`` frozen as ``self.large``, on ``large_device`` if set."""
        h = self.hparams
        large = freeze(load_causal_lm(h.large_model, h.large_dtype, h.trust_remote_code, "--model.large_model"))
        if h.get("large_device") is None:
            self.large = large
        else:  # unregistered, so that Lightning moving the module to its device leaves it where it is put
            object.__setattr__(self, "large", large.to(h.large_device))

    def frozen_models(self) -> list[torch.nn.Module]:
        return [m for m in (self.large, self.reference) if m is not None]

    def train(self, mode: bool = True) -> UnlearnModule:
        """Switch modes but keep the frozen models in eval mode (no dropout in ``z_L`` or ``z_S0``)."""
        super().train(mode)
        for model in self.frozen_models():
            model.eval()
        return self

    # --- logits -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the shared tokenizer vocabulary; logits are sliced to it (embeddings may be padded)."""
        assert self.tokenizer is not None, "setup() loads the tokenizer before any forward pass"
        return len(self.tokenizer)

    def _logits(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if logits.shape[-1] != self.vocab_size:  # no view when nothing is cut off: the offset reuses the memory
            logits = logits[..., : self.vocab_size]
        return logits.float()

    @torch.no_grad()
    def _frozen_logits(self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self._logits(model, input_ids, attention_mask)

    @torch.no_grad()
    def _large_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``z_L`` in the large model's dtype (the offset promotes it), computed on ``large_device`` if set and
        returned on the inputs' device."""
        if isinstance(self.large, ServedLargeModel):  # log-probabilities, which serve as logits (softmax shift)
            return self.large(input_ids, attention_mask)
        device = self.hparams.get("large_device") or input_ids.device
        logits = self.large(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        logits = logits.logits
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        return logits.to(input_ids.device)

    @torch.no_grad()
    def _reference_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``z_S0``: the frozen copy, or with LoRA the trainable model with its adapter disabled (eval mode)."""
        if not self.uses_lora:
            return self._frozen_logits(self.reference, input_ids, attention_mask)
        with reference_mode(self.model):
            return self._logits(self.model, input_ids, attention_mask)

    def _compute_frozen(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """``[z_L, z_S0]`` in offset mode, ``[z_S0]`` in direct mode, computed by the models."""
        ref = self._reference_logits(input_ids, attention_mask)
        return [self._large_logits(input_ids, attention_mask), ref] if self.large is not None else [ref]

    def _frozen_parts(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """The frozen logits of a batch: ``[z_L, z_S0]`` in offset mode, ``[z_S0]`` in direct mode; read from
        the logit cache while training when it is on (validation and test always compute them); ``z_L`` in
        the large model's dtype, converted once by :meth:`logits_and_reference`."""
        cache = self.logit_cache if self.training else None
        if cache is None:
            return self._compute_frozen(input_ids, attention_mask)
        return cache.get(input_ids, attention_mask, self._compute_frozen)

    def logits_and_reference(
        self, input_ids: Tensor, attention_mask: Tensor, with_reference: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Logits of the model being unlearned and, if asked, of the reference; each model runs once."""
        assert self.model is not None, "configure_model() builds the models"
        z_small = self._logits(self.model, input_ids, attention_mask)
        if self.large is None:
            ref = self._frozen_parts(input_ids, attention_mask)[0].float() if with_reference else None
            return z_small, ref
        cache = self.logit_cache if self.training else None
        if cache is not None and not with_reference:  # z_L is not needed whole: build z from the stored rows
            rows = cache.rows(input_ids, attention_mask, self._compute_frozen)
            return cached_offset_logits(z_small, rows, attention_mask, self.alpha), None
        z_large, z_ref = (z.float() for z in self._frozen_parts(input_ids, attention_mask))
        return offset_logits(z_small, z_large, z_ref, self.alpha), z_large if with_reference else None

    @property
    def logit_cache(self) -> FrozenLogitCache | None:
        """The cache of frozen logits (built on first use, when the models and the data module are known)."""
        h = self.hparams
        if h.get("logit_cache") is None or (self.large is None and not self.uses_reference):
            return None
        if self._logit_cache is None:
            directory = None
            if h.logit_cache == "disk":
                rank = self.global_rank if self._trainer is not None else 0
                directory = os.path.join(h.logit_cache_dir, f"rank{rank}")
            disk = h.logit_cache == "disk"  # a memory cache lives for this run only: nothing to check it against
            probes = {"large": self.large.probe()} if disk and isinstance(self.large, ServedLargeModel) else None
            self._logit_cache = FrozenLogitCache(
                ["large", "reference"] if self.large is not None else ["reference"], self.vocab_size,
                h.logit_cache, directory, resolve_dtype(h.logit_cache_dtype),
                self.cache_fingerprint() if disk else None, probes)
        return self._logit_cache

    def cache_fingerprint(self) -> dict[str, Any]:
        """Everything the cached frozen logits depend on (alpha is not: ``z_L`` and ``z_S0`` are stored); local
        models' files by content (their digests memoised in ``logit_cache_dir``), a served model by its name,
        context length and top-k (its probe log-probabilities are compared apart, within a tolerance)."""
        h = self.hparams
        memo = os.path.join(h.logit_cache_dir, "file_digests.json") if h.get("logit_cache_dir") else None
        fingerprint: dict[str, Any] = {
            "reference": model_fingerprint(h.small_model, self.model, h.small_dtype, memo),
            "large": (self.large.fingerprint() if isinstance(self.large, ServedLargeModel)
                      else model_fingerprint(h.large_model, self.large, h.large_dtype, memo)
                      if self.large is not None else None),
            "vocab": tokenizer_fingerprint(self.tokenizer),
        }
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "hparams", {})
        fingerprint["data"] = {k: data.get(k) for k in ("max_length", "template", "use_chat_template")}
        return fingerprint

    def teardown(self, stage: str) -> None:
        """Close the disk cache's files (their contents stay for the next run with the same models) and free a
        memory cache (host memory it may hold in gigabytes)."""
        if self._logit_cache is not None:
            self._logit_cache.close()
            self._logit_cache = None

    # --- generation components ------------------------------------------------------------------------------

    def large_component(self) -> LogitsComponent:
        """The large model as a logit source for offset generation: served, local, or local on ``large_device``."""
        return large_source(self.hparams.large_model, self.large, self.vocab_size, self.hparams.get("large_device"))

    def reference_component(self) -> torch.nn.Module | LogitsComponent:
        """The reference for offset generation: the frozen copy, or the LoRA model with its adapter off."""
        return AdapterComponent(self.model, None) if self.uses_lora else self.reference

    def logit_components(self) -> list[tuple[torch.nn.Module | LogitsComponent, float]]:
        """The models whose weighted logits the module's forward sums, as components with their own KV caches:
        the small model alone in direct mode, ``z_L + alpha (z_S - z_S0)`` in offset mode."""
        if self.large is None:
            return [(self.model, 1.0)]
        return offset_components(self.large_component(), self.reference_component(), [(self.model, self.alpha)])

    @property
    def continuation_fn(self) -> ContinuationFn | None:
        """Teacher-forced scoring that runs a prefix shared by several rows once (:mod:`~lightning_unlearn.offset.
        prefix`), as the evaluation uses it; ``None`` where it would not equal :meth:`forward`: while training,
        in a subclass that computes its logits otherwise (EUL, ULD), or with a component that cannot continue a
        cache over several tokens (a served large model, whose server caches prefixes itself)."""
        cls = type(self)
        if (self.training or cls.logits_and_reference is not UnlearnModule.logits_and_reference
                or cls.forward is not UnlearnModule.forward):
            return None
        components = self.logit_components()
        if not all(supports_continuation(as_component(model)) for model, _ in components):
            return None
        return functools.partial(continuation_logits, components, vocab_size=self.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Offset logits ``z_L + alpha * (z_S - z_S0)`` (or ``z_S`` in direct mode), float32, shared vocab."""
        return self.logits_and_reference(input_ids, attention_mask)[0]

    def run_parts(self, batch: dict[str, dict[str, Tensor]], with_reference: bool) -> dict[str, PartOutput]:
        """Run every part of the batch through each model in one forward pass and split the results."""
        names = list(batch)
        sizes = [batch[n]["input_ids"].shape[0] for n in names]
        input_ids = torch.cat([batch[n]["input_ids"] for n in names])
        attention_mask = torch.cat([batch[n]["attention_mask"] for n in names])
        logits, ref = self.logits_and_reference(input_ids, attention_mask, with_reference)
        logit_parts = logits.split(sizes)
        ref_parts = ref.split(sizes) if ref is not None else [None] * len(names)
        return {
            n: PartOutput(lg, rf, batch[n]["labels"], *self.step_scales(batch[n]))
            for n, lg, rf in zip(names, logit_parts, ref_parts)
        }

    def step_scales(self, part: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """The factors of a part's token and sequence means that make them shares of the optimizer step's means.

        They need the step's counts, which the data module's training batches carry (``step_tokens``,
        ``step_sequences``), and the trainer's ``accumulate_grad_batches x world_size``; ``(None, None)``
        outside training or without counts (plain means over the micro-batch).

        Raises:
            RuntimeError: if the data was planned for another number of micro-batches per step than the
                trainer runs (e.g. ``accumulate_grad_batches`` changed by a scheduler during the epoch).
        """
        if not self.training or "step_tokens" not in part or self._trainer is None:
            return None, None
        micro_batches = self.trainer.accumulate_grad_batches * self.trainer.world_size
        planned = int(part["step_micro_batches"])
        if planned != micro_batches:
            raise RuntimeError(
                f"The training batches were planned for {planned} micro-batches per optimizer step, but the trainer "
                f"runs {micro_batches} (accumulate_grad_batches x devices): token means over the step would be "
                "wrong. Keep accumulate_grad_batches fixed during an epoch."
            )
        labels = part["labels"]
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        sequences = torch.tensor(labels.shape[0], device=labels.device)
        return (step_scale(tokens, part["step_tokens"], micro_batches),
                step_scale(sequences, part["step_sequences"], micro_batches))

    # --- losses -------------------------------------------------------------------------------------------

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

    # --- optimisation and checkpoints ---------------------------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        """Checkpoint the RNG state too, so that resuming gives the run it interrupted (Lightning does not), and
        stop a diverging run before it applies or saves non-finite values."""
        return [RestoreRNG(), DivergenceGuard()]

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimise only what requires a gradient: the frozen models never reach the optimizer."""
        from transformers import get_scheduler  # imports peft (through transformers' Trainer utilities): fit only

        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        scheduler = get_scheduler(
            self.hparams.lr_scheduler if self.hparams.lr_scheduler != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=self.hparams.warmup_steps,
            num_training_steps=int(self.trainer.estimated_stepping_batches),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpointed_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: the whole trainable model, or with LoRA its adapter only
        (the base weights are frozen and reloaded from ``small_model``)."""
        if self.uses_lora:
            return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return {k for k in self.state_dict() if k.startswith("model.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the frozen models out of checkpoints: they are reloaded from their ids, unchanged; refuse to
        write non-finite weights (raises ``DivergenceError``), so the last checkpoint stays a good one."""
        require_finite_weights(self, "to write a checkpoint")
        state = checkpoint["state_dict"]
        keep = self.checkpointed_keys() if self.uses_lora else None
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES) or (keep is not None and k not in keep)]:
            del state[key]

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def export(self, directory: str | Path) -> Path:
        """Save the trainable model (and the offset manifest) to ``directory``, replacing it atomically.

        Raises:
            DivergenceError: if a trainable weight is non-finite (nothing is written).
        """
        require_finite_weights(self, f"to export to {directory}")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        self.model.save_pretrained(staging)  # with LoRA, peft saves the adapter and names its base model
        self.tokenizer.save_pretrained(staging)
        if self.offset_mode:
            manifest = portable_models(self.offset_manifest(), target)  # paths that survive moving the runs folder
            (staging / "offset.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return target

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that lacks trainable weights, since loading is not strict."""
        if self.model is None:
            return
        missing = sorted(k for k in self.checkpointed_keys() if k not in checkpoint["state_dict"])
        if missing:
            raise KeyError(f"The checkpoint lacks {len(missing)} trainable weights, e.g. {missing[:3]}: is it from "
                           "another model?")
