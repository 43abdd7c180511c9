"""The LightningModule that holds a combined model: builds it, scores and generates with it, evaluates it.

:class:`CombinedModule` is what ``validate`` and ``test`` need of a run -- the models of the options, one
:class:`~lightning_unlearn.offset.combined.CombinedModel` over them, greedy generation, and an
:class:`~.evaluator.Evaluator` fed by the validation and test steps -- with nothing of training. The unlearning
base :class:`~.base.UnlearnModule` derives from it and adds the losses, the objective, the optimizer, checkpoints
and the export. Everything used here is defined here.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.formatting import stop_token_ids
from ..distributed.strategy import plan_sharding, shard_unlearn_models
from ..models import memory
from ..models.build import checked_tokenizer, frozen_logit_cache, training_combined
from ..models.files import check_model_path
from ..numbers import finite
from ..offset.combined import CombinedModel
from ..offset.generation import StopFn
from ..offset.logit_cache import FrozenLogitCache
from ..offset.sources import ServedLargeModel, check_served_context, is_served
from .evaluator import Evaluator
from .parts import RetainLoss

__all__ = ["CombinedModule"]


class CombinedModule(L.LightningModule):
    """A LightningModule around one combined model ``z_L + alpha (z_S - z_S0)`` (or ``z_S``), built from options.

    The models are registered on the module as ``model`` (trainable), ``large`` and ``reference`` (the combined
    model itself is not), so checkpoints keep the keys ``model.*`` of every earlier version; a large model on its
    own ``large_device`` stays unregistered, so that moving the module leaves it there. The options are those of
    :class:`~.base.UnlearnModule`, which documents them for the command line.

    Raises:
        ValueError: no ``small_model``; a non-finite ``alpha``; an offset export given as a model; ``logit_cache:
            disk`` without ``logit_cache_dir``; ``large_device`` with a served large model.
    """

    needs_reference: ClassVar[bool] = False
    extra_parts: ClassVar[tuple[str, ...]] = ()
    retain_loss: RetainLoss = "none"

    def __init__(self, small_model: str | None, large_model: str | None, tokenizer: str | None, alpha: float,
                 retain_reference: str | None, max_new_tokens: int, logit_cache: str | None,
                 logit_cache_dir: str | None, large_device: str | None) -> None:  # pragma: no mutate block
        super().__init__()
        if not small_model:  # a default only so that ``--print_config`` needs no model paths
            raise ValueError("no small model: set --model.small_model to a Hugging Face id or a model folder (the "
                             "model to unlearn in direct mode, the offset's small model with --model.large_model).")
        self.save_hyperparameters(ignore=["optimizer"])
        self.combined: CombinedModel | None = None
        self.alpha = alpha
        for name, path in (("small_model", small_model), ("large_model", large_model)):
            # Before any data or evaluation is built: what is there must be a plain model (not an offset export, a
            # checkpoint file...); a folder not made yet (by an earlier stage of the demo, say) is named at loading.
            if path is not None and os.path.exists(path):
                check_model_path(path, f"--model.{name}")
        if logit_cache == "disk" and not logit_cache_dir:
            raise ValueError("logit_cache: disk needs a folder: set model.logit_cache_dir.")
        if is_served(large_model) and large_device is not None:
            raise ValueError(f"large_device={large_device!r} places a local large model; {large_model} is served "
                             "elsewhere: set --model.large_device null.")
        self.large: PreTrainedModel | ServedLargeModel | None = None
        self.reference: PreTrainedModel | None = None
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.evaluator = Evaluator(retain_reference, max_new_tokens)

    @property
    def alpha(self) -> float:
        """The offset strength ``alpha`` of ``z_L + alpha (z_S - z_S0)`` (a loss weight for EUL, direct mode).

        Setting it refuses a non-finite value (``ValueError`` naming ``--model.alpha``): a NaN strength would make
        every logit NaN and let ``test`` finish with NaN metrics."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = finite(value, "alpha", "--model.alpha")
        if self.combined is not None and not self.combined.is_direct:
            self.combined.alphas = [self._alpha]

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
        """Load and check the tokenizers (cheap), connect a served large model, hand the tokenizer and parts to the
        data module, build and check the evaluation, and print the memory plan."""
        h = self.hparams
        if self.tokenizer is None:
            for name in ("small_model", "large_model"):  # a local folder not there: named, not looked up on the hub
                if h.get(name) is not None:
                    check_model_path(h[name], f"--model.{name}")
            self.tokenizer, served = checked_tokenizer(h)
            self.large = served if served is not None else self.large
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "hparams", {}) if datamodule is not None else {}
        if isinstance(self.large, ServedLargeModel) and data.get("max_length"):  # before any training or evaluation
            check_served_context(self.large, int(data["max_length"]), "data.max_length")
        if datamodule is not None and hasattr(datamodule, "connect"):
            datamodule.connect(self.tokenizer, self.parts, **self.data_options)
            budget = datamodule.eval_token_budget() if hasattr(datamodule, "eval_token_budget") else None
            self.build_evaluation([spec.name for spec in datamodule.eval_specs()], data.get("evaluation", "tofu"),
                                  budget)
        if self.model is None and self._trainer is not None:  # the plan before any weight is loaded; every rank checks
            training = stage == "fit"
            batch = data.get("batch_size", 8) if training else data.get("eval_batch_size") or data.get("batch_size", 8)
            sequences = len(getattr(datamodule, "forget", [])) * len(self.parts) * max(self.trainer.max_epochs or 1, 1)
            memory.report({"hparams": h, "stage": stage, "batch_size": batch, "max_length": data.get("max_length", 512),
                           "parts": len(self.parts), "device": str(self.trainer.strategy.root_device),
                           "cache_sequences": sequences, "uses_reference": self.uses_reference,
                           "sharding": plan_sharding(self.trainer)},  # under fsdp2: each device's share
                          verbose=self.global_rank == 0)

    def build_evaluation(self, set_names: list[str], benchmark: str = "tofu", token_budget: int | None = None) -> None:
        """Build the evaluation of ``set_names`` (:meth:`.Evaluator.build`) and check the run against it."""
        self.evaluator.build(set_names, benchmark, token_budget)
        if self._trainer is not None:
            h = self.hparams
            self.evaluator.check_setup(self.trainer, {k: h.get(k) for k in ("small_model", "large_model", "tokenizer")},
                                       h.get("export_dir"))

    def build_combined(self, cls: type[CombinedModel] = CombinedModel, **extra: Any) -> CombinedModel:
        """The combined model this method trains (:func:`~lightning_unlearn.models.build.training_combined`, of class
        ``cls`` with ``extra`` arguments); a method that combines logits otherwise returns its own."""
        if self.tokenizer is None:  # configure_model() alone, outside a trainer: setup() loads and connects
            self.setup("configure")
        served = self.large if isinstance(self.large, ServedLargeModel) else None
        return training_combined(self.hparams, self.vocab_size, self.alpha, self.uses_reference, served, cls, **extra)

    def configure_model(self) -> None:
        """Build the combined model once, on the right device, after the strategy is set up, and register its parts
        (a large model on its own ``large_device`` stays unregistered, so that moving the module leaves it there)."""
        if self.model is not None:
            return
        combined = self.build_combined()
        object.__setattr__(self, "combined", combined)
        self.model = combined.trainable
        if combined.large_device is None:
            self.large = combined.large
        else:
            object.__setattr__(self, "large", combined.large)
        self.reference = combined.reference if combined.reference in combined.frozen_models() else None
        h = self.hparams
        rank = self.global_rank if self._trainer is not None else 0
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "hparams", {}) if datamodule is not None else {}
        combined.attach_cache(lambda: frozen_logit_cache(combined, h, self.tokenizer, rank, data))
        shard_unlearn_models(self)  # under --trainer.strategy fsdp2: the three models sharded in place

    def frozen_models(self) -> list[torch.nn.Module]:
        return self.combined.frozen_models() if self.combined is not None else []

    def train(self, mode: bool = True) -> CombinedModule:
        """Switch modes but keep the frozen models in eval mode (no dropout in ``z_L`` or ``z_S0``)."""
        super().train(mode)
        if self.combined is not None:
            self.combined.train(mode)
        for model in self.frozen_models():
            model.eval()
        return self

    @property
    def vocab_size(self) -> int:
        """Size of the shared tokenizer vocabulary; logits are sliced to it (embeddings may be padded)."""
        assert self.tokenizer is not None, "setup() loads the tokenizer before any forward pass"
        return len(self.tokenizer)

    @property
    def logit_cache(self) -> FrozenLogitCache | None:
        """The combined model's frozen-logit cache (built on first use: :func:`~lightning_unlearn.models.build.
        frozen_logit_cache`), or ``None``."""
        return self.combined.cache if self.combined is not None else None

    def teardown(self, stage: str) -> None:
        """Close the disk cache's files (their contents stay for the next run with the same models) and free a
        memory cache (host memory it may hold in gigabytes)."""
        if self.combined is not None:
            self.combined.close_cache()

    # --- logits, generation, evaluation -------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Offset logits ``z_L + alpha * (z_S - z_S0)`` (or ``z_S`` in direct mode), float32, shared vocab."""
        return self.combined(input_ids, attention_mask)

    def stop_ids(self) -> list[int]:
        """Where generated answers end: EOS, the models' ``generation_config`` stops and the template's end of turn."""
        if getattr(self, "_stop_ids", None) is None:
            self._stop_ids = stop_token_ids(self.tokenizer, [m for m in (self.large, self.model) if m is not None])
        return self._stop_ids

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, stop: StopFn | None = None,
                 nonfinite: Tensor | None = None) -> Tensor:
        """Greedy new tokens of a left-padded batch, stopping at :meth:`stop_ids` (:meth:`.CombinedModel.generate`)."""
        return self.combined.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, stop=stop,
                                      eos_token_id=self.stop_ids(), pad_token_id=self.tokenizer.pad_token_id,
                                      nonfinite=nonfinite)

    def generate_texts(self, input_ids: Tensor, attention_mask: Tensor,
                       max_new_tokens: int | None = None) -> list[str | None]:
        """Greedy texts of a left-padded batch, at most ``max_new_tokens`` (default ``model.max_new_tokens``) each;
        ``None`` where the generation read non-finite logits (:meth:`.CombinedModel.generate_texts`)."""
        return self.combined.generate_texts(input_ids, attention_mask, self.tokenizer, self.stop_ids(),
                                            max_new_tokens or self.hparams.max_new_tokens)

    @property
    def continuation_fn(self) -> Any:
        """The combined model's shared-prefix scoring (:attr:`.CombinedModel.continuation_fn`), so that the module
        itself can be handed to the evaluation as its logits function."""
        return self.combined.continuation_fn

    @property
    def evaluation(self) -> Any:
        """The evaluator's metric object (:attr:`.Evaluator.evaluation`), ``None`` before setup."""
        return self.evaluator.evaluation

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every validation's summary so far (:attr:`.Evaluator.history`)."""
        return self.evaluator.history

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.update(batch, self.combined, self.generate_texts)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.update(batch, self.combined, self.generate_texts)

    def configure_callbacks(self) -> list[L.Callback]:
        """The evaluator ends each validation and test epoch (logs, history, result files)."""
        return [self.evaluator]
