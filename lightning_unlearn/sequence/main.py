"""``lightning-unlearn sequence``: build the world if asked, evaluate the models before any request, run every
strategy's requests in order, write the table and the figure."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Any

from ..compare.main import build_world, check_general_tasks, conditions
from ..compare.runner import in_process, in_subprocess
from .requests import Requests, fold_indices
from .runner import StepRunner, run_series
from .spec import CONFIGS, STRATEGIES, SequenceSpec
from .table import write_outputs

WORLDS = {"tiny": CONFIGS / "tiny.yaml"}
"""``--world NAME``: the sequence config of an embedded world."""


def folds_of(spec: SequenceSpec, requests: Requests) -> list[list[int]] | None:
    """Each request's samples in the forget evaluation set (TOFU question/answer requests), None for MUSE.

    Raises:
        ValueError: ``data.eval_subset`` leaves out a requested sample, or a request has no sample in the set.
    """
    if spec.benchmark() != "TOFU":
        return None
    from ..data.sources import load_split

    data = spec.base_settings()["data"]
    dataset = spec.fill(data.get("dataset") or "bundled")
    split = requests.eval_forget_split() or data.get("eval_forget_split")
    if not split:
        raise ValueError(f"{spec.source}: name the forget evaluation split holding every request (--data."
                         "eval_forget_split in args): the requests are not TOFU forgetXX splits.")
    questions = [r["question"] for r in load_split(dataset, split)]
    asked = [[r["question"] for r in load_split(dataset, req.split)] for req in requests.items]
    folds = fold_indices(requests, questions, asked)
    subset = data.get("eval_subset")
    last = max(i for fold in folds for i in fold)
    if subset is not None and int(subset) <= last:
        raise ValueError(f"{spec.source}: data.eval_subset {subset} cuts the forget evaluation set {split}, so some "
                         f"requested samples would not be measured: set it to at least {last + 1} "
                         f"(args: [--data.eval_subset, '{last + 1}']).")
    return folds

def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="lightning-unlearn sequence", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", choices=sorted(WORLDS), help="an embedded world (tiny: the demo's quick world)")
    source.add_argument("--config", help="a sequence config (configs/sequence/*.yaml)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, help="only these strategies")
    parser.add_argument("--requests", type=int, help="only the first N requests")
    parser.add_argument("--output", help="folder of the steps and the table (default: the config's output)")
    parser.add_argument("--world-folder", help="where the tiny world is built or reused (default: OUTPUT/world)")
    parser.add_argument("--epochs", type=int, help="override the budget's max_epochs per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny world")
    parser.add_argument("--force", action="store_true", help="rerun steps that are done")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: write the table and figure from the steps done so far (the others: not run)")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each command as its own process (real models: device memory freed between steps)")
    args = parser.parse_args(argv)
    spec = SequenceSpec.load(WORLDS[args.world] if args.world else args.config)
    if args.strategies:
        spec.strategies = {s: o for s, o in spec.strategies.items() if s in args.strategies}
        if not spec.strategies:
            raise ValueError(f"--strategies {args.strategies}: the config runs none of them ({list(spec.strategies)}).")
    if args.output:
        spec.output = args.output
    if args.world_folder:
        spec.world_folder = args.world_folder
    if args.epochs:
        spec.budget["max_epochs"] = args.epochs
    start = time.perf_counter()
    requests = spec.parse_requests()
    if args.requests:
        if not 1 <= args.requests <= len(requests):
            raise ValueError(f"--requests {args.requests}: the config has {len(requests)} requests.")
        requests = replace(requests, items=requests.items[: args.requests])
    benchmark = spec.benchmark()
    folds = folds_of(spec, requests)
    if not args.table_only:
        check_general_tasks(spec)  # type: ignore[arg-type]  (reads general_tasks only)
    upstream = ""
    if spec.world and not args.table_only:
        upstream = build_world(spec, args.seed, args.force)  # type: ignore[arg-type]  (reads world fields only)
    print(f"[sequence] {len(requests)} requests: {', '.join(r.split for r in requests.items)}; strategies: "
          f"{', '.join(f'{s}-{m}' for s, m in spec.series())}")
    steps = StepRunner(benchmark, folds, in_subprocess if args.subprocess else in_process, upstream, args.force)
    references = spec.reference_steps(requests)
    retain = references[0] if spec.retain_model else None
    run = stored if args.table_only else steps.run
    reference_results = run_series(references, run)  # retain first: "before" reads its report
    before = reference_results[-1]
    series = {f"{s}-{m}" if s in ("continue", "all_at_once") else s: run_series(chain, run)
              for (s, m), chain in spec.steps(requests, retain).items()}
    command = "lightning-unlearn sequence " + " ".join(argv if argv is not None else sys.argv[1:])
    wall = time.perf_counter() - start
    ok = sum(r.get("status") == "ok" for chain in series.values() for r in chain)
    total = sum(len(chain) for chain in series.values())
    header = (f"# A sequence of {len(requests)} deletion requests ({spec.source})\n\n`{command}`: {spec.method}, "
              f"{total} steps, {ok} ok, {wall:.0f} s this run. Requests: "
              f"{', '.join(r.split for r in requests.items)}. Budget per request: {spec.budget or 'the base config'} "
              f"(continue: the same epochs again on each request). General accuracy: mean lm-eval accuracy over "
              f"{spec.general_tasks or 'no task'}.")
    table = write_outputs(spec.root, before, series, header,
                          {"command": command, "config": spec.source, "method": spec.method,
                           "requests": [r.split for r in requests.items], "folds": folds, "budget": spec.budget,
                           "general_tasks": spec.general_tasks, "wall_s": round(wall, 1),
                           "conditions": conditions()}, benchmark)
    print((spec.root / "SEQUENCE.md").read_text())
    print(f"[sequence] {spec.root / 'SEQUENCE.md'}, {spec.root / 'SEQUENCE.json'}, {spec.root / 'SEQUENCE.png'}")
    return table


def stored(step: Any) -> dict[str, Any]:
    """A step's recorded result (whatever its key: ``--table-only`` redraws what was run), or a ``not run`` row."""
    from ..compare.runner import read_result

    return read_result(step.folder) or {"series": step.series, "k": step.k, "status": "missing",
                                        "error": "not run yet"}
