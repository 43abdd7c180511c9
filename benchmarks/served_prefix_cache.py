"""vLLM's prefix caching on and off: are the log-probabilities the framework reads still right, and what does it save?

One tiny Llama (the served-model tests' shape: 2 layers, 2 heads of 32, a 400-token vocabulary) is served twice,
once with ``--enable-prefix-caching`` and once with ``--no-enable-prefix-caching``, and asked the framework's two
kinds of request, each sent in two rounds so that the second finds every prefix cached:

* teacher forcing: ``--sequences`` sequences sharing a ``--prefix``-token prefix, with ``prompt_logprobs`` (the
  training and evaluation path);
* greedy decoding: one sequence grown a token at a time for ``--steps`` steps, the whole prefix resent each time
  with ``logprobs`` only (:class:`~lightning_unlearn.offset.sources.ServedLargeModel` in generation).

Every answer goes through :class:`~lightning_unlearn.offset.vllm_client.VLLMClient`'s checks (a missing, stale or
non-finite entry is counted, not raised) and is compared with the same model in-process (float32
``log_softmax``). Printed per server: faults, the largest distance from in-process, wall seconds per round.

    python benchmarks/served_prefix_cache.py --root /tmp/prefix_cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.data.sources import load_split  # noqa: E402
from lightning_unlearn.models.loading import load_causal_lm  # noqa: E402
from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer  # noqa: E402
from lightning_unlearn.offset.vllm_client import InvalidLogprobs, VLLMClient  # noqa: E402
from lightning_unlearn.offset.vllm_server import VLLMServer  # noqa: E402


def reference(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def distance(answers: list[dict[int, float]], expected: torch.Tensor) -> float:
    """Largest |served - in-process| over the answered entries of every position."""
    return max(abs(v - float(expected[t, i])) for t, a in enumerate(answers) for i, v in a.items())


def run(server: VLLMServer, model: torch.nn.Module, args: argparse.Namespace, vocab: int) -> dict:
    client = VLLMClient(server.url, concurrency=4)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, vocab, (args.prefix,), generator=g).tolist()
    sequences = [prefix + torch.randint(3, vocab, (args.suffix,), generator=g).tolist() for _ in range(args.sequences)]
    out: dict = {"prefix_caching": server.prefix_caching, "teacher_forcing": [], "decoding": []}
    for _ in range(2):
        faults, worst, start = 0, 0.0, time.monotonic()
        for ids in sequences:
            try:
                answers = client.completion_logprobs(ids, args.k, prompt=True)
            except InvalidLogprobs as err:
                faults += 1
                print(err, flush=True)
                continue
            worst = max(worst, distance(answers[:-1], reference(model, ids)[:-1]))
        out["teacher_forcing"].append({"faults": faults, "max_abs": worst, "seconds": time.monotonic() - start})
    for _ in range(2):
        ids, faults, worst, start = list(prefix), 0, 0.0, time.monotonic()
        for _ in range(args.steps):
            try:
                (answer,) = client.completion_logprobs(ids, args.k, prompt=False)
            except InvalidLogprobs as err:
                faults += 1
                print(err, flush=True)
                break
            expected = reference(model, ids)[-1:]
            worst = max(worst, distance([answer], expected))
            ids.append(int(expected[0].argmax()))
        out["decoding"].append({"faults": faults, "max_abs": worst, "seconds": time.monotonic() - start})
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=384)
    parser.add_argument("--suffix", type=int, default=16)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    rows = load_split("bundled", "forget10") + load_split("bundled", "retain90")[:800]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    tokenizer = train_tokenizer(texts, vocab_size=400, out_dir=args.root / "tokenizer")
    build_tiny_llama(tokenizer, args.root / "large", seed=1, hidden_size=64, num_layers=2, num_heads=2)
    model = load_causal_lm(str(args.root / "large"), "float32").eval()
    results = []
    for caching in (True, False):
        with VLLMServer(args.root / "large", max_logprobs=len(tokenizer), prefix_caching=caching,
                        log=args.root / f"server_{caching}.log") as server:
            results.append(run(server, model, args, len(tokenizer)))
        print(json.dumps(results[-1]), flush=True)
    (args.root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
