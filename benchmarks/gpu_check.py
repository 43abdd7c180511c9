"""The GPU check (``make gpu-check``): the CUDA paths, bf16 end to end, fsdp2 on one GPU, and a throughput benchmark.

Four stages, each printed with its wall time and PASS/FAIL; the whole run is meant to take under 8 minutes on one
H100:

1. **CUDA tests**: the test suite's CUDA-only tests (``tests/unit/evaluation/test_placement.py``: the large model on
   the GPU, the module elsewhere) and the FSDP2 sharding tests (gloo processes, CPU: they check the sharding the GPU run uses).
2. **bf16 end to end**: ``fit`` then ``test`` of the tiny offset pair on the GPU with both models in bfloat16 and
   bf16-true precision; the run must finish with finite losses and an export.
3. **fsdp2 on one GPU**: the same ``fit`` under ``--trainer.strategy fsdp2`` with one device (NCCL, bf16 gathered
   layers, activation checkpointing), exporting through the gather.
4. **Benchmark** on random-weight Llama-shaped models (built from config, no download): a large model of about 1B
   parameters (hidden 2048, 16 layers) and a small pair of about 0.25B (hidden 1024, 12 layers), vocabulary 32000,
   bf16. Printed side by side, tokens per second:

   * an offset training step (large and reference forwards without gradients, the small model's forward and
     backward through ``z_L + alpha (z_S - z_S0)``, token-mean NLL, AdamW step) against a plain training step of
     the small model alone (its own logits, the same loss and optimizer): the offset's price in training;
   * offset greedy generation (three models, :func:`lightning_unlearn.offset.generation.greedy_generate`) against
     the large model alone through the same loop: the offset's price in decoding.

``--cpu-smoke`` runs stages 2 to 4 on the CPU with tiny shapes (stage 1 skipped; stage 3 under gloo) so that every
path that is not CUDA-specific is exercised where no GPU is at hand. ``--json FILE`` writes the figures.

    python benchmarks/gpu_check.py                  # on a machine with a GPU
    python benchmarks/gpu_check.py --cpu-smoke      # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def stage(name: str, results: dict[str, Any], fn: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        value = fn()
        ok = True
    except Exception as err:  # noqa: BLE001 (a report of every stage, whichever fails)
        value, ok = f"{type(err).__name__}: {err}"[:2000], False
    seconds = time.perf_counter() - start
    results[name] = {"ok": ok, "seconds": round(seconds, 1), "value": value}
    print(f"[{'PASS' if ok else 'FAIL'}] {name} ({seconds:.1f} s){'' if ok else ': ' + str(value)}", flush=True)
    if ok and value is not None:
        print(json.dumps(value, indent=2), flush=True)


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exit {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def tiny_pair(root: Path) -> dict[str, str]:
    """A BPE tokenizer on the bundled TOFU text and a tiny large/small Llama pair (as the test suite's)."""
    from lightning_unlearn.data.sources import load_split
    from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer

    rows = load_split("bundled", "forget10") + load_split("bundled", "retain90")[:800]
    tokenizer = train_tokenizer([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows], 400,
                                root / "tokenizer")
    build_tiny_llama(tokenizer, root / "large", seed=1, hidden_size=64, num_layers=2, num_heads=2)
    build_tiny_llama(tokenizer, root / "small", seed=2, hidden_size=32, num_layers=2, num_heads=2)
    return {"large": str(root / "large"), "small": str(root / "small")}


def fit_command(pair: dict[str, str], root: Path, accelerator: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_unlearn.cli", "fit", "--model", "NPO",
            "--model.small_model", pair["small"], "--model.large_model", pair["large"],
            "--model.small_dtype", "bfloat16", "--model.large_dtype", "bfloat16", "--model.export_dir",
            str(root / "export"), "--data.forget_split", "forget01", "--data.retain_split", "retain99",
            "--data.batch_size", "4", "--data.max_length", "128", "--data.evaluation", "loss",
            "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.max_steps", "4",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root), *extra]


def check_export(folder: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values()), "non-finite exported weights"
    return {"tensors": len(weights), "dtype": str(next(iter(weights.values())).dtype)}


