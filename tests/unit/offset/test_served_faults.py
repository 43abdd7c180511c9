"""A served large model's faulty answers stop the run, and its cache follows the weights behind the name.

The server here is a real HTTP server on 127.0.0.1 (a thread) that answers vLLM's endpoints the way vLLM 0.32
formats them, from a known bigram model (``log p(. | ids[:t+1])`` is row ``ids[t]`` of a log-softmax table), and
injects the faults vLLM has shown: ``None`` for a prompt position (prefix caching, vllm #13409 and #3251), a
stale entry (another request's values: the prompt's token missing, or a list of another length, #42019), NaN.
What is tested is the client's and the cache's behaviour on those answers; vLLM's own answers are tested against
a real vLLM server in ``test_served_large.py``.
"""

from __future__ import annotations

import json
import math
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.offset.logit_cache import FrozenLogitCache
from lightning_unlearn.offset.sources import ServedLargeModel, TokenHistory, check_served_context
from lightning_unlearn.offset.topk import dense_logprobs
from lightning_unlearn.offset.vllm_client import InvalidLogprobs, VLLMClient

ROOT = Path(__file__).resolve().parents[3]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
V = 16
NAME = "/models/large"


def bigram(seed: int, vocab: int = V) -> torch.Tensor:
    """A model's log-probabilities: row ``i`` is ``log p(. | last token i)``."""
    return torch.log_softmax(3 * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)), -1)


class _Handler(BaseHTTPRequestHandler):
    """vLLM's ``/v1/models``, ``/v1/completions`` (prompt ids, ``prompt_logprobs``, ``return_tokens_as_token_ids``),
    ``/tokenize`` and ``/detokenize``, answered from ``server.table``, with ``server.fault`` injected."""

    def _send(self, body: object) -> None:
        data = json.dumps(body).encode()  # NaN is written as NaN, as Python's json (vLLM's) writes it
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        self._send({"data": [{"id": NAME, "root": NAME, "max_model_len": server.max_model_len}]})

    def do_POST(self) -> None:  # noqa: N802
        server = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append(request)
        if self.path == "/tokenize":
            tokenizer = server.tokenizer
            ids = (tokenizer(request["prompt"], add_special_tokens=request["add_special_tokens"])["input_ids"]
                   if tokenizer else [(ord(c) % (len(server.table) - 1)) + 1 for c in request["prompt"]][:24])
            return self._send({"tokens": ids})
        if self.path == "/detokenize":
            return self._send({"prompt": server.tokenizer.decode(request["tokens"])})
        self._send(self.completion(request))

    def completion(self, request: dict) -> dict:
        table, ids, k = self.server.table, request["prompt"], request["logprobs"]

        def top(row: torch.Tensor) -> dict[int, float]:
            values, index = row.topk(k)
            return {int(i): float(v) for i, v in zip(index, values)}

        nxt = top(table[ids[-1]])
        choice: dict = {"text": "", "logprobs": {"top_logprobs": [{f"token_id:{i}": v for i, v in nxt.items()}]}}
        fault, position = self.server.fault or (None, None)
        if fault == "next_none":
            choice["logprobs"]["top_logprobs"] = [None]
        if fault == "few":
            choice["logprobs"]["top_logprobs"][0].pop(f"token_id:{next(iter(nxt))}")
        if fault == "next_nan":
            choice["logprobs"]["top_logprobs"][0][f"token_id:{next(iter(nxt))}"] = math.nan
        if request.get("prompt_logprobs") is not None:
            given: list = [None]
            for t in range(1, len(ids)):
                entry = {**top(table[ids[t - 1]]), ids[t]: float(table[ids[t - 1], ids[t]])}
                given.append({str(i): {"logprob": v, "rank": 1, "decoded_token": str(i)} for i, v in entry.items()})
            if fault == "none":
                given[position] = None
            elif fault == "nan":
                given[position][str(ids[position])]["logprob"] = math.nan
            elif fault == "stale":  # another sequence's entry: its own token, not ours
                other = (ids[position] + 1) % len(table)
                entry = {**top(table[other]), other: float(table[other, other])}
                entry.pop(ids[position], None)
                given[position] = {str(i): {"logprob": v} for i, v in entry.items()}
            elif fault == "short":
                given = given[:-1]
            choice["prompt_logprobs"] = given
        return {"choices": [choice]}

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.table, server.fault, server.requests, server.max_model_len, server.tokenizer = bigram(0), None, [], 64, None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def source(server: ThreadingHTTPServer, top_k: int | None = 4) -> ServedLargeModel:
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return ServedLargeModel(url, V, top_k, client=VLLMClient(url, retries=0))


