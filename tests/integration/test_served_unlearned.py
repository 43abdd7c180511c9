"""The unlearned model served by vLLM (``lightning-unlearn serve``) against the same model in-process.

One real server (vLLM's CPU build, ``make vllm``) is started for the module through the ``serve`` command, on a
composition of two offset exports of a chat-template pair whose head sizes differ (large: 2 heads of 64, small: 2
heads of 32, as Llama-3.1-8B's and Llama-3.2-1B's differ). Every claim is checked against
:class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel` in float32: greedy chat and plain completions of TOFU
forget and retain questions token for token, their log-probabilities within 1e-4 (seen within 1e-6), concurrent
requests batched by the engine, streaming, and lm-eval's own ``local-completions`` model pointed at the server
scoring the offline TOFU multiple-choice tasks as the in-process ``unlearned`` lm-eval model does. Without the vLLM environment the tests are skipped, with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from lightning_unlearn.data.sources import load_split
from lightning_unlearn.deploy.served import PLUGIN_DIR
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.harness.model import UnlearnedLM
from lightning_unlearn.harness.run import evaluate
from lightning_unlearn.losses.logit_arithmetic import relative_top_mask
from lightning_unlearn.models.families import make_family_pair
from lightning_unlearn.modules import NPO
from lightning_unlearn.offset.vllm_server import default_vllm_python, free_port, vllm_missing

ROOT = Path(__file__).resolve().parents[2]
MISSING = vllm_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=f"served unlearned model tests: {MISSING}"),
    pytest.mark.timeout(900),
]
ALPHAS = (1.5, -0.5)
NEW_TOKENS = 24
QUESTIONS = ([r["question"] for r in load_split("bundled", "forget10")[:3]]
             + [r["question"] for r in load_split("bundled", "retain90")[:3]])


def make_world(root: Path) -> dict[str, Path]:
    """A chatml pair sharing a tokenizer (large 128 x 2 layers, 2 heads of 64; small 64 x 1, 2 heads of 32) and two
    NPO offset exports whose trained models are moved off the reference, as a few training steps would."""
    rows = load_split("bundled", "forget10") + load_split("bundled", "retain90")[:800]
    paths = make_family_pair("chatml", root, [f"{r['question']} {r['answer']}" for r in rows], vocab_size=400,
                             large=(128, 2), small=(64, 1), seed=0)
    for name, alpha, seed in (("request_a", ALPHAS[0], 0), ("request_b", ALPHAS[1], 1)):
        module = NPO(small_model=str(paths["small"]), large_model=str(paths["large"]), alpha=alpha)
        module.setup("fit")
        module.configure_model()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.08 * torch.randn(p.shape, generator=generator))
        paths[name] = module.eval().export(root / name)
    return paths


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``lightning-unlearn serve request_a request_b --port P`` (vLLM options passed through), stopped by its
    process group at the end; the in-process model of the same exports in float32."""
    root = tmp_path_factory.mktemp("served_unlearned")
    world = make_world(root)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1",
           "VLLM_PYTHON": str(default_vllm_python()), "PYTHONPATH": str(ROOT)}
    log = root / "serve.log"
    command = [sys.executable, str(ROOT / "main.py"), "serve", str(world["request_a"]), str(world["request_b"]),
               "--port", str(port), "--serving-dir", str(root / "serving"),
               "--enforce-eager", "--max-model-len", "512", "--max-logprobs", "400", "--disable-uvicorn-access-log"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        begin = time.monotonic()
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() - begin > 800:
                pytest.fail(f"serve did not answer in 800 s:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        model = UnlearnedModel.from_export([world["request_a"], world["request_b"]], large_dtype="float32",
                                           small_dtype="float32")
        yield {"url": url, "model": model, "world": world, "log": log, "name": "request_a+request_b"}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def in_process(model: UnlearnedModel, question: str) -> tuple[list[int], list[int], list[float]]:
    """The prompt's ids, the greedy answer's ids (up to NEW_TOKENS, its stop token kept) and each answer token's
    log-probability under the combined logits, in-process."""
    ids, mask = model.prompt_batch([question])
    new = model.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS)[0]
    stops = set(model.stop_ids)
    answer: list[int] = []
    for token in new.tolist():
        answer.append(token)
        if token in stops:
            break
    full = torch.cat([ids[0], torch.tensor(answer)])
    logp = torch.log_softmax(model.logits(full[None], torch.ones_like(full)[None])[0].float(), dim=-1)
    start = ids.shape[1] - 1
    return ids[0].tolist(), answer, [logp[start + i, t].item() for i, t in enumerate(answer)]