def bf16_end_to_end(pair: dict[str, str], root: Path, accelerator: str) -> dict[str, Any]:
    run(fit_command(pair, root, accelerator, "--trainer.precision", "bf16-true"), 600)
    return check_export(root / "export")


def fsdp2_one_device(pair: dict[str, str], root: Path, accelerator: str) -> dict[str, Any]:
    run(fit_command(pair, root, accelerator, "--trainer.strategy",
                    "lightning_unlearn.distributed.strategy.FSDP2Strategy",
                    "--trainer.strategy.activation_checkpointing", "true"), 600)
    return check_export(root / "export")


def llama(hidden: int, layers: int, vocab: int, seed: int, device: str, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128) if hidden >= 128 else 2,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def benchmark(device: str, smoke: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from lightning_unlearn.offset.generation import greedy_generate, offset_components
    from lightning_unlearn.offset.logits import offset_logits

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vocab, (lh, ll), (sh, sl), batch, length, new = ((512, (64, 2), (32, 2), 2, 32, 8) if smoke else
                                                    (32000, (2048, 16), (1024, 12), 8, 512, 64))
    large, small = llama(lh, ll, vocab, 0, device, dtype), llama(sh, sl, vocab, 1, device, dtype)
    reference = llama(sh, sl, vocab, 1, device, dtype).requires_grad_(False).eval()
    large.requires_grad_(False).eval()
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in (("large", large), ("small", small))}
    ids = torch.randint(0, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    labels = ids[:, 1:]

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(step: Callable[[], None], tokens: int, repeat: int) -> float:
        step()  # warm-up (kernels, allocator)
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            step()
        sync()
        return tokens * repeat / (time.perf_counter() - start)

    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-5)

    def plain_step() -> None:
        z = small(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        F.cross_entropy(z[:, :-1].reshape(-1, vocab), labels.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def offset_step() -> None:
        with torch.no_grad():
            z_large = large(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            z_ref = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        z_small = small(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        z = offset_logits(z_small, z_large, z_ref, 1.0)
        F.cross_entropy(z[:, :-1].reshape(-1, vocab), labels.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    repeat = 2 if smoke else 5
    plain = timed(plain_step, batch * length, repeat)
    offset = timed(offset_step, batch * length, repeat)
    prompt = ids[:, : length // 4]
    prompt_mask = torch.ones_like(prompt)
    small.eval()

    def generate(components: list[Any]) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                greedy_generate(components, prompt, prompt_mask, max_new_tokens=new, eos_token_id=-1,
                                pad_token_id=0, drop_finished=False)
        return go

    alone = timed(generate([(large, 1.0)]), batch * new, repeat)
    combined = timed(generate(offset_components(large, reference, [(small, 1.0)])), batch * new, repeat)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
            "parameters": counts, "batch": batch, "length": length, "new_tokens": new,
            "train_tokens_per_s": {"plain_small_step": round(plain, 1), "offset_step": round(offset, 1),
                                   "offset_over_plain": round(offset / plain, 3)},
            "generate_tokens_per_s": {"large_alone": round(alone, 1), "offset": round(combined, 1),
                                      "offset_over_large": round(combined / alone, 3)}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="stages 2-4 on the CPU with tiny shapes")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --cpu-smoke")
    accelerator, device = ("cpu", "cpu") if args.cpu_smoke else ("gpu", "cuda")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        if not args.cpu_smoke:
            stage("cuda tests", results, lambda: run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                       "tests/unit/evaluation/test_placement.py",
                                                       "tests/unit/distributed/test_fsdp2_sharding.py"],
                                                      420)[-300:])
        pair = tiny_pair(root / "world")
        stage("bf16 end to end", results, lambda: bf16_end_to_end(pair, root / "bf16", accelerator))
        stage("fsdp2 on one device", results, lambda: fsdp2_one_device(pair, root / "fsdp2", accelerator))
        stage("benchmark", results, lambda: benchmark(device, args.cpu_smoke))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    failed = [name for name, r in results.items() if not r["ok"]]
    print("gpu check:", "all passed" if not failed else f"FAILED: {', '.join(failed)}")
    if failed:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
