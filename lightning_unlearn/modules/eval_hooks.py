"""Validation and test for unlearning modules: the TOFU or MUSE evaluation, generation, and result files.

Kept apart from the training logic in ``base.py``; the module mixes it in. Validation runs the same
evaluation as ``test`` (on ``data.eval_subset`` samples if set) every ``trainer.check_val_every_n_epoch``
epochs, logs every metric under ``val/`` and appends the summary to ``TOFU_HISTORY.json`` (``MUSE_HISTORY.json``),
which is what a checkpoint callback monitoring ``val/forget_quality`` (``val/forget_verbmem_ROUGE``) and the
per-epoch plot read. The lm-eval tasks of ``data.lm_eval_tasks`` join the summary as ``task/metric``
(:mod:`lightning_unlearn.harness.hooks`).

Every summary written (``*_SUMMARY.json``, each ``*_HISTORY.json`` entry) says whether its numbers are finite:
``all_finite`` and ``non_finite`` (the metrics that are NaN or infinite, with their number of non-finite samples,
and the sets they came from; :func:`~lightning_unlearn.evaluation.report.non_finite`), and the console says so in
red after the table (test) or as a warning (validation): a model whose logits are NaN must not pass for one
that was measured.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from ..atomic import atomic_write_json
from ..evaluation.report import (
    non_finite,
    non_finite_message,
    print_table,
    print_warning,
    summary_table,
)
from ..evaluation.loss import LossEvaluation
from ..evaluation.muse import MuseEvaluation, MuseReference
from ..evaluation.passes import DEFAULT_TOKEN_BUDGET
from ..evaluation.selection import rule_floor
from ..evaluation.tofu import RetainReference, TofuEvaluation
from ..data.formatting import stop_token_ids
from ..data.tofu_eval import EvalCollection
from ..evaluation.monitors import MetricPlan, check_monitors, monitored_metrics
from ..harness.hooks import LmEvalSettings, lm_eval_metrics, task_metrics
from ..offset.generation import StopFn, decode_answers, greedy_generate
from .export_target import check_export_dir
from ..tracking import publish_summary

Batch = dict[str, Any]


def _validates(trainer: L.Trainer) -> bool:
    """Whether this fit runs a validation at all. Without one, no monitored metric is ever logged and Lightning
    itself warns at each epoch end that a monitor found nothing (only ``save_last`` checkpoints are written),
    which runs with ``limit_val_batches 0`` rely on."""
    if not trainer.limit_val_batches:
        return False
    every, epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    return every is None or epochs is None or epochs < 0 or every <= epochs


def _served_sets(trainer: L.Trainer) -> tuple[list[str] | None, str]:
    """The evaluation sets a validation reaches under ``trainer.limit_val_batches`` (None: all) and why.

    The TOFU and MUSE sets are one loader, served set after set when a limit is set (the data module serves the
    first samples then), so a limit of N batches reaches the first ``N x eval_batch_size x devices`` items (a
    distributed sampler deals them out in turn) and the later sets get none. ``loss`` has a loader per set.
    """
    limit = trainer.limit_val_batches
    datamodule = getattr(trainer, "datamodule", None)
    if (isinstance(limit, float) and limit >= 1.0) or not hasattr(datamodule, "val_dataloader"):
        return None, ""
    loaders = datamodule.val_dataloader()
    if not isinstance(loaders, list) or len(loaders) != 1 or not isinstance(loaders[0].dataset, EvalCollection):
        return None, ""
    collection, per_pass = loaders[0].dataset, (loaders[0].batch_size or 1) * trainer.world_size
    batches = math.ceil(len(collection) / per_pass)
    used = min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))
    items = min(len(collection), used * per_pass)
    served = [d.name for d, start in zip(collection.datasets, collection.offsets) if start < items and len(d)]
    if len(served) == len([d for d in collection.datasets if len(d)]):
        return None, ""
    return served, (f"trainer.limit_val_batches {limit} serves only the first {items} of {len(collection)} evaluation "
                    f"items, which reach the sets {served} and no later one: raise the limit (or data.eval_batch_size) "
                    "or lower data.eval_subset")


class EvaluationHooks(L.LightningModule):
    """Validation/test steps, offset-aware greedy generation, and the TOFU report files."""

    evaluation: TofuEvaluation | MuseEvaluation | LossEvaluation | None
    history: list[dict[str, Any]]

    def build_evaluation(self, set_names: list[str], benchmark: str = "tofu", token_budget: int | None = None) -> None:
        """Create the metric objects once the data module has said which sets it serves, then check the run
        (:meth:`_check_setup`).

        ``set_names`` are the sets of ``benchmark`` (``tofu`` or ``muse``, the data module's ``evaluation``);
        none means ``data.evaluation: loss``, scored by the forget and retain answer NLL. ``token_budget``: padded
        tokens per teacher-forced pass (the data module's ``eval_token_budget()``; ``None``:
        :data:`~lightning_unlearn.evaluation.passes.DEFAULT_TOKEN_BUDGET`).
        """
        if self.evaluation is None:
            ref, budget = self.hparams.retain_reference, token_budget or DEFAULT_TOKEN_BUDGET
            if set_names and benchmark == "muse":
                self.evaluation = MuseEvaluation(set_names, MuseReference.from_file(ref) if ref else None,
                                                 self.hparams.max_new_tokens, budget)
            elif set_names:
                self.evaluation = TofuEvaluation(set_names, RetainReference.from_file(ref) if ref else None,
                                                 token_budget=budget)
            else:
                self.evaluation = LossEvaluation(["forget", "retain"], budget)
        self._check_setup()

    def _check_setup(self) -> None:
        """Refuse at setup, before any training step, what would otherwise fail only at the first validation or
        the end of ``fit``: lm-eval tasks of ``data.lm_eval_tasks`` that are unknown or whose data cannot be loaded
        (every stage); in ``fit`` an export folder that cannot be written or would replace a model the run reads
        (:func:`~.export_target.check_export_dir`), and a checkpoint or early-stopping monitor naming a metric the
        configured validation never logs (:func:`~lightning_unlearn.evaluation.monitors.check_monitors`).

        Raises:
            ValueError: an unknown lm-eval task, an export folder that is a file or holds a model the run reads, or
                a monitor on a metric never logged (naming the cause, e.g.
                ``model.max_new_tokens`` 0 for ROUGE and model utility, and what is logged).
            FileNotFoundError: an lm-eval task's data is missing (offline without a cached copy).
            PermissionError: the export folder is not writable.
        """
        if self._trainer is None:
            return
        trainer = self.trainer
        settings = LmEvalSettings.from_datamodule(getattr(trainer, "datamodule", None))
        lm_eval = task_metrics(settings) if settings is not None else frozenset()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        h = self.hparams
        check_export_dir(h.get("export_dir"), {k: h.get(k) for k in ("small_model", "large_model", "tokenizer")})
        if trainer.fast_dev_run or not _validates(trainer):
            return  # no monitor reads a validation metric (Lightning disables checkpointing in fast_dev_run)
        if not any(monitored_metrics(c) for c in trainer.callbacks):
            return
        generates = self.hparams.max_new_tokens > 0
        plan = self.evaluation.plan(generates)
        served, note = _served_sets(trainer)
        if served is not None:  # the later sets get no sample: their metrics (and those built on them) are missing
            cut = self.evaluation.plan(generates, served)
            plan = MetricPlan(cut.logged, {**cut.missing, **{k: note for k in plan.logged - cut.logged}})
        check_monitors(trainer.callbacks, plan | MetricPlan(lm_eval))

    def stop_ids(self) -> list[int]:
        """Where generated answers end: EOS, the models' ``generation_config`` stops and the template's end of turn."""
        if getattr(self, "_stop_ids", None) is None:
            models = [self.model] if self.large is None else [self.large, self.model]
            self._stop_ids = stop_token_ids(self.tokenizer, models)
        return self._stop_ids

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 stop: StopFn | None = None, nonfinite: Tensor | None = None) -> Tensor:
        """Greedy new tokens for a left-padded batch, over the tokenizer's vocabulary (an embedding padded past it,
        as GPT-NeoX's, must not yield ids no token has), stopping at :meth:`stop_ids` (or when ``stop`` says, as
        lm-eval's ``until`` strings): one KV cache per model. ``nonfinite`` (bool ``[B]``) is set for the rows that
        read non-finite logits (:func:`~lightning_unlearn.offset.generation.greedy_generate`)."""
        return greedy_generate(
            self.logit_components(), input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids(),
            pad_token_id=self.tokenizer.pad_token_id, vocab_size=self.vocab_size, stop=stop, nonfinite=nonfinite,
        )

    def generate_texts(self, input_ids: Tensor, attention_mask: Tensor,
                       max_new_tokens: int | None = None) -> list[str | None]:
        """Greedy texts of a left-padded batch, at most ``max_new_tokens`` (default ``model.max_new_tokens``) each.

        A text is ``None`` where its generation read non-finite logits: its tokens are an argmax over NaN, and
        ROUGE scores ``None`` as NaN instead of scoring that text.
        """
        nonfinite = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = self.generate(input_ids, attention_mask, max_new_tokens or self.hparams.max_new_tokens,
                            nonfinite=nonfinite)
        texts = decode_answers(self.tokenizer, new, self.stop_ids())
        return [None if bad else text for text, bad in zip(texts, nonfinite.tolist())]

    # --- steps ----------------------------------------------------------------------------------------------

    def _eval_step(self, batch: Batch, stage: str) -> None:
        """Feed the evaluation; every result is computed once per epoch from per-sample values (``_finish``).

        Nothing is logged per step: a mean of step values would count the samples that DDP's sampler repeats
        to even out the ranks, and would depend on the batch size.
        """
        if "parts" not in batch or self.evaluation is None:
            raise ValueError(
                "Evaluation batches come from UnlearnDataModule's val/test loaders ({'parts': [{'set', 'index', "
                "'answer', ...}]}), with the data module attached to the trainer; got keys "
                f"{sorted(batch)}."
            )
        generate = self.generate_texts if self.hparams.max_new_tokens > 0 else None
        for part in batch["parts"]:
            self.evaluation.update(part, self, generate)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _finish(self, stage: str) -> dict[str, Any] | None:
        """Compute, reset and log the evaluation; returns the summary with its ``all_finite`` and ``non_finite``."""
        if self.evaluation is None:
            return None
        summary, report = self.evaluation.compute()
        self.evaluation.reset()
        if not self.trainer.sanity_checking:  # lm-eval tasks (data.lm_eval_tasks) as "task/metric", beside TOFU's
            summary.update(lm_eval_metrics(self, LmEvalSettings.from_datamodule(self.trainer.datamodule)))
        self.log_dict({f"{stage}/{k}": float(v) for k, v in summary.items() if v is not None}, sync_dist=False)
        self._last_report = report
        found = non_finite(summary, report, getattr(self.evaluation, "sets_of", lambda key: ()))
        return {**summary, "all_finite": not found["metrics"], "non_finite": found}

    def _say_non_finite(self, summary: dict[str, Any], where: str) -> None:
        """Warn (every rank's result is the same: rank 0 says it) when the summary holds non-finite results."""
        message = non_finite_message(getattr(self.evaluation, "benchmark", "loss"), summary["non_finite"])
        if message:
            rank_zero_warn(f"{message} ({where})")

    def on_validation_epoch_end(self) -> None:
        summary = self._finish("val")
        if summary is None or self.trainer.sanity_checking:
            return
        self._say_non_finite(summary, f"validation at epoch {self.current_epoch}")
        if not hasattr(self.evaluation, "benchmark"):
            return
        self.history.append({"epoch": self.current_epoch, "step": self.global_step, **summary})
        self._write_history()

    def on_test_epoch_end(self) -> None:
        summary = self._finish("test")
        if summary is None:
            return
        if hasattr(self.evaluation, "benchmark"):
            self._write_test_results(summary)
        else:
            self._say_non_finite(summary, "test")

    # --- files ----------------------------------------------------------------------------------------------

    def output_dir(self) -> Path:
        """The run's log directory (the logger's version folder, else ``default_root_dir``).

        Not ``trainer.log_dir``: that broadcasts from rank 0, and the rank-zero-only writers below calling it
        hung every DDP run at its first validation.
        """
        logger = self.trainer.loggers[0] if self.trainer.loggers else None
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        return Path(directory or self.trainer.default_root_dir)

    @rank_zero_only
    def _write_history(self) -> None:
        out = self.output_dir()
        atomic_write_json(out / f"{self.evaluation.benchmark}_HISTORY.json", self.history)
        self.evaluation.plot_history(self.history, out / "tradeoff_by_epoch.png",
                                     floor=rule_floor(self.trainer.callbacks))

    @rank_zero_only
    def _write_test_results(self, summary: dict[str, Any]) -> None:
        out, name = self.output_dir(), self.evaluation.benchmark
        summary = {"alpha": self.alpha if self.large is not None else None, **summary}
        atomic_write_json(out / f"{name}_SUMMARY.json", summary)
        atomic_write_json(out / f"{name}_EVAL.json", self._last_report)
        publish_summary(self.loggers, summary, [out / f"{name}_SUMMARY.json", out / f"{name}_EVAL.json"], name.lower())
        lm_eval_keys = tuple(k for k in summary if "/" in k)  # data.lm_eval_tasks' "task/metric"
        print_table(summary_table({type(self).__name__: summary}, tuple(self.evaluation.headline) + lm_eval_keys,
                                  f"{name} evaluation"))
        message = non_finite_message(name, summary["non_finite"])
        if message:
            print_warning(message)
        print(f"{name}_SUMMARY.json and {name}_EVAL.json written to {out}" +
              ("" if summary["all_finite"] else " (all_finite: false; see non_finite)"))