def chat(url: str, name: str, question: str, **extra: object) -> dict:
    body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": NEW_TOKENS,
            "temperature": 0.0, "logprobs": True, "return_token_ids": True, **extra}
    response = httpx.post(f"{url}/chat/completions", json=body, timeout=120.0)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_endpoint_names_the_composition(served: dict) -> None:
    models = httpx.get(f"{served['url']}/models", timeout=10.0).json()["data"]
    assert [m["id"] for m in models] == [served["name"]]
    assert "UnlearnedOffsetForCausalLM" in (Path(served["log"]).read_text(errors="replace"))


def test_greedy_chat_completions_are_the_in_process_unlearned_model(served: dict) -> None:
    """The chat template, the tokens and their log-probabilities of TOFU forget and retain questions; the large model
    alone answers differently, so the offset is what the server applies."""
    model: UnlearnedModel = served["model"]
    differs_from_large = 0
    for question in QUESTIONS:
        prompt, answer, logprobs = in_process(model, question)
        reply = chat(served["url"], served["name"], question)
        choice = reply["choices"][0]
        assert reply["prompt_token_ids"] == prompt, "the server's chat template renders another prompt"
        assert choice["token_ids"] == answer, question
        got = [entry["logprob"] for entry in choice["logprobs"]["content"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(logprobs), rtol=0, atol=1e-4)
        model.set_alphas([0.0, 0.0])
        try:
            differs_from_large += in_process(model, question)[1] != answer
        finally:
            model.set_alphas(list(ALPHAS))
    assert differs_from_large > 0, "the offset changes no answer: the test could not tell it from the large model"


def test_concurrent_completions_batched_by_the_engine_stay_exact(served: dict) -> None:
    """Six requests at once (vLLM schedules them into shared steps, prompts and decodes mixed), by token ids on
    /v1/completions; each equals its in-process greedy answer and log-probabilities."""
    model: UnlearnedModel = served["model"]
    expected = [in_process(model, q) for q in QUESTIONS]

    def complete(prompt: list[int]) -> dict:
        body = {"model": served["name"], "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0,
                "logprobs": 1, "return_token_ids": True, "skip_special_tokens": False}
        return httpx.post(f"{served['url']}/completions", json=body, timeout=120.0).json()["choices"][0]

    with ThreadPoolExecutor(len(expected)) as pool:
        choices = list(pool.map(complete, [prompt for prompt, _, _ in expected]))
    for (_, answer, logprobs), choice in zip(expected, choices):
        assert choice["token_ids"] == answer
        torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(logprobs),
                                   rtol=0, atol=1e-4)


def test_streamed_chat_completion_equals_the_whole_one(served: dict) -> None:
    question = QUESTIONS[0]
    whole = chat(served["url"], served["name"], question)["choices"][0]["message"]["content"]
    body = {"model": served["name"], "messages": [{"role": "user", "content": question}],
            "max_tokens": NEW_TOKENS, "temperature": 0.0, "stream": True}
    pieces = []
    with httpx.stream("POST", f"{served['url']}/chat/completions", json=body, timeout=120.0) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == whole


LM_EVAL_TASKS = ("tofu_world_facts_mc", "tofu_real_authors_mc")
LM_EVAL_LIMIT: int | None = None  # every question: 117 world facts and 100 real authors, 868 requests


