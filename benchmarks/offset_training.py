"""What does an offset-unlearning training step cost, next to what it is made of, and what does LoRA save?

Three models built from config with random weights (Llama-style, a BPE tokenizer trained on the bundled TOFU
text, made once in ``--model-dir``): large ``--large`` (hidden x layers, default 512 x 8), small ``--small``
(256 x 4); batches of ``--batch`` sequences of ``--seq`` tokens (random ids, every position attended, the
first quarter of each sequence a prompt without labels). Every training step is forward + loss + backward +
AdamW step + zero_grad, timed in one process, interleaved over ``--rounds`` rounds; the median of each is
used (the minimum is printed too), wall time and process CPU time. Ratios printed:

1. **cached delta step / plain step**: the ``GA`` module in offset mode with ``logit_cache: memory``, cache warm
   (the batch was seen in an earlier epoch), against a plain fine-tuning step of the small model alone (raw
   Hugging Face model, the same token-mean NLL, AdamW). Target <= 1.15.
2. **uncached delta step / sum of its parts**: the same module without the cache, against the sum of a large
   forward, a reference forward (both ``no_grad``, raw model calls) and the plain step above, each timed
   separately. Target <= 1.10.
3. **memory of the small pair, LoRA-shared reference / two full copies**: ``NPO`` in direct mode with the
   reference loaded (the small pair alone, no large model), after two training steps. Measured as the bytes
   of distinct tensors held by the module and its optimizer: parameters, buffers, gradients and AdamW state
   (activations excluded: they are the same in both). Target <= 0.55. Also printed: the weights alone, and
   each configuration's peak resident memory (``VmHWM``) in a fresh subprocess minus the process's
   resident memory just before the models are loaded (activations and the allocator's slack included), at
   the timing's batch and at batch 1 x 32 tokens (where the weights dominate).

All optimizers are AdamW at lr 1e-5 (the paper's), so a few ascent steps leave the random models sane.

    python benchmarks/offset_training.py                 # threads 2 (use when the machine is otherwise idle)
    python benchmarks/offset_training.py --threads 1 --rounds 7
    python benchmarks/offset_training.py --profile       # torch profiler of one cached and one uncached step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

LOSS_OFFSET = 4  # the first seq/4 tokens of each sequence are prompt (label -100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="runs/bench_offset", help="where the tokenizer and models are (built if missing)")
    p.add_argument("--vocab", type=int, default=32000, help="tokenizer size asked for (TOFU's text gives ~15.6k)")
    p.add_argument("--large", type=int, nargs=2, default=(512, 8), metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--small", type=int, nargs=2, default=(256, 4), metavar=("HIDDEN", "LAYERS"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the torch profiler's top operators of the delta steps")
    p.add_argument("--memory-child", choices=("full", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=1e-5, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def ensure_models(args: argparse.Namespace) -> Path:
    root = Path(args.model_dir)
    spec = {"vocab": args.vocab, "large": list(args.large), "small": list(args.small)}
    marker = root / "spec.json"
    if not marker.is_file() or json.loads(marker.read_text()) != spec:
        from lightning_unlearn.models.tiny import make_tiny_pair

        print(f"building the tokenizer and models in {root} ...", flush=True)
        make_tiny_pair(root, args.vocab, tuple(args.large), tuple(args.small))
        marker.write_text(json.dumps(spec))
    return root


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // LOSS_OFFSET] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def build_module(cls: type, root: Path, **kwargs):
    module = cls(small_model=str(root / "small"), tokenizer=str(root / "tokenizer"), **kwargs)
    module.setup("fit")
    module.configure_model()
    return module.train()


class Timer:
    """Wall and process-CPU seconds of repeated calls of several named functions, interleaved."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def run(self, name: str, fn: Callable[[], object]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.wall.setdefault(name, []).append(time.perf_counter() - wall)
        self.cpu.setdefault(name, []).append(time.process_time() - cpu)

    def median(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[name])

    def report(self, names: list[str]) -> None:
        print(f"{'':28s} {'wall median':>12s} {'wall min':>9s} {'cpu median':>11s}")
        for n in names:
            print(f"{n:28s} {self.median(n):11.3f}s {min(self.wall[n]):8.3f}s {self.median(n, cpu=True):10.3f}s")


def timing(args: argparse.Namespace, root: Path) -> dict[str, float]:
    from lightning_unlearn.losses.functional import nll_mean
    from lightning_unlearn.models.loading import load_causal_lm
    from lightning_unlearn.modules import GA

    cached = build_module(GA, root, large_model=str(root / "large"), logit_cache="memory")
    uncached = build_module(GA, root, large_model=str(root / "large"))
    vocab = cached.vocab_size
    part = make_batch(vocab, args.batch, args.seq)
    batch = {"forget": part}
    plain = load_causal_lm(str(root / "small")).train()
    optimizers = {"plain": torch.optim.AdamW(plain.parameters(), lr=args.lr)}
    for name, module in (("cached", cached), ("uncached", uncached)):
        optimizers[name] = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.lr)
    ids, mask = part["input_ids"], part["attention_mask"]

    def plain_step() -> None:
        logits = plain(input_ids=ids, attention_mask=mask, use_cache=False).logits[..., :vocab].float()
        nll_mean(logits, part["labels"]).backward()
        optimizers["plain"].step()
        optimizers["plain"].zero_grad(set_to_none=True)

    def delta_step(name: str, module) -> Callable[[], None]:
        def step() -> None:
            module.compute_losses(batch)["loss"].backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return step

    def forward(model) -> Callable[[], None]:
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    steps = {
        "plain step (small alone)": plain_step,
        "delta step, cache warm": delta_step("cached", cached),
        "delta step, no cache": delta_step("uncached", uncached),
        "large forward": torch.no_grad()(forward(uncached.large)),
        "reference forward": torch.no_grad()(forward(uncached.reference)),
    }
    timer = Timer()
    for fn in steps.values():  # warm-up; fills the cache (the first epoch)
        fn()
    assert cached.logit_cache.misses == args.batch and len(cached.logit_cache) == args.batch
    for _ in range(args.rounds):
        for name, fn in steps.items():
            timer.run(name, fn)
    assert cached.logit_cache.misses == args.batch, "the timed cached steps all hit the cache"
    timer.report(list(steps))
    out = {}
    for cpu in (False, True):
        kind = "cpu" if cpu else "wall"
        m = {n: timer.median(n, cpu) for n in steps}
        out[f"cached/plain ({kind})"] = m["delta step, cache warm"] / m["plain step (small alone)"]
        parts = m["large forward"] + m["reference forward"] + m["plain step (small alone)"]
        out[f"uncached/parts ({kind})"] = m["delta step, no cache"] / parts
    if args.profile:
        profile(steps["delta step, cache warm"], "delta step, cache warm")
        profile(steps["delta step, no cache"], "delta step, no cache")
    return out


