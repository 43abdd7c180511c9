"""Offset unlearning against a large model served by vLLM, against the same model in-process.

On the demo's quick tiny world (``python -m lightning_unlearn.demo --quick --root ROOT``: a 4 x 128 Llama with
head size 32, which vLLM's CPU attention takes, a 2 x 64 pair, a 2048-token vocabulary) the demo's offset NPO
(``configs/demo/unlearn.yaml``) trains ``--epochs`` epochs with the memory logit cache, once with the large
model in-process (float32) and once per ``k`` in ``--ks`` with it served (``--model.large_logprobs k``; ``full``
is the whole vocabulary). Per run:

* the loss of every step (the trajectory), and its largest distance from the in-process one;
* the TOFU metrics of ``main.py test`` after training (forget probability, truth ratio, ROUGE; retain ROUGE and
  model utility), the served large model answering the evaluation's log-probabilities and generations;
* each epoch's wall time: the first asks the server (or runs the large model) for every sequence, later ones
  read the cache only, so their ratio to in-process later epochs should be about 1;
* greedy offset generation speed (new tokens per second over the batch, ``--gen-prompts`` prompts).

A first epoch costs about ``k`` (the server writes ``tokens x k`` log-probabilities as JSON): ``full`` on the
2048-token world took 651 s against 36 s at k = 100 on a loaded 2-core machine.

The server runs in its own environment (``make vllm``) on ``--server-threads`` threads; this process on
``--threads``. Both share the machine's cores, so wall times are those of the two together.

    python benchmarks/served_large.py --root /tmp/bw --epochs 3 --ks 100 20 5 --eval-subset 5
    python benchmarks/served_large.py --root /tmp/bw --epochs 2 --ks full --eval-subset 2 --cache-dtype float32
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.cli import main as cli_main  # noqa: E402
from lightning_unlearn.data.formatting import PromptFormatter  # noqa: E402
from lightning_unlearn.data.sources import load_split  # noqa: E402
from lightning_unlearn.data.tofu_eval import left_pad  # noqa: E402
from lightning_unlearn.atomic import atomic_write_json  # noqa: E402
from lightning_unlearn.offset.vllm_server import VLLMServer  # noqa: E402

METRICS = ("forget_Q_A_Prob", "forget_truth_ratio", "forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "model_utility")


class Clock(L.Callback):
    """Each training epoch's wall seconds and each step's loss."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.losses.append(float(module.last_losses["loss"]))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self._start)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/demo_quick", help="the quick demo world (built with --quick if missing)")
    p.add_argument("--ks", nargs="+", default=["full", "100", "20", "5"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--server-threads", type=int, default=1)
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="logit cache storage: float16 rounds logits and log-probabilities differently (up to ~1e-2 "
                        "in a step's loss on the demo world); float32 compares the sources exactly")
    p.add_argument("--eval-subset", type=int, default=10, help="samples per TOFU evaluation set")
    p.add_argument("--gen-prompts", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--out", default="runs/served_large.json")
    return p.parse_args(argv)


def run(root: Path, large: str, k: str | None, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train, time, test and time generation with one large-model source; returns the run's record."""
    retain = root / "eval/retain/TOFU_EVAL.json"  # forget quality needs it; the other metrics do not
    argv = ["--config", str(ROOT / "configs/demo/unlearn.yaml"), "--model.large_model", large,
            "--model.small_model", f"{root}/models/small_ft", "--model.logit_cache", "memory",
            "--model.logit_cache_dtype", args.cache_dtype,
            "--model.retain_reference", str(retain) if retain.exists() else "null", "--model.max_new_tokens", "32",
            "--trainer.max_epochs", str(args.epochs), "--trainer.limit_val_batches", "0", "--trainer.callbacks", "null",
            "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(workdir),
            "--data.retain_split", "retain_perturbed[:10]", "--data.eval_subset", str(args.eval_subset),
            "--data.eval_batch_size", str(args.eval_subset)]
    if k is not None and k != "full":
        argv += ["--model.large_logprobs", k]
    cli = cli_main(argv, run=False)
    clock = Clock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    metrics = {m: float(cli.trainer.callback_metrics[f"test/{m}"]) for m in METRICS
               if f"test/{m}" in cli.trainer.callback_metrics}
    module = cli.model.eval()
    formatter = PromptFormatter(module.tokenizer)
    questions = [row["question"] for row in load_split("bundled", "forget01")[: args.gen_prompts]]
    batch = left_pad([formatter.prompt_ids(q) for q in questions], module.tokenizer.pad_token_id)
    start = time.perf_counter()
    new = module.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.gen_tokens)
    seconds = time.perf_counter() - start
    return {"epochs_s": clock.epochs, "losses": clock.losses, "metrics": metrics,
            "gen_tokens_per_s": new.numel() / seconds, "gen_tokens": new.tolist()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    root = Path(args.root)
    if not (root / "models/small_ft").exists():
        from lightning_unlearn.demo import main as demo

        demo(["--quick", "--root", str(root)])
    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(root / "models/large_ft"))
    work = Path(args.out).with_suffix("")
    results: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                               "threads": args.threads, "server_threads": args.server_threads, "runs": {}}
    server = VLLMServer(root / "models/large_ft", max_logprobs=vocab, threads=args.server_threads,
                        log=work.with_suffix(".server.log"))
    work.mkdir(parents=True, exist_ok=True)
    server.start()
    results["server_start_s"] = server.start_seconds
    try:
        for k in args.ks:
            results["runs"][f"k={k}"] = run(root, server.url, k, args, work / f"k{k}")
            results["server_rss_mib"] = server.rss_bytes() / 2**20
            atomic_write_json(args.out, results)
    finally:
        server.stop()
    # peak resident memory of this process: with the large model served, then (run last) in-process as well
    results["trainer_peak_rss_mib_served"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["runs"] = {"in-process": run(root, str(root / "models/large_ft"), None, args, work / "local"),
                       **results["runs"]}
    results["trainer_peak_rss_mib_in_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(results)
    atomic_write_json(args.out, results)
    return results


def report(results: dict[str, Any]) -> None:
    base = results["runs"]["in-process"]
    print(f"\n{results['machine']}; trainer {results['threads']} thread(s), server {results['server_threads']}; "
          f"server start {results['server_start_s']:.0f} s; resident memory: server {results['server_rss_mib']:.0f} MiB, "
          f"trainer peak {results['trainer_peak_rss_mib_served']:.0f} MiB with the large model served, "
          f"{results['trainer_peak_rss_mib_in_process']:.0f} MiB after the in-process run")
    header = ["run", *METRICS, "max |dloss|", "epoch 1 s", "later s", "later/in-proc", "gen tok/s", "same tokens"]
    print(" | ".join(header))
    later_base = sum(base["epochs_s"][1:]) / max(1, len(base["epochs_s"]) - 1)
    for name, r in results["runs"].items():
        later = sum(r["epochs_s"][1:]) / max(1, len(r["epochs_s"]) - 1)
        dloss = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        cells = [name, *(f"{r['metrics'].get(m, float('nan')):.4f}" for m in METRICS), f"{dloss:.2e}",
                 f"{r['epochs_s'][0]:.1f}", f"{later:.1f}", f"{later / later_base:.2f}", f"{r['gen_tokens_per_s']:.1f}",
                 str(r["gen_tokens"] == base["gen_tokens"])]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
