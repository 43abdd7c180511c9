"""How fast is the TOFU evaluation, compared with the straightforward way of computing the same numbers?

Evaluates ONE tiny model on the bundled TOFU evaluation sets (forget01_perturbed, retain_perturbed,
real_authors_perturbed, world_facts_perturbed, holdout01; the first ``--subset`` samples of each) twice:

(a) straightforward: per sample, one Hugging Face ``model.generate`` call (batch of 1, greedy, stop at EOS)
    for ROUGE, and one separate teacher-forced forward pass (batch of 1) per metric: probability, truth
    ratio (correct answer + each perturbed answer), exact memorization, extraction strength, each of the
    four MIA scores, normalised probability. No pass is shared between metrics. The numbers come from
    ``lightning_unlearn.metrics.functional``.
(b) the framework: ``UnlearnDataModule(evaluation="tofu")`` + ``GA`` module (setup, configure_model,
    build_evaluation), then the test dataloader is iterated and every part goes to
    ``module.evaluation.update(part, module, module.generate_texts)`` exactly as ``_eval_step`` does, under
    ``torch.inference_mode`` and in eval mode as Lightning's test loop runs it, followed by
    ``evaluation.compute()``. No Trainer is built, so Lightning's start-up is not in the timing
    (``--trainer`` additionally times a full in-process ``trainer.test``).

Both timings include tokenization (of the same prompts) and exclude model loading; (a) and (b) run
interleaved ``--repeats`` times and the fastest of each is reported (wall and process CPU time). (b) runs
at each ``--eval-batch-size`` (8 is what the data module uses by default). The script then checks that (a)
and (b) give the same numbers: every per-sample value within float tolerance, generations identical,
ROUGE identical (up to the float32 in which ``RougeLRecall`` stores it), and the aggregates. With a model
of random weights (the default: ``python -m lightning_unlearn.models.tiny``) generations rarely hit EOS, so
both sides generate ``--max-new-tokens`` tokens per prompt; this favours neither side much.

Offset mode (large + small + frozen reference) is timed for (b) only: Hugging Face ``generate`` cannot
combine three models, so there is no straightforward (a) to compare with.

    python benchmarks/eval_speed.py --threads 1          # ~2 min on 2 cores
    python benchmarks/eval_speed.py --subset 40 --eval-batch-size 8 --repeats 1 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import platform
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch


class Clock:
    """Wall time and this process's CPU time (all threads): CPU time is less disturbed by other jobs."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


