"""Where the time of one ``main.py test`` goes: importing, parsing, the Trainer, loading, data, the loop, the end.

Runs ``python main.py test ARGS`` in fresh processes (a cold start every time, as a user's command) with a
thin timing layer: each phase below is the process CPU time (all threads) spent inside the named calls, so
that other jobs on a shared machine disturb it less than wall time; the wall time of the whole process is
given too. Several code trees (``--tree``: a checkout's root, e.g. the code before and after a change) run
interleaved, ``--repeats`` rounds, and each phase's median is reported.

Phases (inclusive of what they call; ``other`` is the rest of the process's CPU time: interpreter start,
Lightning's own loop machinery, exit):

* ``import``: ``import lightning_unlearn.cli``.
* ``parse``: ``main()`` up to the classes' instantiation: building the parser (jsonargparse reads every
  loss class's signature) and parsing the command line.
* ``instantiate``: ``LightningCLI.instantiate_classes``: the Trainer, the module's and the data module's
  ``__init__`` (``trainer`` is the Trainer's share of it).
* ``setup``: the module's ``setup`` (tokenizers, the data module's splits, the metric objects) and the data
  module's ``setup``.
* ``load``: ``configure_model`` (model weights).
* ``loaders``: building the test loaders (reading the evaluation sets).
* ``steps``: the test steps (teacher-forced passes, generation, per-sample metrics; batch collation and
  item tokenisation run in the loader, which ``other`` holds).
* ``end``: ``on_test_epoch_end`` (aggregates, report files, the printed table).

    python benchmarks/startup.py --tree /path/before --tree . --repeats 3 -- \\
        --config configs/demo/eval.yaml --model.small_model runs/tiny/large --data.lm_eval_tasks '[]'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("import", "parse", "instantiate", "trainer", "setup", "load", "loaders", "steps", "end", "other")

# Runs inside the measured process: wraps the phase calls, then runs the command line.
CHILD = r"""
import json, sys, time
spent = {}
def clock(name, owner, attr):
    inner = getattr(owner, attr)
    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.process_time() - start
    setattr(owner, attr, timed)
start = time.process_time()
import lightning_unlearn.cli as cli
spent["import"] = time.process_time() - start
from lightning.pytorch.cli import LightningCLI
from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.modules import UnlearnModule
main_start = time.process_time()
instantiate_start = []
inner_instantiate = LightningCLI.instantiate_classes
def instantiate(self):
    instantiate_start.append(time.process_time())
    return inner_instantiate(self)
LightningCLI.instantiate_classes = instantiate
clock("instantiate", LightningCLI, "instantiate_classes")
clock("trainer", LightningCLI, "_instantiate_trainer")
clock("setup", UnlearnModule, "setup")
clock("setup", UnlearnDataModule, "setup")
clock("load", UnlearnModule, "configure_model")
clock("loaders", UnlearnDataModule, "test_dataloader")
clock("steps", UnlearnModule, "test_step")
clock("end", UnlearnModule, "on_test_epoch_end")
out = sys.argv[1]
sys.argv = [sys.argv[0], *sys.argv[2:]]
cli.main()  # as from the command line
spent["parse"] = instantiate_start[0] - main_start
spent["total_cpu"] = time.process_time()
with open(out, "w") as f:
    json.dump(spent, f)
"""


def run_once(tree: Path, args: list[str], threads: int) -> dict[str, float]:
    """One cold ``main.py test`` in ``tree``: CPU seconds per phase, ``wall`` and ``total_cpu``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phases.json"
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-c", CHILD, str(out), "test", *args,
                   "--trainer.default_root_dir", str(Path(tmp) / "run")]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"main.py test failed in {tree}:\n{done.stderr[-3000:]}")
        spent = json.loads(out.read_text())
    spent["wall"] = wall
    spent["instantiate"] = spent.get("instantiate", 0.0) - spent.get("trainer", 0.0)  # the Trainer on its own row
    spent["other"] = spent["total_cpu"] - sum(spent.get(p, 0.0) for p in PHASES if p != "other")
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, help="a checkout's root (repeat to compare)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every run's phases here")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="after --: the arguments of main.py test")
    options = parser.parse_args()
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    trees = [Path(t).resolve() for t in options.tree]
    runs: dict[str, list[dict[str, float]]] = {str(t): [] for t in trees}
    for repeat in range(options.repeats):
        for tree in trees:
            runs[str(tree)].append(run_once(tree, args, options.threads))
            print(f"round {repeat + 1} {tree}: wall {runs[str(tree)][-1]['wall']:.1f} s", file=sys.stderr)
    rows = (*PHASES, "total_cpu", "wall")
    print("| phase (median s) | " + " | ".join(Path(t).name for t in runs) + " |")
    print("| --- |" + " --- |" * len(runs))
    for row in rows:
        print(f"| {row} | " + " | ".join(f"{statistics.median(r.get(row, 0.0) for r in tree_runs):.2f}"
                                       for tree_runs in runs.values()) + " |")
    if options.json:
        options.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
