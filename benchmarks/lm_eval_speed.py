"""How fast is the lm-eval wrapper, compared with lm-eval's own Hugging Face model on the same work?

Builds the demo's tiny world (``make_tiny_pair``: a "large" 4 x 128 and a "small" 2 x 64 Llama sharing a 2,048-token
tokenizer; random weights) and an offset export over it (the small model as ``S`` against itself as ``S0``), then
scores the shipped offline task ``tofu_general`` (217 four-way questions: 868 log-likelihood requests) with:

(a) lm-eval's ``hf`` model (``HFLM``) on the large model, and on the small model;
(b) :class:`~lightning_unlearn.harness.UnlearnedLM` on the same large model (direct);
(c) :class:`~lightning_unlearn.harness.UnlearnedLM` on the offset model ``z_L + alpha (z_S - z_S0)``.

Two timings per model, fastest of ``--repeats`` interleaved runs, model loading excluded: the requests alone
(``lm.loglikelihood`` on the task's 868 context/continuation pairs, as the task writes them) and the whole
``lm_eval.simple_evaluate`` (task building, requests, metrics). It prints (b)/(a) (target: at most 1.2, with the
same accuracy) and (c) against three ``hf`` runs (3 x large, and large + 2 x small: the three models (c) runs).

    python benchmarks/lm_eval_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def requests(limit: int | None) -> list[Any]:
    """The task's own requests: ``("Question: q\\nAnswer:", " choice")`` for the true and perturbed answers."""
    from lm_eval.api.instance import Instance

    from lightning_unlearn.data.sources import load_split

    pairs = []
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        for row in load_split("bundled", split)[:limit]:
            for choice in [row["answer"], *row["perturbed_answer"]]:
                pairs.append((f"Question: {row['question']}\nAnswer:", f" {choice}"))
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="questions per task (default: all 217)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from lightning_unlearn.harness import UnlearnedLM
    from lightning_unlearn.harness.run import evaluate, flat_metrics
    from lightning_unlearn.models.tiny import make_tiny_pair

    root = Path(tempfile.mkdtemp(prefix="lm_eval_speed_"))
    try:
        paths = make_tiny_pair(root)
        offset = root / "offset"
        shutil.copytree(paths["small"], offset)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (paths["tokenizer"] / name).is_file():
                shutil.copy(paths["tokenizer"] / name, offset / name)
        (offset / "offset.json").write_text(json.dumps({"large_model": str(paths["large"]),
                                                        "reference_model": str(paths["small"]), "alpha": 1.0}))
        bs = args.batch_size
        models = {
            "hf_large": HFLM(pretrained=str(paths["large"]), device="cpu", batch_size=bs),
            "hf_small": HFLM(pretrained=str(paths["small"]), device="cpu", batch_size=bs),
            "wrapper_large": UnlearnedLM(str(paths["large"]), batch_size=bs),
            "wrapper_offset": UnlearnedLM(str(offset), batch_size=bs, large_dtype="float32"),
        }
        work = requests(args.limit)
        best: dict[str, dict[str, float]] = {name: {"requests_s": float("inf"), "evaluate_s": float("inf")}
                                             for name in models}
        accuracy: dict[str, dict[str, float]] = {}
        for _ in range(args.repeats):
            for name, lm in models.items():
                seconds, _ = timed(lambda: lm.loglikelihood(work, disable_tqdm=True))
                best[name]["requests_s"] = min(best[name]["requests_s"], seconds)
                seconds, results = timed(lambda: evaluate(lm, ["tofu_general"], limit=args.limit, bootstrap_iters=0))
                best[name]["evaluate_s"] = min(best[name]["evaluate_s"], seconds)
                accuracy[name] = flat_metrics(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ratios = {}
    for kind in ("requests_s", "evaluate_s"):
        hf, small = best["hf_large"][kind], best["hf_small"][kind]
        ratios[kind] = {
            "wrapper / hf (direct, same model)": best["wrapper_large"][kind] / hf,
            "offset / (3 x hf large)": best["wrapper_offset"][kind] / (3 * hf),
            "offset / (hf large + 2 x hf small)": best["wrapper_offset"][kind] / (hf + 2 * small),
        }
    same = accuracy["wrapper_large"] == accuracy["hf_large"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"{len(work)} requests, batch {args.batch_size}, best of {args.repeats}")
    for name, t in best.items():
        print(f"  {name:15s} requests {t['requests_s']:.3f} s   simple_evaluate {t['evaluate_s']:.3f} s   "
              f"acc wf {accuracy[name]['tofu_world_facts_mc/acc']:.3f} ra {accuracy[name]['tofu_real_authors_mc/acc']:.3f}")
    for kind, values in ratios.items():
        print(f"  {kind}: " + ", ".join(f"{k} = {v:.2f}" for k, v in values.items()))
    print(f"  same accuracy as hf on the direct model: {same}")
    return {"seconds": best, "ratios": ratios, "accuracy": accuracy, "same_accuracy": same}


if __name__ == "__main__":
    main()