SETS = ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed", "holdout01")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="runs/bench_tiny",
                   help="folder of `python -m lightning_unlearn.models.tiny` (built there if missing)")
    p.add_argument("--model", choices=("large", "small"), default="large",
                   help="which tiny model is evaluated in direct mode (large: 128 hidden x 4 layers)")
    p.add_argument("--subset", type=int, default=16, help="first N samples of each set (0: all 697)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="generation length (the module's default)")
    p.add_argument("--eval-batch-size", type=int, nargs="+", default=[8, 32],
                   help="(b)'s eval batch size(s); 8 is the data module's default (eval_batch_size null: batch_size)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of (a) and (b); the fastest is reported")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-offset", action="store_true", help="skip timing (b) in offset mode")
    p.add_argument("--trainer", action="store_true", help="also time (b) as a full in-process trainer.test")
    p.add_argument("--profile", action="store_true", help="cProfile (b) and print the top functions")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--atol", type=float, default=1e-6)
    return p.parse_args(argv)


def quiet() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def ensure_models(model_dir: str) -> Path:
    root = Path(model_dir)
    if not (root / "large" / "config.json").is_file() or not (root / "small" / "config.json").is_file():
        from lightning_unlearn.models.tiny import make_tiny_pair

        print(f"building tiny models (random weights) in {root}")
        make_tiny_pair(root)
    return root


# --- (a) the straightforward way -------------------------------------------------------------------------


def run_straightforward(model_path: str, specs: list, subset: int | None, max_new_tokens: int,
                        min_k: float) -> tuple[tuple[float, float], dict[str, Any]]:
    """Per-sample generate + one forward pass per metric; returns (seconds, results)."""
    from lightning_unlearn.data.formatting import PromptFormatter
    from lightning_unlearn.data.sources import load_split
    from lightning_unlearn.metrics import functional as F
    from lightning_unlearn.models.loading import load_causal_lm
    from lightning_unlearn.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, "float32").eval()
    vocab = len(tokenizer)
    records = {spec.name: load_split("bundled", spec.split)[:subset] if subset else load_split("bundled", spec.split)
               for spec in specs}

    def stats_of(formatter: PromptFormatter, question: str, answer: str, trim: bool = False):
        """Tokenize, run ONE teacher-forced pass, return (logits, labels)."""
        enc = formatter.encode(question, answer)
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([enc.labels])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[..., :vocab].float()
        return logits, (F.drop_last_answer_token(labels) if trim else labels)

    def mean_nll(formatter, question, answer) -> torch.Tensor:
        return F.answer_token_stats(*stats_of(formatter, question, answer)).mean_nll

    per: dict[str, dict[str, list]] = {}
    clock = Clock()
    with torch.inference_mode():
        formatter = PromptFormatter(tokenizer)  # the data module's defaults: max_length 512, plain template
        for spec in specs:
            out = per.setdefault(spec.name, {})
            for record in records[spec.name]:
                q, a = record["question"], record["answer"]
                if spec.name != "holdout":
                    out.setdefault("prob", []).append(float(torch.exp(-mean_nll(formatter, q, a).double())))
                    correct = mean_nll(formatter, q, record[spec.correct_key])
                    wrong = torch.stack([mean_nll(formatter, q, w) for w in record[spec.perturbed_key]], dim=-1)
                    out.setdefault("truth", []).append(
                        float(F.truth_ratio(correct.double(), wrong.double())))
                    prompt = torch.tensor([formatter.prompt_ids(q)])
                    new = model.generate(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=1,
                        max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                    )[0, prompt.shape[1]:]
                    text = tokenizer.decode(new, skip_special_tokens=True).strip()
                    out.setdefault("new_tokens", []).append(len(new))
                    out.setdefault("stopped", []).append(bool((new == tokenizer.eos_token_id).any()))
                    out.setdefault("generation", []).append(text)
                    out.setdefault("rouge", []).append(F.rouge_l_recall([text], [a])[0])
                if spec.name in ("ra", "wf"):
                    p_true = torch.exp(-mean_nll(formatter, q, a).double())
                    p_wrong = torch.exp(-torch.stack(
                        [mean_nll(formatter, q, w) for w in record[spec.perturbed_key]], dim=-1).double())
                    out.setdefault("prob_norm", []).append(float(F.normalised_probability(p_true, p_wrong)))
                if spec.name == "forget":
                    out.setdefault("em", []).append(float(F.exact_memorization(*stats_of(formatter, q, a, trim=True))))
                    out.setdefault("es", []).append(float(F.extraction_strength(*stats_of(formatter, q, a, trim=True))))
                if spec.name in ("forget", "holdout"):
                    out.setdefault("mia_loss", []).append(float(mean_nll(formatter, q, a)))
                    out.setdefault("mia_zlib", []).append(float(F.zlib_score(mean_nll(formatter, q, a), [a])))
                    s = F.answer_token_stats(*stats_of(formatter, q, a, trim=True))
                    out.setdefault("mia_min_k", []).append(float(F.min_k_score(s.token_logprobs, s.mask, min_k)))
                    out.setdefault("mia_min_k_plus_plus", []).append(
                        float(F.min_k_plus_plus_score(*stats_of(formatter, q, a, trim=True), min_k)))
        summary = aggregate(per)
    return clock.stop(), {"per": per, "summary": summary}


def aggregate(per: dict[str, dict[str, list]]) -> dict[str, float | None]:
    """The summary numbers of ``TofuEvaluation.compute`` from per-sample lists."""
    from lightning_unlearn.evaluation.tofu import PROB_NAME, TRUTH_NAME
    from lightning_unlearn.metrics import functional as F

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary: dict[str, float | None] = {}
    for name, m in per.items():
        if "prob" in m:
            summary[PROB_NAME[name]] = mean(m["prob"])
            ratios = torch.tensor(m["truth"], dtype=torch.float64)
            agg = F.truth_ratio_forget if name == "forget" else F.truth_ratio_true_better
            summary[TRUTH_NAME[name]] = float(agg(ratios))
            summary[f"{name}_Q_A_ROUGE"] = mean(m["rouge"])
        if "prob_norm" in m:
            summary[f"{name}_Q_A_Prob_normalised"] = mean(m["prob_norm"])
        if name == "forget":
            summary["exact_memorization"] = mean(m["em"])
            summary["extraction_strength"] = mean(m["es"])
    if "forget" in per and "holdout" in per:
        for key in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
            summary[key] = F.mia_auc(per["forget"][key], per["holdout"][key])
    try:
        summary["model_utility"] = F.model_utility(summary)  # type: ignore[arg-type]
    except (KeyError, ValueError):
        summary["model_utility"] = None
    return summary


# --- (b) the framework -----------------------------------------------------------------------------------


def build_framework(small: str, large: str | None, subset: int | None, batch_size: int, max_new_tokens: int):
    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.modules import GA

    dm = UnlearnDataModule(forget_split="forget01", retain_split="retain99", evaluation="tofu",
                           eval_subset=subset, eval_batch_size=batch_size)
    module = GA(small_model=small, large_model=large, large_dtype="float32", max_new_tokens=max_new_tokens)
    module.setup("test")  # loads the tokenizer; without a trainer it cannot reach the data module itself
    dm.connect(module.tokenizer, module.parts)
    dm.setup("test")
    module.configure_model()
    module.build_evaluation([spec.name for spec in dm.eval_specs()], "tofu", dm.eval_token_budget())
    module.eval()  # as Lightning's test loop does
    return dm, module


def run_framework(dm, module, profile: bool = False) -> tuple[tuple[float, float], dict[str, Any], str | None]:
    """Iterate the test dataloader through ``evaluation.update`` as ``_eval_step`` does, then compute."""
    profiler = cProfile.Profile() if profile else None
    clock = Clock()
    if profiler:
        profiler.enable()
    with torch.inference_mode():
        loader = dm.test_dataloader()[0]
        generate = module.generate_texts if module.hparams.max_new_tokens > 0 else None
        for batch in loader:
            for part in batch["parts"]:
                module.evaluation.update(part, module, generate).mean()
        summary, report = module.evaluation.compute()
    if profiler:
        profiler.disable()
    seconds = clock.stop()
    mia = {key: (metric.per_sample().tolist(), metric.holdout_mask().tolist())
           for key, metric in module.evaluation.mia.items()}
    prof_text = None
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
        buf.write("\n--- by own time ---\n")
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
        prof_text = buf.getvalue()
    return seconds, {"summary": summary, "report": report, "mia": mia}, prof_text


def run_trainer(small: str, large: str | None, subset: int | None, batch_size: int,
                max_new_tokens: int) -> tuple[float, float]:
    """Full ``trainer.test`` in-process (logger off), module construction and model loading included."""
    import contextlib

    import lightning as L

    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.modules import GA

    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        dm = UnlearnDataModule(forget_split="forget01", retain_split="retain99", evaluation="tofu",
                               eval_subset=subset, eval_batch_size=batch_size)
        module = GA(small_model=small, large_model=large, large_dtype="float32", max_new_tokens=max_new_tokens)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.test(module, datamodule=dm, verbose=False)
        return clock.stop()


# --- comparison ------------------------------------------------------------------------------------------


def compare(a: dict[str, Any], b: dict[str, Any], rtol: float, atol: float) -> list[str]:
    """Differences between (a) and (b); empty when they agree."""
    from lightning_unlearn.evaluation.tofu import PROB_NAME, TRUTH_NAME

    problems: list[str] = []
    report = b["report"]

    def close(x: float | None, y: float | None) -> bool:
        if x is None or y is None:
            return x is None and y is None
        if math.isnan(x) or math.isnan(y):
            return math.isnan(x) and math.isnan(y)
        return math.isclose(x, y, rel_tol=rtol, abs_tol=atol)

    def as_float32(x: float) -> float:
        return float(torch.tensor(x, dtype=torch.float32))

    def per_sample(key: str, field: str, values: list, exact: bool = False) -> None:
        """``exact``: equal (ROUGE compared after rounding (a) to float32, as RougeLRecall stores it)."""
        got = report.get(key, {}).get("value_by_index", {})
        if len(got) != len(values):
            problems.append(f"{key}: {len(got)} samples in (b), {len(values)} in (a)")
            return

        def same(v: Any, w: Any) -> bool:
            if not exact:
                return close(w, v)
            return w == v or (isinstance(v, float) and w == as_float32(v))

        bad = [i for i, v in enumerate(values) if not same(v, got[str(i)][field])]
        if bad:
            i = bad[0]
            problems.append(f"{key}: {len(bad)}/{len(values)} samples differ, e.g. #{i}: (a) {values[i]!r} (b) "
                            f"{got[str(i)][field]!r}")

    for name, m in a["per"].items():
        if "prob" in m:
            per_sample(PROB_NAME[name], "prob", m["prob"])
            per_sample(TRUTH_NAME[name], "score", m["truth"])
            per_sample(f"{name}_Q_A_ROUGE", "generation", m["generation"], exact=True)
            per_sample(f"{name}_Q_A_ROUGE", "rougeL_recall", m["rouge"], exact=True)
        if "prob_norm" in m:
            per_sample(f"{name}_Q_A_Prob_normalised", "prob", m["prob_norm"])
        if name == "forget":
            per_sample("exact_memorization", "score", m["em"])
            per_sample("extraction_strength", "score", m["es"])
    if "forget" in a["per"] and "holdout" in a["per"]:
        for key, (scores, holdout) in b["mia"].items():
            expected = a["per"]["forget"][key] + a["per"]["holdout"][key]
            if holdout != [False] * len(a["per"]["forget"][key]) + [True] * len(a["per"]["holdout"][key]):
                problems.append(f"{key}: forget/holdout order differs")
            elif not all(close(x, y) for x, y in zip(scores, expected)) or len(scores) != len(expected):
                problems.append(f"{key}: per-sample scores differ")
    for key, value in a["summary"].items():
        if not close(value, b["summary"].get(key)) and not (
                key.endswith("_ROUGE") and math.isclose(value, b["summary"].get(key) or math.nan, rel_tol=1e-6)):
            problems.append(f"summary {key}: (a) {value} (b) {b['summary'].get(key)}")
    return problems


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:8.2f} s wall {t[1]:8.2f} s cpu"


