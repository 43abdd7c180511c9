"""``lightning-unlearn lm-eval EXPORT_DIR [EXPORT_DIR ...] --tasks T1,T2 --output_path OUT``.

Evaluates an unlearned model with lm-evaluation-harness: an offset export (several are composed), a LoRA export,
a ``composition.json``, or any Hugging Face causal LM directory or id (a direct model). Flags are named as
lm-eval's own; results are written by lm-eval's ``EvaluationTracker`` (``OUT/<model>/results_<date>.json``, and
``samples_<task>_<date>.jsonl`` with ``--log_samples``) and printed as lm-eval's table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..numbers import finite_float
from .registry import LOCAL_TASK_NAMES

DEFAULT_TASKS = "tofu_general"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-unlearn lm-eval",
        description="Evaluate an unlearned model (offset, composed, LoRA or direct) with lm-evaluation-harness.",
    )
    parser.add_argument("exports", nargs="+", metavar="EXPORT_DIR",
                        help="offset exports (composed when several), a LoRA export, a composition.json, or a "
                             "Hugging Face causal LM directory or id")
    parser.add_argument("--tasks", default=DEFAULT_TASKS,
                        help=f"comma-separated lm-eval tasks, groups or tags (default {DEFAULT_TASKS}: the offline "
                             f"TOFU multiple-choice tasks {list(LOCAL_TASK_NAMES[1:])})")
    parser.add_argument("--include_path", action="append", default=None,
                        help="extra folder of task YAML (repeatable); the package's own tasks are always included")
    parser.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=float, default=None,
                        help="documents per task (a fraction of them when below 1); for quick checks only")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward pass")
    parser.add_argument("--output_path", default=None, help="folder (or .json file) for lm-eval's results")
    parser.add_argument("--log_samples", action="store_true", help="also write every request and response")
    parser.add_argument("--alpha", type=finite_float, nargs="+", default=None,
                        help="offset strength: one for every offset, or one per offset (default: the manifests')")
    parser.add_argument("--large_model", default=None, help="where the large model is now, if it moved")
    parser.add_argument("--reference_model", default=None, help="where the reference small model is now, if it moved")
    parser.add_argument("--large_dtype", default=None, help="dtype of the large model (default: the one the export "
                        "records, training's; else bfloat16)")
    parser.add_argument("--small_dtype", default=None, help="dtype of the small models (default: the one the export "
                        "records, training's; else float32)")
    parser.add_argument("--device", default="cpu", help="torch device for every model")
    parser.add_argument("--max_length", type=int, default=None, help="longest context in tokens (default: config)")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (few-shot sampling included)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation; returns lm-eval's results dictionary (``samples`` removed)."""
    args = _parser().parse_args(argv)
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    from .model import UnlearnedLM
    from .run import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    try:
        lm = UnlearnedLM(args.exports if len(args.exports) > 1 else args.exports[0], alpha=args.alpha,
                         batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                         large_model=args.large_model, reference_model=args.reference_model,
                         large_dtype=args.large_dtype, small_dtype=args.small_dtype)
        tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
        results = evaluate(lm, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot, limit=limit,
                           log_samples=args.log_samples, evaluation_tracker=tracker, seed=args.seed)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.general_config_tracker.model_name_sanitized = _sanitized(args.exports)
        tracker.save_results_aggregated(results=results, samples=samples)
        if args.log_samples:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    print(f"{' + '.join(args.exports)} (alpha {args.alpha or 'from the manifests'}), limit {limit}, "
          f"num_fewshot {args.num_fewshot}, batch_size {args.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output_path:
        print(f"results written under {args.output_path}")
    if results.get("non_finite_requests"):
        print(f"NON-FINITE: {results['non_finite_requests']} log-likelihoods were NaN or infinite (the model's logits "
              "are not finite): every metric is reported as NaN, not a measurement.", file=sys.stderr)
    return json.loads(json.dumps(results, default=str))


def _sanitized(exports: Sequence[str]) -> str:
    """A folder name for the results: the exports' names, joined (lm-eval sanitizes its model names alike)."""
    import os

    names = [os.path.basename(os.path.normpath(e)) or "model" for e in exports]
    return "__".join(n.replace("/", "__") for n in names)


if __name__ == "__main__":
    main()
