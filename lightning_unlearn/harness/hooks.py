"""lm-eval tasks beside the TOFU evaluation in ``fit`` (every validation) and ``test``.

The tasks are listed in the data config (``data.lm_eval_tasks``); the training module's evaluator
(:mod:`lightning_unlearn.modules.evaluator`) calls :func:`lm_eval_metrics` when an evaluation epoch ends and logs
its ``task/metric`` values under ``val/`` or ``test/`` beside the TOFU metrics, so that they reach the history,
the test summary, the loggers (W&B) and any ``ModelCheckpoint`` monitoring them (``val/tofu_world_facts_mc/acc``).

The model evaluated is the module's own combined model, live (no export): :class:`ModuleLM` gives
:class:`~lightning_unlearn.harness.model.UnlearnedLM` the module's offset logits (``forward``) and its offset
greedy decoding with one KV cache per model (``generate``).

Under DDP lm-eval runs on rank 0 only, on the whole task, and the numbers are broadcast to the other ranks,
which wait: every rank then logs the same values (a checkpoint monitor needs them everywhere) and nothing is
split or gathered, so the numbers equal a single-process run. The cost is that the other devices idle during
lm-eval; with long task lists beyond the collective's timeout (30 minutes by default), raise it
(``DDPStrategy(timeout=...)``) or lower ``data.lm_eval_limit``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..offset.generation import StopFn

__all__ = ["LmEvalSettings", "ModuleLM", "lm_eval_metrics", "task_metrics"]


@dataclass(frozen=True)
class LmEvalSettings:
    """The ``data.lm_eval_*`` options: which tasks, where extra task files live, how many documents, shots, batch."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> LmEvalSettings | None:
        """The settings of a data module with ``lm_eval_tasks`` set, else ``None``."""
        h = getattr(datamodule, "hparams", None) or {}
        tasks = h.get("lm_eval_tasks")
        if not tasks:
            return None
        limit = h.get("lm_eval_limit")
        batch = h.get("lm_eval_batch_size") or h.get("eval_batch_size") or h.get("batch_size") or 8
        return cls(tuple(tasks), h.get("lm_eval_include_path"),
                   int(limit) if limit is not None and limit >= 1 else limit, h.get("lm_eval_num_fewshot"), int(batch))


class ModuleLM:
    """The training module seen as a :class:`~lightning_unlearn.harness.model.CombinedLM`: its combined logits
    (``z_L + alpha (z_S - z_S0)``, or ``z_S``) and its offset greedy decoding, on the module's device."""

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module
        self.tokenizer: PreTrainedTokenizerBase = module.tokenizer
        self.stop_ids: list[int] = list(module.stop_ids())

    @property
    def device(self) -> torch.device:
        return self.module.device

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.module(input_ids.to(self.device), attention_mask.to(self.device))

    def generate_ids(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                     stop: StopFn | None = None) -> Tensor:
        return self.module.generate(input_ids.to(self.device), attention_mask.to(self.device), max_new_tokens,
                                    stop=stop)

    def modules(self) -> Iterator[nn.Module]:
        return self.module.modules()


def _run(module: L.LightningModule, settings: LmEvalSettings) -> dict[str, float]:
    from .model import UnlearnedLM
    from .run import evaluate, flat_metrics

    lm = UnlearnedLM(model=ModuleLM(module), batch_size=settings.batch_size)
    was_training = module.training
    module.eval()
    try:
        results = evaluate(lm, list(settings.tasks), include_path=settings.include_path, limit=settings.limit,
                           num_fewshot=settings.num_fewshot, bootstrap_iters=0)
    finally:
        module.train(was_training)
    return flat_metrics(results)


def task_metrics(settings: LmEvalSettings) -> frozenset[str]:
    """The ``task/metric`` names :func:`lm_eval_metrics` will give, read from the tasks loaded with their data.

    Loading a task reads (or downloads) its documents, so calling this when the trainer sets up finds a task that
    is unknown or whose data is missing before the first training step, not after an epoch and a TOFU
    validation. Names follow :func:`~lightning_unlearn.harness.run.flat_metrics`: ``task/acc``, or
    ``task/metric,filter`` for a filter other than ``none``; groups with aggregate metrics included.

    Raises:
        ValueError: an unknown task (with the closest names).
        FileNotFoundError: a task's data is neither on this machine nor downloadable (offline without a cached
            copy), or a local task names a data file that does not exist; the message names the task.
    """
    from .registry import task_manager
    from .run import _quiet_lm_eval, missing_data_error

    _quiet_lm_eval()
    manager = task_manager(list(settings.tasks), settings.include_path)
    names: set[str] = set()
    for task in settings.tasks:  # one at a time, so that an error names its task
        try:
            loaded = manager.load([task])
        except ConnectionError as err:  # datasets' offline error: OfflineModeIsEnabled, or no network
            raise missing_data_error([task], err, "--data.lm_eval_tasks (null for none)",
                                     "--data.lm_eval_include_path") from err
        except FileNotFoundError as err:
            raise FileNotFoundError(f"lm-eval task {task!r} of data.lm_eval_tasks cannot load its data: {err}. Fix "
                                    "the task's data_files (or dataset_path) or remove the task.") from err
        for name, obj in loaded["tasks"].items():
            filters = [f.name for f in getattr(obj, "_filters", [])] or ["none"]
            for metric in getattr(obj, "_metric_fn_list", {}):
                names |= {f"{name}/{metric}" if f == "none" else f"{name}/{metric},{f}" for f in filters}
        for name, group in loaded["groups"].items():
            for agg in getattr(group, "aggregate_metric_list", None) or []:
                for f in getattr(agg, "filter_list", None) or ["none"]:
                    names.add(f"{name}/{agg.metric}" if f == "none" else f"{name}/{agg.metric},{f}")
    return frozenset(names)


def lm_eval_metrics(module: L.LightningModule, settings: LmEvalSettings | None) -> dict[str, float]:
    """``{"task/metric": value}`` of the module's current model on the configured tasks (``{}`` without any).

    A collective under DDP: every rank must call it; rank 0 evaluates, the others receive its numbers.
    """
    if settings is None:
        return {}
    trainer = module.trainer
    metrics = _run(module, settings) if trainer.is_global_zero else None
    if trainer.world_size > 1:
        metrics = trainer.strategy.broadcast(metrics, src=0)
    return dict(metrics or {})

