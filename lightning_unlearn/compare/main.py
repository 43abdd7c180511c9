"""``python -m lightning_unlearn.compare``: build the world if asked, print the memory plans, run the cells,
write the table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..models import memory
from .runner import in_process, in_subprocess, run_cells
from .spec import CONFIGS, MODES, CompareSpec
from .table import write_outputs

WORLDS = {"tiny": CONFIGS / "tiny.yaml"}
"""``--world NAME``: the compare config of an embedded world."""


def build_world(spec: CompareSpec, seed: int, force: bool) -> str:
    """Build (or reuse) the demo's quick tiny world under ``<output>/world``: the stages of ``demo --quick``
    up to the evaluation of the fine-tuned and retain models. Returns the stages' keys, which every cell's
    key includes (a rebuilt world reruns the cells)."""
    from ..demo import quiet_console, run_stage, stages

    if spec.world != "tiny":
        raise ValueError(f"{spec.source}: world {spec.world!r} is not known; use 'tiny' or null (models given).")
    upstream: dict[str, str] = {}
    with quiet_console():
        for stage in stages(spec.world_root, "NPO", (128, 4), (64, 2), None, quick=True, seed=seed):
            if stage.name not in ("unlearn", "eval_unlearned"):  # the world, not the demo's own unlearning
                run_stage(stage, upstream, force)
    return json.dumps(upstream, sort_keys=True)


def check_general_tasks(spec: CompareSpec) -> None:
    """Load the ``general_tasks`` with their data before the world or any cell is trained, so that a task that is
    unknown, or whose data is not on this machine (offline), stops the comparison at once instead of failing
    every cell's test after its training.

    Raises:
        ValueError: an unknown task. FileNotFoundError: a task's data is missing (the message says what to do).
    """
    if spec.general_tasks:
        from ..harness.hooks import LmEvalSettings, task_metrics

        task_metrics(LmEvalSettings(tuple(spec.general_tasks)))


def plan_memory(spec: CompareSpec) -> None:
    """Print the memory plan of each mode's training from the base config (before any weight is loaded) and
    stop if one cannot fit (:func:`lightning_unlearn.models.memory.report`)."""
    base = yaml.safe_load(Path(spec.config).read_text()) or {}
    init = (base.get("model") or {}).get("init_args") or {}
    data = base.get("data") or {}
    accelerator = (base.get("trainer") or {}).get("accelerator", "auto")
    device = "cuda:0" if accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    modes = {mode for opts in spec.methods.values() for mode in opts.get("modes", MODES) if "config" not in opts}
    for mode in (m for m in MODES if m in modes):
        models = {k: spec.fill(v) for k, v in (spec.offset if mode == "offset" else spec.direct).items()}
        print(f"[compare] {mode} mode:")
        memory.report({"hparams": {**init, **models}, "stage": "fit",
                       "batch_size": spec.budget.get("batch_size", data.get("batch_size", 8)),
                       "max_length": data.get("max_length", 512), "parts": 2, "device": device})


def references(spec: CompareSpec) -> dict[str, dict[str, Any]]:
    """TOFU summaries of the world's fine-tuned and retain models (reference rows), where they exist."""
    found = {}
    for name, folder in (("fine-tuned", "finetuned"), ("retain model", "retain")):
        path = spec.world_root / "eval" / folder / "TOFU_SUMMARY.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def conditions() -> dict[str, Any]:
    """Where the table was made: threads, cores, load, versions."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_1min_at_end": load,
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", choices=sorted(WORLDS), help="an embedded world (tiny: the demo's quick world)")
    source.add_argument("--config", help="a compare config (configs/compare/*.yaml)")
    parser.add_argument("--methods", nargs="+", help="only these methods ('all': every registered loss)")
    parser.add_argument("--output", help="folder of the cells and the table (default: the config's output)")
    parser.add_argument("--world-folder", help="where the tiny world is built or reused (default: OUTPUT/world)")
    parser.add_argument("--epochs", type=int, help="override the budget's max_epochs (both modes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny world")
    parser.add_argument("--force", action="store_true", help="rerun cells that are done")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each command as its own process (real models: device memory freed between cells)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    spec = CompareSpec.load(WORLDS[args.world] if args.world else args.config)
    spec.select(args.methods)
    if args.output:
        spec.output = args.output
    if args.world_folder:
        spec.world_folder = args.world_folder
    if args.epochs:
        spec.budget["max_epochs"] = args.epochs
    start = time.perf_counter()
    check_general_tasks(spec)
    upstream = build_world(spec, args.seed, args.force) if spec.world else ""
    plan_memory(spec)
    cells = spec.cells()
    print(f"[compare] {len(cells)} cells: {', '.join(c.name for c in cells)}")
    results = run_cells(cells, upstream, in_subprocess if args.subprocess else in_process, args.force,
                        progress=not args.no_progress)
    command = "python -m lightning_unlearn.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    wall = time.perf_counter() - start
    header = (f"# Offset vs direct unlearning ({spec.source})\n\n`{command}`: {len(cells)} cells, "
              f"{sum(r.get('status') == 'ok' for r in results)} ok, {wall:.0f} s this run "
              f"({torch.get_num_threads()} threads). Budget, the same for both modes of a method: "
              f"{spec.budget or 'the base config'}; the final epoch is evaluated. General accuracy: mean lm-eval "
              f"accuracy (acc_norm where a task has it) over {spec.general_tasks or 'no task (general_tasks is empty)'}.")
    table = write_outputs(spec.root, results, references(spec), header,
                          {"command": command, "config": spec.source, "budget": spec.budget,
                           "general_tasks": spec.general_tasks, "wall_s": round(wall, 1),
                           "conditions": conditions()})
    print((spec.root / "COMPARE.md").read_text())
    print(f"[compare] {spec.root / 'COMPARE.md'}, {spec.root / 'COMPARE.json'}, {spec.root / 'COMPARE.png'}")
    return table