IDS = torch.tensor([[3, 7, 1, 12, 5, 9], [4, 4, 8, 2, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def test_a_clean_answer_gives_the_models_log_probabilities(fake: ThreadingHTTPServer) -> None:
    """The reference for the faults below: without a fault, the prompt's tokens get their exact values."""
    got = source(fake)(IDS, MASK)
    table = fake.table
    for t in range(5):
        assert float(got[0, t, IDS[0, t + 1]]) == pytest.approx(float(table[IDS[0, t], IDS[0, t + 1]]), abs=1e-6)


@pytest.mark.parametrize(("fault", "says"), [
    (("none", 2), r"no log-probabilities \(None\) at prompt position 2"),
    (("nan", 3), r"not finite \(nan for token 12\) at prompt position 3"),
    (("stale", 2), r"no log-probability for the prompt's token 1 .*stale.* at prompt position 2"),
    (("short", None), r"with 5 prompt log-probabilities for 6 tokens"),
    (("next_none", None), r"no log-probabilities \(None\) for the next token \(position 5\)"),
    (("next_nan", None), r"not finite \(nan .*for the next token"),
])
def test_a_missing_stale_or_nan_answer_stops_the_run_and_stores_nothing(
        fake: ThreadingHTTPServer, tmp_path: Path, fault: tuple, says: str) -> None:
    """Before: a None entry became an empty row filled uniformly (log 1/V) and NaN passed through, both into
    the cache. Now the error names the server, the request, the position and the prefix cache, and the disk
    cache (reopened) holds nothing."""
    fake.fault = fault
    served = source(fake)
    cache = FrozenLogitCache(["large"], V, "disk", tmp_path / "cache", torch.float32, fingerprint={"m": 1})
    port = fake.server_address[1]
    with pytest.raises(InvalidLogprobs, match=says) as err:
        cache.get(IDS[:1], MASK[:1], lambda i, m: [served(i, m)])
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "POST http://127.0.0.1" in message and "[3, 7, 1, 12, 5, 9]" in message
    assert "--no-enable-prefix-caching" in message and "prefix caching" in message
    assert len(cache) == 0
    cache.close()
    again = FrozenLogitCache(["large"], V, "disk", tmp_path / "cache", torch.float32, fingerprint={"m": 1})
    assert len(again) == 0 and not again.cleared and (tmp_path / "cache" / "logits.bin").stat().st_size == 0


def test_greedy_decoding_refuses_a_missing_next_token_answer(fake: ThreadingHTTPServer) -> None:
    served, history = source(fake), TokenHistory()
    first = served(IDS[:1], MASK[:1], past_key_values=history)
    assert first.shape == (1, 1, V)
    fake.fault = ("next_none", None)
    with pytest.raises(InvalidLogprobs, match=r"logprobs=4\).* for the next token \(position 6\)"):
        served(torch.tensor([[2]]), torch.ones(1, 7, dtype=torch.long), past_key_values=history)


def test_an_answer_with_fewer_entries_than_asked_or_more_than_probability_one_is_refused(
        fake: ThreadingHTTPServer) -> None:
    fake.fault = ("few", None)
    with pytest.raises(InvalidLogprobs, match="3 log-probabilities where 4 were asked"):
        source(fake).client.completion_logprobs([1, 2, 3], 4, prompt=False)
    fake.fault, fake.table = None, torch.full((V, V), math.log(0.5))  # rows summing to 8: not a distribution
    with pytest.raises(InvalidLogprobs, match=r"summing to 2.0000 > 1"):
        source(fake).client.completion_logprobs([1, 2, 3], 4, prompt=True)


def test_the_fill_refuses_an_empty_or_non_finite_answer() -> None:
    """Before: an empty answer became the uniform row log(1/V) (every token -2.77 for V = 16)."""
    with pytest.raises(ValueError, match="uniform"):
        dense_logprobs({}, V)
    with pytest.raises(ValueError, match="not finite"):
        dense_logprobs({1: math.nan}, V)


# --- the cache of a served model follows the weights behind the name ------------------------------------------

def cached_values(server: ThreadingHTTPServer, directory: Path) -> tuple[FrozenLogitCache, torch.Tensor]:
    served = source(server)
    cache = FrozenLogitCache(["large"], V, "disk", directory, torch.float32, fingerprint=served.fingerprint(),
                             probes={"large": served.probe()})
    return cache, cache.get(IDS, MASK, lambda i, m: [served(i, m)])[0]


def test_other_weights_behind_the_same_name_rebuild_the_cache(fake: ThreadingHTTPServer, tmp_path: Path) -> None:
    """Before: name, context length, k and vocabulary matched, so the old model's values were read back."""
    first, old = cached_values(fake, tmp_path / "cache")
    first.close()
    same, again = cached_values(fake, tmp_path / "cache")  # the same weights, restarted: reused
    assert not same.cleared and same.misses == 0 and torch.equal(again, old)
    same.close()
    fake.table = bigram(1)  # other weights, same name, same max_model_len
    with pytest.warns(UserWarning, match=r"probe log-probabilities of 'large' differ .* other weights"):
        other, new = cached_values(fake, tmp_path / "cache")
    assert other.cleared and other.misses == 2 and not torch.allclose(new, old)
    expected = fake.table[IDS[0, 0], IDS[0, 1]]
    assert float(new[0, 0, IDS[0, 1]]) == pytest.approx(float(expected), abs=1e-6)


def test_probes_within_the_tolerance_keep_the_cache(fake: ThreadingHTTPServer, tmp_path: Path) -> None:
    first, _ = cached_values(fake, tmp_path / "cache")
    first.close()
    fake.table = fake.table + 2e-4  # a server's run-to-run rounding, well below PROBE_ATOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, _ = cached_values(fake, tmp_path / "cache")
    assert not kept.cleared and kept.misses == 0


# --- a context shorter than the data's sequences is refused before training ------------------------------------

def test_a_server_context_below_max_length_is_refused_at_setup(
        fake: ThreadingHTTPServer, tiny_world: dict, tmp_cwd: Path) -> None:
    """Before: training started and each sequence longer than the server's max_model_len failed mid-run."""
    tokenizer = load_tokenizer(tiny_world["tokenizer"])
    fake.tokenizer, fake.table, fake.max_model_len = tokenizer, bigram(0, len(tokenizer)), 200
    url = f"http://127.0.0.1:{fake.server_address[1]}/v1"
    with pytest.raises(ValueError, match=r"takes at most 200 tokens .* data.max_length is 256 .*--max-model-len 257"):
        main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
              "--model.large_model", url])
    assert not [r for r in fake.requests if "prompt_logprobs" in r], "refused before any log-probability was asked"
    fake.max_model_len = 256  # one token short: each request asks a token after its prompt
    with pytest.raises(ValueError, match="takes at most 256 tokens"):
        check_served_context(ServedLargeModel(url, len(tokenizer)), 256, "data.max_length")
    fake.max_model_len = 257
    check_served_context(ServedLargeModel(url, len(tokenizer)), 256, "data.max_length")


def test_lm_eval_reads_a_served_models_context(fake: ThreadingHTTPServer) -> None:
    """Before: only local models' max_position_embeddings bounded lm-eval's max_length (2048 with a served large
    model), so long requests failed at the server mid-evaluation."""
    from lightning_unlearn.harness.model import max_context_length

    fake.max_model_len = 300
    assert max_context_length(torch.nn.ModuleList([source(fake)])) == 299


def test_the_test_command_stops_on_a_nan_answer_instead_of_reporting_nan_metrics(
        fake: ThreadingHTTPServer, tiny_world: dict, tmp_cwd: Path) -> None:
    """Before: ``main.py test`` exited 0 with NaN probabilities, truth ratios and attacks (and 0.5 for Min-K%)."""
    tokenizer = load_tokenizer(tiny_world["tokenizer"])
    fake.tokenizer, fake.table, fake.max_model_len = tokenizer, bigram(0, len(tokenizer)), 512
    url = f"http://127.0.0.1:{fake.server_address[1]}/v1"
    fake.fault = ("nan", -2)  # in the answer
    with pytest.raises(InvalidLogprobs, match=r"not finite \(nan .* at prompt position \d+ .*--no-enable-prefix-caching"):
        main(["test", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
              "--model.large_model", url, "--model.large_logprobs", "8"])
