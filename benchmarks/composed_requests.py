"""The cost of composing K deletion requests' offsets, against the single-request model.

After K requests the ``compose`` strategy of ``lightning-unlearn sequence`` serves
``z_L + sum_{i<=K} alpha_i (z_S_i - z_S0)``. With full-model offsets that is K small models beside ``L`` and
``S0``; with LoRA offsets (``--model.lora_rank``) the K adapters sit on the one reference model
(:func:`lightning_unlearn.deploy.unlearned._load_offsets`), so memory stays about one small model, but each
adapter is still one forward pass of the small model. For K = 1, 2, 4, 8 this loads K offset exports of each kind
with :meth:`~lightning_unlearn.deploy.unlearned.UnlearnedModel.from_export`, as ``generate`` and ``lm-eval`` do,
and prints, against the single-request model of the same kind:

* the memory of the loaded weights (every parameter and buffer counted once, the large model included);
* the time of one teacher-forced forward pass (the combined logits of a ``--batch`` x ``--length`` batch, the
  median of ``--repeats``) and of greedy generation of ``--new-tokens`` tokens.

The exports are written by hand in the layout ``fit --model.export_dir`` writes (a model or a peft adapter, the
tokenizer, ``offset.json``), from random tiny Llama models of the sizes given (the cost does not depend on what the
weights learned). The large model should be much larger than the small one, as in practice (13B with a 7B pair
in the paper, 8B with 1B in configs/compare/tofu_llama3.yaml): the default is about 8x in parameters.

    python benchmarks/composed_requests.py                   # K = 1 2 4 8, both kinds
    python benchmarks/composed_requests.py --ks 1 8 --large 512 8 --small 256 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lightning_unlearn.data.sources import load_split
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.models.lora import add_lora
from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer


def write_exports(root: Path, k: int, kind: str, large: str, small: str, tokenizer, rank: int) -> list[str]:
    """K offset exports against ``large`` and reference ``small``: perturbed copies (full) or random adapters."""
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(k):
        folder = root / f"{kind}-{i}"
        if not folder.exists():
            model = AutoModelForCausalLM.from_pretrained(small)
            torch.manual_seed(i)
            if kind == "full":
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 1e-3)
                model.save_pretrained(folder)
            else:
                peft = add_lora(model, rank, base_model_name=small)
                with torch.no_grad():
                    for name, p in peft.named_parameters():
                        if "lora_B" in name:
                            p.normal_(0, 1e-3)
                peft.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            manifest = {"large_model": os.path.abspath(large), "reference_model": os.path.abspath(small),
                        "alpha": 1.0, "method": "NPO", "large_dtype": "float32", "small_dtype": "float32"}
            if kind == "lora":
                manifest["adapter"] = "lora"
            (folder / "offset.json").write_text(json.dumps(manifest))
        out.append(str(folder))
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (shared ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--large", type=int, nargs=2, default=[384, 6], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--small", type=int, nargs=2, default=[192, 3], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapter offsets")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", help="folder for the models and exports (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root or tempfile.mkdtemp(prefix="composed_requests_"))
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in load_split("bundled", "forget10")]
    tokenizer = train_tokenizer(texts, vocab_size=2048, out_dir=root / "tokenizer")
    large, small = root / "large", root / "small"
    if not large.exists():
        build_tiny_llama(tokenizer, large, seed=1, hidden_size=args.large[0], num_layers=args.large[1],
                         num_heads=args.large[0] // 32)
        build_tiny_llama(tokenizer, small, seed=2, hidden_size=args.small[0], num_layers=args.small[1],
                         num_heads=args.small[0] // 32)
    ids = torch.randint(3, len(tokenizer), (args.batch, args.length))
    mask = torch.ones_like(ids)
    prompt = ids[:, :16], mask[:, :16]
    rows = []
    for kind in ("full", "lora"):
        for k in args.ks:
            model = UnlearnedModel.from_export(write_exports(root, k, kind, str(large), str(small), tokenizer,
                                                             args.rank))
            forward = timed(lambda: model.logits(ids, mask), args.repeats)
            generate = timed(lambda: model.generate_ids(*prompt, max_new_tokens=args.new_tokens), max(1, args.repeats // 2))
            rows.append({"kind": kind, "k": k, "mib": weight_bytes(model) / 2**20, "forward_s": forward,
                         "generate_s": generate})
            del model
    single = {r["kind"]: r for r in rows if r["k"] == min(args.ks)}
    print(f"large {args.large[0]} x {args.large[1]}, small {args.small[0]} x {args.small[1]}, LoRA rank {args.rank}; "
          f"forward {args.batch} x {args.length} tokens, generation {args.batch} x {args.new_tokens} new tokens; "
          f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'offsets':<8} {'K':>3} {'weights MiB':>12} {'x one':>7} {'forward ms':>11} {'x one':>7} "
          f"{'generate ms':>12} {'x one':>7}")
    for r in rows:
        one = single[r["kind"]]
        print(f"{r['kind']:<8} {r['k']:>3} {r['mib']:>12.1f} {r['mib'] / one['mib']:>7.2f} "
              f"{r['forward_s'] * 1e3:>11.1f} {r['forward_s'] / one['forward_s']:>7.2f} "
              f"{r['generate_s'] * 1e3:>12.1f} {r['generate_s'] / one['generate_s']:>7.2f}")


if __name__ == "__main__":
    main()