def test_lm_eval_local_completions_through_the_server_scores_as_in_process(served: dict) -> None:
    """lm-eval's own ``local-completions`` model (its ``api`` extra: ``max_tokens`` 1, ``echo``, ``logprobs`` 1 on
    token ids, four requests in flight) against the in-process ``unlearned`` lm-eval model on the same two exports:
    every choice's log-likelihood within 1e-4 and its is-greedy flag equal, hence the same acc and acc_norm. The
    prompt log-probabilities vLLM echoes come from the plugin's combined logits, as the sampled ones do."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    world = served["world"]
    remote = LocalCompletionsAPI(base_url=f"{served['url']}/completions", model=served["name"],
                                 tokenizer_backend="huggingface", tokenizer=str(world["request_a"]),
                                 num_concurrent=4, max_retries=1, timeout=120)
    local = UnlearnedLM(model=served["model"], batch_size=8)
    got = evaluate(remote, LM_EVAL_TASKS, limit=LM_EVAL_LIMIT, log_samples=True, bootstrap_iters=0)
    want = evaluate(local, LM_EVAL_TASKS, limit=LM_EVAL_LIMIT, log_samples=True, bootstrap_iters=0)
    for task in LM_EVAL_TASKS:
        remote_docs = {s["doc_id"]: s for s in got["samples"][task]}
        local_docs = {s["doc_id"]: s for s in want["samples"][task]}
        assert sorted(remote_docs) == sorted(local_docs) and len(local_docs) == {"tofu_world_facts_mc": 117,
                                                                                  "tofu_real_authors_mc": 100}[task]
        remote_ll, local_ll = [], []
        for doc_id, sample in local_docs.items():
            assert remote_docs[doc_id]["arguments"] == sample["arguments"], "lm-eval asked the two models other requests"
            for (theirs,), (ours,) in zip(remote_docs[doc_id]["resps"], sample["resps"], strict=True):
                remote_ll.append(theirs[0])
                local_ll.append(ours[0])
                assert theirs[1] == ours[1], (task, doc_id, "is_greedy differs")
        assert all(ll < 0 for ll in local_ll)
        torch.testing.assert_close(torch.tensor(remote_ll, dtype=torch.float64),
                                   torch.tensor(local_ll, dtype=torch.float64), rtol=0, atol=1e-4)
        for metric in ("acc,none", "acc_norm,none"):
            assert got["results"][task][metric] == want["results"][task][metric], (task, metric)
        print(f"{task}: acc {want['results'][task]['acc,none']:.4f}, acc_norm {want['results'][task]['acc_norm,none']:.4f} "
              f"on {len(local_docs)} questions, "
              f"{len(local_ll)} log-likelihoods, largest difference "
              f"{max(abs(a - b) for a, b in zip(remote_ll, local_ll)):.2e}")


def test_plugin_imports_without_lightning_and_refuses_a_missing_model_at_load(tmp_path: Path) -> None:
    """In vLLM's environment, with only the plugin folder on the path: lightning_unlearn is not importable, the
    plugin is, its entry point is what vLLM loads, a serving spec naming a folder that is gone is refused with
    the folder's name (raised while vLLM builds the model, so the server stops at start), and its restated ULD filter
    keeps exactly the tokens :func:`relative_top_mask` keeps (on logits with near-ties and a flat row)."""
    gone = tmp_path / "moved_away"
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    logits[1] = 0.0
    logits[2, :5] = logits[2].max()
    torch.save({"logits": logits, **{f"keep_{tau}": ~relative_top_mask(logits, tau) for tau in (0.05, 0.1, 0.5)}},
               tmp_path / "uld.pt")
    script = f"""
import importlib.metadata, importlib.util
assert importlib.util.find_spec("lightning_unlearn") is None
(entry,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
            if e.name == "lightning_unlearn_offset"]
entry.load()()
from vllm import ModelRegistry
assert "UnlearnedOffsetForCausalLM" in ModelRegistry.get_supported_archs()
from lightning_unlearn_vllm.model import read_spec
try:
    read_spec({{"large_model": {str(gone)!r}, "reference_model": None, "offsets": [{{"path": "x", "alpha": 1}}],
               "vocab_size": 4}})
except ValueError as err:
    print("REFUSED", err)
import torch
from lightning_unlearn_vllm.model import relative_top_keep
saved = torch.load({str(tmp_path / "uld.pt")!r})
assert relative_top_keep(saved["logits"], 0.0) is None
for tau in (0.05, 0.1, 0.5):
    assert torch.equal(relative_top_keep(saved["logits"], tau), saved[f"keep_{{tau}}"]), tau
print("ULD FILTER EQUAL")
"""
    env = {**os.environ, "PYTHONPATH": str(PLUGIN_DIR), "OMP_NUM_THREADS": "1", "VLLM_NO_USAGE_STATS": "1"}
    done = subprocess.run([str(default_vllm_python()), "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"REFUSED {str(gone)!r}" in done.stdout and "has no config.json" in done.stdout
    assert "ULD FILTER EQUAL" in done.stdout
