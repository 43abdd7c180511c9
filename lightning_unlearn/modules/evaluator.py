"""Validation and test of an unlearning run: the TOFU, MUSE or loss evaluation, its logs and result files.

:class:`Evaluator` is an object the training module holds (composed, not mixed in): its steps and epoch ends hand
it the batch, the combined model (:class:`~lightning_unlearn.offset.combined.CombinedModel`) and the greedy texts,
and it uses nothing of the module but what it is passed. Validation runs the same
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
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

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
from ..data.tofu_eval import EvalCollection
from ..evaluation.monitors import MetricPlan, check_monitors, monitored_metrics
from ..harness.hooks import LmEvalSettings, lm_eval_metrics, task_metrics
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


class Evaluator(L.Callback):
    """The evaluation of one training module: built when the data module says which sets it serves, fed at every
    validation or test step (the module's steps call :meth:`update`), computed, logged and written at each epoch
    end (as a callback the module returns from ``configure_callbacks``).

    Args:
        retain_reference: ``model.retain_reference``, the retain-only model's ``TOFU_EVAL.json`` or ``MUSE_EVAL.json``
            (forget quality and privleak are computed against it; reported missing without it).
        max_new_tokens: ``model.max_new_tokens``; 0 skips generation (and ROUGE).

    Attributes:
        evaluation: the metric object (TOFU, MUSE or loss), ``None`` until :meth:`build`.
        history: one summary per validation, written to ``TOFU_HISTORY.json`` (``MUSE_HISTORY.json``).
    """

    def __init__(self, retain_reference: str | None = None, max_new_tokens: int = 200) -> None:
        super().__init__()
        self.retain_reference = retain_reference
        self.max_new_tokens = max_new_tokens
        self.evaluation: TofuEvaluation | MuseEvaluation | LossEvaluation | None = None
        self.history: list[dict[str, Any]] = []
        self.last_report: dict[str, Any] | None = None

    def build(self, set_names: list[str], benchmark: str = "tofu", token_budget: int | None = None) -> None:
        """Create the metric objects once the data module has said which sets it serves (once: a second call keeps
        them).

        ``set_names`` are the sets of ``benchmark`` (``tofu`` or ``muse``, the data module's ``evaluation``);
        none means ``data.evaluation: loss``, scored by the forget and retain answer NLL. ``token_budget``: padded
        tokens per teacher-forced pass (the data module's ``eval_token_budget()``; ``None``:
        :data:`~lightning_unlearn.evaluation.passes.DEFAULT_TOKEN_BUDGET`).
        """
        if self.evaluation is not None:
            return
        ref, budget = self.retain_reference, token_budget or DEFAULT_TOKEN_BUDGET
        if set_names and benchmark == "muse":
            self.evaluation = MuseEvaluation(set_names, MuseReference.from_file(ref) if ref else None,
                                             self.max_new_tokens, budget)
        elif set_names:
            self.evaluation = TofuEvaluation(set_names, RetainReference.from_file(ref) if ref else None,
                                             token_budget=budget)
        else:
            self.evaluation = LossEvaluation(["forget", "retain"], budget)

    def check_setup(self, trainer: L.Trainer, sources: dict[str, str | None], export_dir: str | None) -> None:
        """Refuse at setup, before any training step, what would otherwise fail only at the first validation or
        the end of ``fit``: lm-eval tasks of ``data.lm_eval_tasks`` that are unknown or whose data cannot be loaded
        (every stage); in ``fit`` an export folder that cannot be written or would replace a model the run reads
        (``sources``, the run's model options; :func:`~.export_target.check_export_dir`), and a checkpoint or
        early-stopping monitor naming a metric the configured validation never logs
        (:func:`~lightning_unlearn.evaluation.monitors.check_monitors`).

        Raises:
            ValueError: an unknown lm-eval task, an export folder that is a file or holds a model the run reads, or
                a monitor on a metric never logged (naming the cause, e.g.
                ``model.max_new_tokens`` 0 for ROUGE and model utility, and what is logged).
            FileNotFoundError: an lm-eval task's data is missing (offline without a cached copy).
            PermissionError: the export folder is not writable.
        """
        settings = LmEvalSettings.from_datamodule(getattr(trainer, "datamodule", None))
        lm_eval = task_metrics(settings) if settings is not None else frozenset()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        check_export_dir(export_dir, sources)
        if trainer.fast_dev_run or not _validates(trainer):
            return  # no monitor reads a validation metric (Lightning disables checkpointing in fast_dev_run)
        if not any(monitored_metrics(c) for c in trainer.callbacks):
            return
        generates = self.max_new_tokens > 0
        plan = self.evaluation.plan(generates)
        served, note = _served_sets(trainer)
        if served is not None:  # the later sets get no sample: their metrics (and those built on them) are missing
            cut = self.evaluation.plan(generates, served)
            plan = MetricPlan(cut.logged, {**cut.missing, **{k: note for k in plan.logged - cut.logged}})
        check_monitors(trainer.callbacks, plan | MetricPlan(lm_eval))

    # --- steps ----------------------------------------------------------------------------------------------

    def update(self, batch: Batch, logits_fn: Any, generate_fn: Any) -> None:
        """Feed the evaluation one batch: ``logits_fn`` gives teacher-forced logits (and, as the combined model,
        its shared-prefix scoring), ``generate_fn`` greedy texts (``None``: no generation). Every result is computed
        once per epoch from per-sample values (:meth:`finish`).

        Nothing is logged per step: a mean of step values would count the samples that DDP's sampler repeats
        to even out the ranks, and would depend on the batch size.

        Raises:
            ValueError: a batch that is not an evaluation batch of the data module, or no :meth:`build` yet.
        """
        if "parts" not in batch or self.evaluation is None:
            raise ValueError(
                "Evaluation batches come from UnlearnDataModule's val/test loaders ({'parts': [{'set', 'index', "
                "'answer', ...}]}), with the data module attached to the trainer; got keys "
                f"{sorted(batch)}."
            )
        generate = generate_fn if self.max_new_tokens > 0 else None
        for part in batch["parts"]:
            self.evaluation.update(part, logits_fn, generate)

    def finish(self, module: L.LightningModule, stage: str) -> dict[str, Any] | None:
        """Compute, reset and log (through ``module``) the evaluation, with the lm-eval tasks of the data module;
        returns the summary with its ``all_finite`` and ``non_finite``."""
        if self.evaluation is None:
            return None
        trainer = module.trainer
        summary, report = self.evaluation.compute()
        self.evaluation.reset()
        if not trainer.sanity_checking:  # lm-eval tasks (data.lm_eval_tasks) as "task/metric", beside TOFU's
            summary.update(lm_eval_metrics(module, LmEvalSettings.from_datamodule(trainer.datamodule)))
        module.log_dict({f"{stage}/{k}": float(v) for k, v in summary.items() if v is not None}, sync_dist=False)
        self.last_report = report
        found = non_finite(summary, report, getattr(self.evaluation, "sets_of", lambda key: ()))
        return {**summary, "all_finite": not found["metrics"], "non_finite": found}

    def _say_non_finite(self, summary: dict[str, Any], where: str) -> None:
        """Warn (every rank's result is the same: rank 0 says it) when the summary holds non-finite results."""
        message = non_finite_message(getattr(self.evaluation, "benchmark", "loss"), summary["non_finite"])
        if message:
            rank_zero_warn(f"{message} ({where})")

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A validation epoch's end: log, warn on non-finite results, append to the history file."""
        summary = self.finish(module, "val")
        trainer = module.trainer
        if summary is None or trainer.sanity_checking:
            return
        self._say_non_finite(summary, f"validation at epoch {trainer.current_epoch}")
        if not hasattr(self.evaluation, "benchmark"):
            return
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **summary})
        self._write_history(trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A test's end: log and write the summary (with the offset strength ``alpha`` of the module's combined
        model, ``None`` for a direct model) and the per-sample report, print the table."""
        summary = self.finish(module, "test")
        if summary is None:
            return
        combined = getattr(module, "combined", None)
        alpha = combined.alphas[0] if combined is not None and not combined.is_direct else None
        if hasattr(self.evaluation, "benchmark"):
            self._write_test_results(module.trainer, {"alpha": alpha, **summary}, type(module).__name__)
        else:
            self._say_non_finite(summary, "test")

    # --- files ----------------------------------------------------------------------------------------------

    @staticmethod
    def output_dir(trainer: L.Trainer) -> Path:
        """The run's log directory (the logger's version folder, else ``default_root_dir``).

        Not ``trainer.log_dir``: that broadcasts from rank 0, and the rank-zero-only writers below calling it
        hung every DDP run at its first validation.
        """
        logger = trainer.loggers[0] if trainer.loggers else None
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        return Path(directory or trainer.default_root_dir)

    @rank_zero_only
    def _write_history(self, trainer: L.Trainer) -> None:
        out = self.output_dir(trainer)
        atomic_write_json(out / f"{self.evaluation.benchmark}_HISTORY.json", self.history)
        self.evaluation.plot_history(self.history, out / "tradeoff_by_epoch.png",
                                     floor=rule_floor(trainer.callbacks))

    @rank_zero_only
    def _write_test_results(self, trainer: L.Trainer, summary: dict[str, Any], method: str) -> None:
        out, name = self.output_dir(trainer), self.evaluation.benchmark
        atomic_write_json(out / f"{name}_SUMMARY.json", summary)
        atomic_write_json(out / f"{name}_EVAL.json", self.last_report)
        publish_summary(trainer.loggers, summary, [out / f"{name}_SUMMARY.json", out / f"{name}_EVAL.json"],
                        name.lower())
        lm_eval_keys = tuple(k for k in summary if "/" in k)  # data.lm_eval_tasks' "task/metric"
        print_table(summary_table({method: summary}, tuple(self.evaluation.headline) + lm_eval_keys,
                                  f"{name} evaluation"))
        message = non_finite_message(name, summary["non_finite"])
        if message:
            print_warning(message)
        print(f"{name}_SUMMARY.json and {name}_EVAL.json written to {out}" +
              ("" if summary["all_finite"] else " (all_finite: false; see non_finite)"))
