"""Which evaluation batch size and token budget are fastest, and where does the evaluation's time go?

For each model directory given, builds this framework's TOFU evaluation once per setting (``eval_batch_size``
x ``eval_token_budget``; the forget01 suite of 697 samples, or the first ``--subset`` of each set) and times it
as ``test`` runs it (the test dataloader through ``TofuEvaluation.update``, then ``compute``; no Trainer start-up
and no model loading, so the settings are compared on the part they change), in interleaved rounds in one
process, one torch thread. CPU time (this process's) is reported beside wall time: on a shared machine other
jobs add wall time, not CPU time.

Each timed run is split into: generation (``generate_texts``: greedy decoding and decoding the tokens to
text), teacher-forced passes (``score_rows``: every answer variant's forward passes and the per-token
statistics), building the loader's sets (reading and tokenizing, once per run) and the rest (ROUGE,
collation, metric bookkeeping, ``compute``; torchmetrics binds ``update`` when a metric is built, so ROUGE
cannot be wrapped from outside and is counted here).

Every setting's per-sample values are checked against the first setting's: identical generations and ROUGE,
every numeric value within ``--rtol``/``--atol`` (float rounding: a row's logits do not depend on what else is
in its pass, beyond summation order).

    python benchmarks/eval_defaults.py runs/models/a128x4 runs/models/b96x3 --batch 8 16 32 64 --budget 2048
    python benchmarks/eval_defaults.py runs/models/a128x4 --batch 32 --budget 1024 2048 4096 8192 --rounds 2
    python benchmarks/eval_defaults.py runs/models/a128x4 --batch 32 --profile    # cProfile of one run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import Clock, quiet  # noqa: E402


class Stopwatch:
    """CPU seconds spent inside wrapped callables, by name (not nested: the wrapped parts do not call each other)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - start
        return timed


def build(model: str, batch: int | None, budget: int | None, subset: int | None, max_new_tokens: int):
    """The data module and module of one setting (``None``: the data module's default), as ``test`` sets them up."""
    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.modules import SFT

    dm = UnlearnDataModule(forget_split="forget01", retain_split=None, evaluation="tofu", eval_subset=subset,
                           eval_batch_size=batch, eval_token_budget=budget)
    module = SFT(small_model=model, max_new_tokens=max_new_tokens)
    module.setup("test")
    dm.connect(module.tokenizer, module.parts)
    dm.setup("test")
    module.configure_model()
    module.build_evaluation([spec.name for spec in dm.eval_specs()], "tofu", dm.eval_token_budget())
    module.eval()
    return dm, module


def run(dm: Any, module: Any, profile: bool) -> tuple[float, float, dict[str, float], dict[str, Any], str | None]:
    """One timed evaluation: wall s, CPU s, CPU s by part, the report, and the cProfile text if asked."""
    import lightning_unlearn.evaluation.tofu as tofu
    watch = Stopwatch()
    dm._eval_sets = None  # each run reads and tokenizes its sets, as a fresh ``test`` does
    saved = tofu.score_rows
    tofu.score_rows = watch.wrap("teacher-forced", saved)
    dm._eval_collections = watch.wrap("sets", dm._eval_collections)
    generate = watch.wrap("generation", module.generate_texts)
    profiler = cProfile.Profile() if profile else None
    try:
        clock = Clock()
        if profiler:
            profiler.enable()
        with torch.inference_mode():
            for batch in dm.test_dataloader()[0]:
                for part in batch["parts"]:
                    module.evaluation.update(part, module, generate)
            summary, report = module.evaluation.compute()
        if profiler:
            profiler.disable()
        wall, cpu = clock.stop()
    finally:
        tofu.score_rows = saved
        del dm._eval_collections
    module.evaluation.reset()
    parts = dict(watch.cpu)
    parts["rest"] = cpu - sum(parts.values())
    text = None
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(30)
        text = buf.getvalue()
    return wall, cpu, parts, {"summary": summary, "report": report}, text


