"""Running lm-eval tasks on a model and reading the results: shared by the command line and by ``fit``/``test``.

The evaluation itself is lm-eval's (``lm_eval.simple_evaluate``): its prompts, few-shot sampling, metrics and
aggregation; this module only picks the tasks (:func:`~lightning_unlearn.harness.registry.task_manager`), turns
a missing dataset into an error that says what to do, and flattens lm-eval's result dictionary into the
``task/metric`` names the framework logs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.api.model import LM

from .registry import LOCAL_TASK_NAMES, task_manager

__all__ = ["evaluate", "flat_metrics", "missing_data_error"]


def _quiet_lm_eval() -> None:
    """lm-eval logs every task's dataset building at INFO/WARNING; its results are what matters here."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def evaluate(
    lm: LM,
    tasks: Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    evaluation_tracker: Any = None,
    quiet: bool = True,
    bootstrap_iters: int = 100000,
    seed: int = 0,
) -> dict[str, Any]:
    """lm-eval's results dictionary (``results``, ``configs``, ``n-shot``, ...; ``samples`` with ``log_samples``).

    Args:
        lm: the model, e.g. :class:`~lightning_unlearn.harness.model.UnlearnedLM`.
        tasks: task, group or tag names (glob patterns allowed).
        include_path: extra folders of task YAML, as lm-eval's ``--include_path``.
        num_fewshot: few-shot examples per prompt (``None``: each task's default).
        limit: at most this many documents per task (a fraction when below 1), as lm-eval's ``--limit``.
        log_samples: keep every request and response under ``samples``.
        evaluation_tracker: lm-eval's ``EvaluationTracker``, to write ``results_*.json`` as lm-eval does.
        quiet: silence lm-eval's logging below ERROR.
        bootstrap_iters: lm-eval's bootstrap resamples for standard errors of non-mean metrics (0: none).
        seed: lm-eval's random, numpy, torch and few-shot seeds.

    ``lm.model_args`` (:class:`~lightning_unlearn.harness.model.UnlearnedLM` has it: the exports, alphas, large and
    reference models) becomes the results' ``config.model_args``; lm-eval records ``null`` for a model object.

    When ``lm`` answered a log-likelihood request with NaN or infinity (its ``non_finite_requests``, as
    :class:`~lightning_unlearn.harness.model.UnlearnedLM` counts them), every metric of every task is NaN and
    ``results["non_finite_requests"]`` says how many: lm-eval ranks the choices with ``argmax``, which takes a NaN
    for the largest, so a NaN model would otherwise score accuracy 1.0 on tasks whose gold answer comes first.

    Raises:
        ValueError: an unknown task (with close names).
        FileNotFoundError: a task's data is neither on disk nor reachable (offline without a cached copy).
    """
    if quiet:
        _quiet_lm_eval()
    manager = task_manager(list(tasks), include_path)
    try:
        results = simple_evaluate(
            model=lm, model_args=getattr(lm, "model_args", None), tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
            evaluation_tracker=evaluation_tracker, task_manager=manager, bootstrap_iters=bootstrap_iters,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except ConnectionError as err:  # datasets' offline error: OfflineModeIsEnabled, or no network
        raise missing_data_error(tasks, err) from err
    if results is None:  # only ranks other than 0 get None from lm-eval
        raise RuntimeError("lm-eval returned no results on this process (rank != 0).")
    non_finite = int(getattr(lm, "non_finite_requests", 0))
    if non_finite:
        for section in ("results", "groups"):
            for metrics in results.get(section, {}).values():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
                        metrics[key] = math.nan
        results["non_finite_requests"] = non_finite
    return results


def missing_data_error(tasks: Sequence[str], err: Exception, tasks_flag: str = "--tasks",
                       include_flag: str = "--include_path") -> FileNotFoundError:
    """The error for task data that is neither on this machine nor downloadable (``err``: datasets' error);
    ``tasks_flag`` and ``include_flag`` are the options that choose tasks where the error is raised (the command
    line's, or ``--data.lm_eval_tasks`` and ``--data.lm_eval_include_path`` in fit and test)."""
    hub = [t for t in tasks if t not in LOCAL_TASK_NAMES]
    return FileNotFoundError(
        f"The data of lm-eval task(s) {hub} is not on this machine and cannot be downloaded ({err}). Run "
        "once with network access to fill the Hugging Face datasets cache (HF_DATASETS_CACHE), or choose other "
        f"tasks with {tasks_flag}: the package's offline {list(LOCAL_TASK_NAMES)}, or your own YAML with "
        f"dataset_path json and local data_files passed with {include_flag}."
    )


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` from lm-eval's ``results``, filters other than ``none`` kept in the name
    (``"gsm8k/exact_match,strict-match"``), standard errors, sample counts and non-numbers dropped; groups included."""
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                if "_stderr" in key or key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else key
                flat[f"{task}/{name}"] = float(value)
    return flat
