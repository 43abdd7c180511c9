"""Throughput of the unlearned model served by vLLM (``lightning-unlearn serve``), side by side with vLLM serving the
large model alone and with :class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel` in-process.

World: a chatml pair of tiny random models sharing a tokenizer (``--large HIDDEN LAYERS``, default 128 x 4 with 2
heads of 64; ``--small``, default 64 x 1 with 2 heads of 32: the large model about 4x the pair's parameters) and
``--offsets`` NPO offset exports moved off the reference. Prompts: TOFU forget questions in the chat template.

For each of the two servers (one at a time, started with the same vLLM options: float32, eager, no prefix cache,
``--server-threads`` OpenMP threads) and for the in-process model, greedy decoding of ``--new-tokens`` tokens per
prompt, at 1 request at a time (``--prompts`` requests in turn) and at ``--concurrency`` requests at once (a pool of
that many clients over ``--concurrency`` x 2 prompts; in-process: batches of that size), ``--rounds`` times each,
the median printed with the machine's load average before each round. The servers are asked to
ignore EOS so every request decodes exactly ``--new-tokens`` tokens; the in-process model stops at its stop tokens,
and its figure counts the tokens it produced. tokens/s = completion tokens / wall seconds of the phase, and per CPU second of the server's processes (or of
this process, in-process), which other jobs on a shared machine move much less than wall time. Ratios
printed: served unlearned / large alone (the cost of the offset inside the engine) and served unlearned /
in-process (what serving buys).

    python benchmarks/served_unlearned.py --root /tmp/bench_serve --out docs/results/served_unlearned.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.atomic import atomic_write_json  # noqa: E402
from lightning_unlearn.data.sources import load_split  # noqa: E402
from lightning_unlearn.deploy.unlearned import UnlearnedModel  # noqa: E402
from lightning_unlearn.models.families import make_family_pair  # noqa: E402
from lightning_unlearn.modules import NPO  # noqa: E402
from lightning_unlearn.offset.vllm_server import VLLMServer, default_vllm_python, free_port  # noqa: E402

VLLM_OPTIONS = ["--enforce-eager", "--max-model-len", "512", "--max-logprobs", "20", "--disable-uvicorn-access-log"]


def make_world(root: Path, large: tuple[int, int], small: tuple[int, int], offsets: int) -> dict[str, Any]:
    rows = load_split("bundled", "forget10") + load_split("bundled", "retain90")[:800]
    paths: dict[str, Any] = make_family_pair("chatml", root, [f"{r['question']} {r['answer']}" for r in rows],
                                             vocab_size=400, large=large, small=small, seed=0)
    paths["exports"] = []
    for i in range(offsets):
        module = NPO(small_model=str(paths["small"]), large_model=str(paths["large"]), alpha=1.0)
        module.setup("fit")
        module.configure_model()
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.08 * torch.randn(p.shape, generator=generator))
        paths["exports"].append(module.eval().export(root / f"request_{i}"))
    return paths


def parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 900.0) -> float:
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                return time.monotonic() - begin
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer in {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group ``pgid`` (a server: API server, engine,
    worker), from ``/proc``: unlike wall time, hardly moved by other jobs waiting for the same cores."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError):
            continue
    return total


def median_of(rounds: int, measure: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """The median over ``rounds`` runs of ``measure`` of each figure, every run's figures, and the 1-minute load
    average before each run (the machine is shared: a figure under a high load is slower than the code)."""
    runs, loads = [], []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        runs.append(measure())
    return {**{k: statistics.median(r[k] for r in runs) for k in runs[0]}, "runs": runs, "load": loads}


def served_throughput(url: str, name: str, prompts: list[list[int]], new_tokens: int, concurrency: int,
                      pgid: int) -> dict:
    """Completion tokens per second (wall) and per CPU second of the server's processes, at 1 request at a time
    and at ``concurrency`` at once."""

    def complete(prompt: list[int]) -> int:
        body = {"model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        response = httpx.post(f"{url}/completions", json=body, timeout=600.0)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    out = {}
    begin, cpu = time.perf_counter(), group_cpu_seconds(pgid)
    tokens = sum(complete(p) for p in prompts[:concurrency // 2 or 1])
    out["1"] = tokens / (time.perf_counter() - begin)
    out["1 cpu"] = tokens / (group_cpu_seconds(pgid) - cpu)
    many = (prompts * 4)[: 2 * concurrency]
    begin, cpu = time.perf_counter(), group_cpu_seconds(pgid)
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(complete, many))
    out[str(concurrency)] = tokens / (time.perf_counter() - begin)
    out[f"{concurrency} cpu"] = tokens / (group_cpu_seconds(pgid) - cpu)
    return out


def in_process_throughput(model: UnlearnedModel, questions: list[str], new_tokens: int, concurrency: int) -> dict:
    stops = set(model.stop_ids)

    def produced(rows: torch.Tensor) -> int:
        count = 0
        for row in rows.tolist():
            for token in row:
                count += 1
                if token in stops:
                    break
        return count

    out = {}
    begin, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for q in questions[:concurrency // 2 or 1]:
        tokens += produced(model.generate_ids(*model.prompt_batch([q]), max_new_tokens=new_tokens))
    out["1"] = tokens / (time.perf_counter() - begin)
    out["1 cpu"] = tokens / (time.process_time() - cpu)
    many = (questions * 4)[: 2 * concurrency]
    begin, cpu, tokens = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(many), concurrency):
        tokens += produced(model.generate_ids(*model.prompt_batch(many[i:i + concurrency]), max_new_tokens=new_tokens))
    out[str(concurrency)] = tokens / (time.perf_counter() - begin)
    out[f"{concurrency} cpu"] = tokens / (time.process_time() - cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--large", type=int, nargs=2, default=(128, 4), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--small", type=int, nargs=2, default=(64, 1), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--offsets", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process model")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per phase (the median is printed)")
    parser.add_argument("--large-first", action="store_true", help="measure the large model's server first")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.root.resolve()
    world = make_world(root / "world", tuple(args.large), tuple(args.small), args.offsets)
    sizes = {"large": parameters(Path(world["large"])), "small": parameters(Path(world["small"]))}
    model = UnlearnedModel.from_export(world["exports"], large_dtype="float32", small_dtype="float32")
    model.generate_ids(*model.prompt_batch(["warm-up"]), max_new_tokens=4)
    questions = [r["question"] for r in load_split("bundled", "forget10")[: 2 * args.concurrency]]
    prompts = [model.prompt_batch([q])[0][0].tolist() for q in questions]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_PYTHON": str(default_vllm_python()), "PYTHONPATH": str(ROOT)}
    results: dict[str, Any] = {}
    starts: dict[str, float] = {}

    def unlearned_server() -> None:
        port = free_port()
        log = root / "serve_unlearned.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "serve", *map(str, world["exports"]),
                                        "--port", str(port), "--serving-dir", str(root / "serving"), *VLLM_OPTIONS],
                                       stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            starts["served unlearned"] = wait_ready(url, process, log)
            name = httpx.get(f"{url}/models").json()["data"][0]["id"]
            served_throughput(url, name, prompts[:2], 8, 2, process.pid)  # warm-up
            results["served unlearned"] = median_of(args.rounds, lambda: served_throughput(
                url, name, prompts, args.new_tokens, args.concurrency, process.pid))
        finally:
            stop(process)
        print("served unlearned:", results["served unlearned"], flush=True)

    def large_server() -> None:
        server = VLLMServer(world["large"], max_logprobs=20, log=root / "serve_large.log", threads=args.server_threads)
        with server:
            starts["served large alone"] = server.start_seconds or 0.0
            name = str(world["large"])
            pgid = server.process.pid
            served_throughput(server.url, name, prompts[:2], 8, 2, pgid)  # warm-up
            results["served large alone"] = median_of(args.rounds, lambda: served_throughput(
                server.url, name, prompts, args.new_tokens, args.concurrency, pgid))
        print("served large alone:", results["served large alone"], flush=True)

    for phase in ((large_server, unlearned_server) if args.large_first else (unlearned_server, large_server)):
        phase()
    results["in-process unlearned"] = median_of(args.rounds, lambda: in_process_throughput(
        model, questions, args.new_tokens, args.concurrency))
    c = str(args.concurrency)
    print(f"\nlarge {args.large[1]} x {args.large[0]} ({sizes['large']:,} parameters), small {args.small[1]} x "
          f"{args.small[0]} ({sizes['small']:,}), {args.offsets} offset(s); {args.new_tokens} new tokens per request; "
          f"server threads {args.server_threads}, in-process threads {args.threads}; {platform.machine()}, "
          f"{os.cpu_count()} cores")
    print(f"{'':24s} {'1 request':>12s} {c + ' concurrent':>14s}   (completion tokens per wall second)")
    for label, figures in results.items():
        print(f"{label:24s} {figures['1']:12.1f} {figures[c]:14.1f}")
    print(f"{'':24s} {'1 request':>12s} {c + ' concurrent':>14s}   (completion tokens per CPU second of the server, "
          "or of this process in-process)")
    for label, figures in results.items():
        print(f"{label:24s} {figures['1 cpu']:12.1f} {figures[c + ' cpu']:14.1f}")
    keys = ("1", c, "1 cpu", c + " cpu")
    ratios = {f"served unlearned / {peer}": {k: results["served unlearned"][k] / results[peer][k] for k in keys}
              for peer in ("served large alone", "in-process unlearned")}
    print(f"{'ratios':40s} {'1 wall':>8s} {c + ' wall':>8s} {'1 cpu':>8s} {c + ' cpu':>8s}")
    for label, figures in ratios.items():
        print(f"{label:40s} " + " ".join(f"{figures[k]:7.2f}x" for k in keys))
    print("server start (s):", {k: round(v, 1) for k, v in starts.items()})
    print("1-minute load average before each round:", {k: [round(x, 1) for x in v["load"]] for k, v in results.items()})
    if args.out:
        atomic_write_json(args.out, {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                     "parameters": sizes, "tokens_per_second": results, "ratios": ratios,
                                     "start_seconds": starts})


if __name__ == "__main__":
    main()