def differences(a: dict[str, Any], b: dict[str, Any], rtol: float, atol: float) -> list[str]:
    """Per-sample differences between two reports: generations and ROUGE exactly, numbers within tolerance."""
    out = []
    for key in sorted(set(a["report"]) | set(b["report"])):
        x, y = a["report"].get(key, {}), b["report"].get(key, {})
        xs, ys = x.get("value_by_index"), y.get("value_by_index")
        if xs is None or ys is None:
            p, q = x.get("agg_value"), y.get("agg_value")
            if not (p == q or (p is not None and q is not None and math.isclose(p, q, rel_tol=rtol, abs_tol=atol))):
                out.append(f"{key}: {p} vs {q}")
            continue
        if xs.keys() != ys.keys():
            out.append(f"{key}: different samples")
            continue
        for i in xs:
            for field, v in xs[i].items():
                w = ys[i].get(field)
                if isinstance(v, float) and isinstance(w, float) and "ROUGE" not in key:
                    same = math.isclose(v, w, rel_tol=rtol, abs_tol=atol) or (math.isnan(v) and math.isnan(w))
                else:
                    same = v == w
                if not same:
                    out.append(f"{key}[{i}].{field}: {v!r} vs {w!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("models", nargs="+", help="Hugging Face model directories (with their tokenizers)")
    p.add_argument("--batch", type=int, nargs="+", default=[0],
                   help="eval_batch_size values (0: the data module's default)")
    p.add_argument("--budget", type=int, nargs="+", default=[0],
                   help="eval_token_budget values (0: the default)")
    p.add_argument("--subset", type=int, default=0, help="first N samples of each set (0: all 697)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--profile", action="store_true", help="cProfile the last round of each setting")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    quiet()

    records = []
    for model in args.models:
        settings = [(b or None, t or None) for b in args.batch for t in args.budget]
        built = {s: build(model, *s, args.subset or None, args.max_new_tokens) for s in settings}
        times: dict[Any, list[tuple[float, float, dict[str, float]]]] = {s: [] for s in settings}
        results: dict[Any, dict[str, Any]] = {}
        config = built[settings[0]][1].model.config
        print(f"\n{model}: hidden {config.hidden_size} x {config.num_hidden_layers} layers, vocabulary "
              f"{config.vocab_size}; {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}", flush=True)
        for r in range(args.rounds):
            order = settings if r % 2 == 0 else settings[::-1]
            for s in order:
                wall, cpu, parts, result, text = run(*built[s], args.profile and r == args.rounds - 1)
                times[s].append((wall, cpu, parts))
                results[s] = result
                if text:
                    print(f"--- profile, batch {s[0]}, budget {s[1]}\n{text}")
        base = settings[0]
        print(f"{'batch':>6s} {'budget':>7s} {'wall s':>8s} {'cpu s':>8s} {'spread':>13s} {'vs first':>8s}  "
              f"cpu s by part (median)")
        for s in settings:
            cpus = [t[1] for t in times[s]]
            med = statistics.median(cpus)
            parts = {k: statistics.median(t[2].get(k, 0.0) for t in times[s]) for k in times[s][0][2]}
            bad = differences(results[base], results[s], args.rtol, args.atol)
            print(f"{str(s[0] or 'dflt'):>6s} {str(s[1] or 'dflt'):>7s} {statistics.median(t[0] for t in times[s]):8.1f} "
                  f"{med:8.1f} {min(cpus):6.1f}-{max(cpus):<6.1f} "
                  f"{statistics.median(times[base][i][1] for i in range(args.rounds)) / med:7.2f}x  "
                  + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                  + (f"  <-- {len(bad)} values differ from the first setting, e.g. {bad[0]}" if bad else ""),
                  flush=True)
            records.append({"model": model, "batch": s[0], "budget": s[1], "runs": times[s], "differences": len(bad)})
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