# --- main ------------------------------------------------------------------------------------------------


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Fastest of the repeats (wall and CPU separately): other jobs on a shared machine only ever add time."""
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.evaluation.tofu import TofuEvaluation

    root = ensure_models(args.model_dir)
    model_path = str(root / args.model)
    subset = args.subset or None
    specs = UnlearnDataModule(forget_split="forget01", evaluation="tofu").eval_specs()
    n_samples = sum(min(subset or 10**9, n) for n in (40, 400, 100, 117, 40))
    sizes = args.eval_batch_size

    print("== TOFU evaluation speed: straightforward (a) vs lightning-unlearn (b) ==")
    print(f"machine : {platform.machine()} {platform.processor() or ''}".rstrip()
          + f", os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"torch {torch.__version__}, python {platform.python_version()}, load avg at start "
          f"{os.getloadavg()[0]:.2f}")
    print(f"settings: model={model_path} (random weights, float32), sets={', '.join(SETS)}, "
          f"subset={subset or 'all'} per set ({n_samples} samples), max_new_tokens={args.max_new_tokens}, "
          f"(b) eval_batch_size={' and '.join(map(str, sizes))}, min_k={TofuEvaluation(['forget']).min_k}, "
          f"best of {args.repeats} interleaved repeats")
    load = os.getloadavg()[0]
    if args.threads > 1 and load > 0.5:
        print(f"note    : load average {load:.2f}: other jobs are running. With --threads {args.threads} they can make "
              "a run 10x slower (OpenMP threads wait for each other); --threads 1 is steadier on a shared machine.")
    print("(b) timing: dataloader (tokenization+collate) -> TofuEvaluation.update per part -> compute, as "
          "_eval_step under inference_mode; no Trainer; model loading excluded on both sides")
    sys.stdout.flush()

    built = {bs: build_framework(model_path, None, subset, bs, args.max_new_tokens) for bs in sizes}
    runs_a: list[tuple[float, float]] = []
    runs_b: dict[int, list[tuple[float, float]]] = {bs: [] for bs in sizes}
    res_b: dict[int, dict[str, Any]] = {}
    for _ in range(args.repeats):
        for bs, (dm, module) in built.items():
            module.evaluation.reset()
            t, res_b[bs], _ = run_framework(dm, module)
            runs_b[bs].append(t)
        t, res_a = run_straightforward(model_path, specs, subset, args.max_new_tokens,
                                       built[sizes[0]][1].evaluation.min_k)
        runs_a.append(t)
    t_a = best(runs_a)
    print(f"(a) straightforward, direct mode          : {fmt(t_a)}")
    for bs in sizes:
        t_b = best(runs_b[bs])
        print(f"(b) framework, direct, eval_batch_size={bs:<3d}: {fmt(t_b)}   ratio a/b {t_a[0] / t_b[0]:5.2f} x wall "
              f"{t_a[1] / t_b[1]:5.2f} x cpu")
    if args.repeats > 1:
        walls = lambda runs: ", ".join(f"{w:.2f}" for w, _ in runs)  # noqa: E731
        print(f"          all wall times: (a) {walls(runs_a)}; "
              + "; ".join(f"(b) bs={bs} {walls(runs_b[bs])}" for bs in sizes))
    sys.stdout.flush()

    failed = False
    for bs in sizes:
        problems = compare(res_a, res_b[bs], args.rtol, args.atol)
        failed |= bool(problems)
        if problems:
            print(f"CHECK FAILED (eval_batch_size={bs}): (a) and (b) differ ({len(problems)} problems):")
            for line in problems:
                print("   ", line)
        else:
            print(f"check   : eval_batch_size={bs}: same numbers as (a) - every per-sample value (rtol={args.rtol}, "
                  f"atol={args.atol}), generations and ROUGE identical, {len(res_a['summary'])} aggregates incl. "
                  "4 MIA AUCs and model_utility")
    lengths = [n for m in res_a["per"].values() for n in m.get("new_tokens", [])]
    stopped = sum(1 for m in res_a["per"].values() for e in m.get("stopped", []) if e)
    print(f"          generations: {len(lengths)}, {stopped} stopped at EOS, mean {sum(lengths) / len(lengths):.0f} "
          f"new tokens")

    if not args.no_offset:
        for bs in sizes:
            dm_o, module_o = build_framework(str(root / "small"), str(root / "large"), subset, bs, args.max_new_tokens)
            t_o = best([run_framework(dm_o, module_o)[0] for _ in range(1)])
            print(f"(b) framework, OFFSET, eval_batch_size={bs:<3d}: {fmt(t_o)}   (large + small + frozen reference, "
                  "one KV cache each; run once; no (a): HF generate cannot combine models)")
    if args.trainer:
        t_t = run_trainer(model_path, None, subset, sizes[0], args.max_new_tokens)
        print(f"(b) as trainer.test, direct, bs={sizes[0]:<3d}    : {fmt(t_t)}   (incl. Trainer start-up and model "
              f"loading; a/that {t_a[0] / t_t[0]:.2f} x wall)")
    if args.profile:
        dm, module = built[sizes[0]]
        module.evaluation.reset()
        _, _, prof = run_framework(dm, module, profile=True)
        print(f"\n== cProfile of (b), direct mode, eval_batch_size={sizes[0]} ==")
        print(prof)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