def profile(fn: Callable[[], None], title: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {title} ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def tensor_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of distinct storages: weights (parameters + buffers), gradients, optimizer state."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    weights = count(list(module.parameters()) + list(module.buffers()))
    grads = count(p.grad for p in module.parameters() if p.grad is not None)
    state = count(v for s in optimizer.state.values() for v in s.values())
    return {"weights": weights, "grads": grads, "optimizer": state, "total": weights + grads + state}


def memory_child(args: argparse.Namespace, root: Path) -> None:
    """Load the small pair (NPO, direct mode, reference loaded), train two steps, print bytes as JSON."""
    from lightning_unlearn.modules import NPO

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start = rss()
    lora = {"lora_rank": args.lora_rank} if args.memory_child == "lora" else {}
    module = build_module(NPO, root, retain_loss="none", **lora)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=args.lr)
    batch = {"forget": make_batch(module.vocab_size, args.batch, args.seq)}
    for _ in range(2):
        module.compute_losses(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they are part of the peak
    # VmHWM, not ru_maxrss: a child started by fork + exec inherits its parent's ru_maxrss.
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    peak = int(status["VmHWM"].split()[0]) * 1024
    print(json.dumps({**tensor_bytes(module, optimizer), "peak_rss": peak - start,
                      "copies": 1 if module.reference is None else 2}))


def memory(args: argparse.Namespace, root: Path) -> dict[str, float]:
    def child(kind: str, batch: int, seq: int) -> dict[str, int]:
        command = [sys.executable, __file__, "--model-dir", str(root), "--vocab", str(args.vocab), "--large",
                   *map(str, args.large), "--small", *map(str, args.small), "--batch", str(batch), "--seq", str(seq),
                   "--threads", str(args.threads), "--lora-rank", str(args.lora_rank), "--memory-child", kind]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = {kind: child(kind, args.batch, args.seq) for kind in ("full", "lora")}
    for kind in results:
        results[kind]["peak_rss_small"] = child(kind, 1, 32)["peak_rss"]
    mib = 2**20
    print(f"{'small pair, after 2 steps':32s} {'weights':>9s} {'grads':>9s} {'AdamW':>9s} {'total':>9s} "
          f"{'peak RSS':>9s} {'(1 x 32)':>9s}")
    for kind, r in results.items():
        label = "two full copies" if kind == "full" else f"LoRA r={args.lora_rank}, one shared base"
        print(f"{label:32s} " + " ".join(f"{r[k] / mib:8.1f}M" for k in ("weights", "grads", "optimizer", "total",
                                                                            "peak_rss", "peak_rss_small")))
    full, lora = results["full"], results["lora"]
    return {"memory lora/full (weights+grads+AdamW)": lora["total"] / full["total"],
            "memory lora/full (weights only)": lora["weights"] / full["weights"],
            f"memory lora/full (peak RSS, {args.batch} x {args.seq})": lora["peak_rss"] / full["peak_rss"],
            "memory lora/full (peak RSS, 1 x 32)": lora["peak_rss_small"] / full["peak_rss_small"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    root = ensure_models(args)
    if args.memory_child:
        memory_child(args, root)
        return
    from lightning_unlearn.models.loading import load_causal_lm
    from lightning_unlearn.data.tokenizer import load_tokenizer

    sizes = {name: sum(p.numel() for p in load_causal_lm(str(root / name)).parameters()) for name in ("large", "small")}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"models: large {args.large[0]}x{args.large[1]} ({sizes['large'] / 1e6:.1f}M params, bfloat16), small "
          f"{args.small[0]}x{args.small[1]} ({sizes['small'] / 1e6:.1f}M, float32), vocab "
          f"{len(load_tokenizer(str(root / 'tokenizer')))}; batch {args.batch} x {args.seq} tokens\n")
    ratios = timing(args, root)
    if not args.skip_memory:
        print()
        ratios.update(memory(args, root))
    targets = {"cached/plain": 1.15, "uncached/parts": 1.10, "memory lora/full (weights+grads+AdamW)": 0.55}
    print()
    for name, value in ratios.items():
        target = next((t for k, t in targets.items() if name.startswith(k)), None)
        verdict = "" if target is None else f"  (target <= {target:.2f}: {'met' if value <= target else 'MISSED'})"
        print(f"{name:42s} {value:6.3f}{verdict}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
