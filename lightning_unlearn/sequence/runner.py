"""Running a sequence's steps: each an ordinary ``fit`` then an evaluation, cached and recorded as the comparison's
cells are (:func:`lightning_unlearn.compare.runner.run_recorded`: ``RESULT.json`` per step, ``ok`` with the same key
means done, a failure is recorded and the run goes on).

A step that builds on an earlier one (``continue`` resumes its checkpoint; ``compose`` and ``fuse`` reuse the earlier
requests' exports and layers) is not run when that one failed: it is recorded as failed, naming the request, and
is retried with it on the next run. After each evaluation the per-sample report is cut into the requests' folds
(:func:`fold_metrics`), so each step's ``RESULT.json`` says how forgotten every request's samples are.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..compare.runner import Runner, find_one, in_process, is_done, read_result, run_recorded
from .spec import Step, settings

FOLD_METRICS = {"forget_Q_A_ROUGE": "rougeL_recall", "forget_Q_A_Prob": "prob", "forget_truth_ratio": "score"}
"""The TOFU per-sample forget metrics averaged per fold (report key: the per-sample field)."""


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _per_sample(report: Mapping[str, Any], key: str, field: str) -> dict[int, float]:
    entries = (report.get(key) or {}).get("value_by_index") or {}
    return {int(i): e.get(field) for i, e in entries.items() if isinstance(e, Mapping)}


def fold_metrics(report: Mapping[str, Any], folds: Sequence[Sequence[int]], k: int,
                 reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The forget metrics of each fold and of the requested (folds ``1..k``) and pending (``k+1..K``) samples, from a
    TOFU per-sample report (``TOFU_EVAL.json``).

    Each metric is the mean over the samples (``None`` where no sample has it). ``forget_quality`` of the requested
    samples is the KS p-value of their truth ratios against the ``reference`` report's (a retain model) on the same
    samples (:func:`lightning_unlearn.metrics.functional.forget_quality`); None without a reference.
    """
    from ..metrics.functional import forget_quality

    values = {key: _per_sample(report, key, field) for key, field in FOLD_METRICS.items()}

    def group(indices: Sequence[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": len(indices)}
        for key, per in values.items():
            out[key] = _mean([per[i] for i in indices if i in per])
        return out

    requested = [i for fold in folds[:k] for i in fold]
    pending = [i for fold in folds[k:] for i in fold]
    result = {"folds": [group(f) for f in folds], "requested": group(requested), "pending": group(pending)}
    if reference is not None and requested:
        ratios = values["forget_truth_ratio"]
        ref = _per_sample(reference, "forget_truth_ratio", "score")
        common = [i for i in requested if i in ratios and i in ref and ratios[i] is not None and ref[i] is not None]
        result["requested"]["forget_quality"] = (
            float(forget_quality([ratios[i] for i in common], [ref[i] for i in common])) if common else None)
    return result


def _remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def _unlearning_layers(step: Step) -> Path:
    """The unlearning layers (and Gram matrices) an EUL fit saved under the step's fit folder."""
    return find_one(step.folder / "fit", "unlearning_layers.safetensors").parent


class StepRunner:
    """Runs steps with one ``main.py`` runner, the benchmark's result-file prefix and the requests' folds.

    ``folds``: for each request, the forget evaluation samples it asks to forget (None: no per-fold metrics, e.g.
    MUSE, whose evaluation sets are not cut by request).
    """

    def __init__(self, benchmark: str, folds: list[list[int]] | None, runner: Runner = in_process,
                 upstream: str = "", force: bool = False) -> None:
        self.benchmark = benchmark
        self.folds = folds
        self.runner = runner
        self.upstream = upstream
        self.force = force

    def key(self, step: Step) -> str:
        return step.key(self.upstream)

    def is_done(self, step: Step) -> bool:
        return not self.force and is_done(step.folder, self.key(step))

    def run(self, step: Step) -> dict[str, Any]:
        """Run one step unless it is done; return its result (``status`` ``ok`` or ``failed``).

        A step whose dependencies (``step.depends``: the retain model's evaluation, the previous request's step) are
        not done is recorded as failed because of the first of them, without running anything.
        """
        if self.is_done(step):
            return read_result(step.folder) or {}
        failed_before = next((d.name for d in step.depends if not is_done(d.folder, self.key(d))), None)
        result: dict[str, Any] = {"series": step.series, "strategy": step.strategy, "mode": step.mode, "k": step.k,
                                  "key": self.key(step), "forget_split": step.forget_split,
                                  "fit_command": step.describe()}

        def work(result: dict[str, Any]) -> None:
            if failed_before:
                raise RuntimeError(f"not run: it builds on {failed_before}, which failed")
            for stale in ("fit", "test", "export", "fused"):
                _remove(step.folder / stale)
            for stale_file in step.folder.glob("*_[SE][UV]*.json"):  # an earlier run's copied results
                stale_file.unlink()
            if step.fit:
                self._fit(step, result)
            self._evaluate(step, result)

        return run_recorded(step.folder, result, work, step.name, tag="sequence")

    def _fit(self, step: Step, result: dict[str, Any]) -> None:
        fit = list(step.fit or [])
        if step.resume is not None:
            fit += ["--ckpt_path", str(find_one(step.resume.folder / "fit", "*.ckpt"))]
            result["fit_command"] = "python main.py " + shlex.join(fit)
        print(f"\n[sequence] {step.name}: {result['fit_command']}", flush=True)
        start = time.perf_counter()
        self.runner(fit)
        result["train_s"] = round(time.perf_counter() - start, 1)

    def _evaluate(self, step: Step, result: dict[str, Any]) -> None:
        test = list(step.test or [])
        out = step.folder / "test"
        start = time.perf_counter()
        if step.strategy == "fuse":
            from ..models.adapters import fuse, load_adapter_set, save_adapter_set

            sets = [load_adapter_set(_unlearning_layers(part)) for part in step.parts]
            save_adapter_set(fuse(sets), step.folder / "fused")
            result["fused"] = [str(_unlearning_layers(part)) for part in step.parts]
        if step.strategy == "compose":
            from .composed import evaluate_composition

            exports = [str(part.folder / "export") for part in step.parts]
            options = settings([], test[1:])
            reference = options["model"].get("retain_reference")
            result["test_command"] = f"composition of {len(exports)} exports: {' + '.join(exports)}"
            print(f"[sequence] {step.name}: {result['test_command']}", flush=True)
            evaluate_composition(exports, options["data"], options["model"], out, reference)
        else:
            if step.fit is not None and step.strategy != "fuse":
                test += ["--ckpt_path", str(find_one(step.folder / "fit", "*.ckpt"))]
            result["test_command"] = "python main.py " + shlex.join(test)
            print(f"[sequence] {step.name}: {result['test_command']}", flush=True)
            self.runner(test)
        result["test_s"] = round(time.perf_counter() - start, 1)
        for kind in ("SUMMARY", "EVAL"):  # at a fixed place: later steps read the retain model's report there
            shutil.copyfile(find_one(out, f"{self.benchmark}_{kind}.json"), step.folder / f"{self.benchmark}_{kind}.json")
        result["summary"] = json.loads((step.folder / f"{self.benchmark}_SUMMARY.json").read_text())
        if step.general_tasks and not any("/" in key for key in result["summary"]):
            raise RuntimeError(f"the evaluation ran lm-eval tasks {step.general_tasks} but its summary has no "
                               "task/metric entries: the general accuracy would be missing")
        if self.folds is not None and self.benchmark == "TOFU":
            report = json.loads((step.folder / "TOFU_EVAL.json").read_text())
            reference_path = _flag(test, "--model.retain_reference")
            reference = json.loads(Path(reference_path).read_text()) if reference_path else None
            result.update(fold_metrics(report, self.folds, step.k, reference))


def _flag(args: Sequence[str], flag: str) -> str | None:
    """The last value given to ``flag`` in an argument list, or None."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    return values[-1] if values and values[-1] != "null" else None


def run_series(steps: Sequence[Step], run: Callable[[Step], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run a series' steps in order (a step that builds on a failed one is recorded as failed by ``run``)."""
    return [run(step) for step in steps]
