"""Logit sources without a server: log-probabilities in place of logits, the top-k fill, the HTTP retry policy.

The retry tests talk to a tiny HTTP server written here (a socket that answers 503, 400, or too late, as told):
what they check is the client's own behaviour against those answers, not vLLM's. What vLLM answers is tested
against a real vLLM server in ``test_served_large.py``.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lightning_unlearn.offset.logit_cache import FrozenLogitCache
from lightning_unlearn.offset.logits import offset_logits
from lightning_unlearn.offset.sources import ServedLargeModel, TokenHistory
from lightning_unlearn.offset.topk import dense_logprobs, dense_rows
from lightning_unlearn.offset.vllm_client import ServerError, ServerUnavailable, VLLMClient, is_served, parse_top_logprobs


def test_log_probabilities_give_the_same_offset_distribution_as_logits() -> None:
    """softmax(z_L + a (z_S - z_S0)) is unchanged when log_softmax(z_L) replaces z_L (a per-position shift)."""
    g = torch.Generator().manual_seed(0)
    z_large, z_small, z_ref = (torch.randn(2, 5, 11, generator=g) * 4 for _ in range(3))
    alpha = 0.7
    from_logits = offset_logits(z_small, z_large, z_ref.clone(), alpha)
    from_logprobs = offset_logits(z_small, torch.log_softmax(z_large, -1), z_ref.clone(), alpha)
    torch.testing.assert_close(torch.log_softmax(from_logprobs, -1), torch.log_softmax(from_logits, -1),
                               atol=1e-5, rtol=0)
    # probabilities (not log-probabilities) in place of logits would change the distribution: the check can fail
    from_probs = offset_logits(z_small, torch.softmax(z_large, -1), z_ref.clone(), alpha)
    assert (torch.log_softmax(from_probs, -1) - torch.log_softmax(from_logits, -1)).abs().max() > 0.1


def test_dense_row_spreads_the_remaining_mass_evenly() -> None:
    # p = 0.5 and 0.25 answered out of V = 4: the other two tokens share 0.25, 0.125 each
    row = dense_logprobs({0: math.log(0.5), 2: math.log(0.25)}, 4)
    torch.testing.assert_close(row.exp(), torch.tensor([0.5, 0.125, 0.25, 0.125]))


def test_dense_row_with_the_whole_vocabulary_is_exact() -> None:
    logp = torch.log_softmax(torch.tensor([1.0, -2.0, 0.5]), -1)
    row = dense_logprobs({i: float(v) for i, v in enumerate(logp)}, 3)
    torch.testing.assert_close(row, logp)


def test_dense_row_floors_a_tail_with_no_mass_left() -> None:
    row = dense_logprobs({0: 0.0}, 3)  # the answered token took all the mass in float32
    assert row[0] == 0 and bool(torch.isfinite(row).all()) and row[1] == row[2] < -60


def test_dense_rows_drop_padded_embedding_rows_into_the_fill() -> None:
    # id 5 is past a 4-token vocabulary (a padded embedding row): its mass 0.25 joins the 3 unanswered tokens
    rows = dense_rows([{0: math.log(0.5), 5: math.log(0.25)}], 4)
    torch.testing.assert_close(rows.exp(), torch.tensor([[0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]]))
    with pytest.raises(ValueError, match="negative"):
        dense_rows([{-1: -0.1}], 4)


def test_parse_top_logprobs_reads_both_vllm_formats() -> None:
    assert parse_top_logprobs({"token_id:7": -0.5, "token_id:3": -1.0}) == {7: -0.5, 3: -1.0}
    assert parse_top_logprobs({"7": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}}) == {7: -0.5}
    assert parse_top_logprobs(None) == {}
    with pytest.raises(ServerError, match="return_tokens_as_token_ids"):
        parse_top_logprobs({" the": -0.5})


def test_token_history_drops_left_padding_and_appends_steps() -> None:
    history = TokenHistory()
    history.extend(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))
    history.extend(torch.tensor([[1], [2]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert history.rows == [[5, 6, 1], [7, 8, 9, 2]]


def test_served_model_names() -> None:
    assert is_served("http://localhost:8000/v1") and is_served("https://h/v1")
    assert not is_served("/models/large") and not is_served(None) and not is_served("meta-llama/Llama-2-7b-hf")
    with pytest.raises(ValueError, match="HOST:PORT/v1"):
        VLLMClient("http://localhost:8000")
    with pytest.raises(ValueError, match="at least 1"):
        ServedLargeModel("http://localhost:8000/v1", 10, top_k=0)


# --- the retry policy, against a scripted local HTTP server --------------------------------------------------

class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next of the server's ``script``: an HTTP status or ``("sleep", s)``."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        server.times.append(time.monotonic())
        step = server.script.pop(0) if len(server.script) > 1 else server.script[0]
        if isinstance(step, tuple):
            time.sleep(step[1])
            step = 200
        body = json.dumps({"data": [{"id": "m"}]} if step == 200 else {"error": f"scripted {step}"}).encode()
        self.send_response(step)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.script, server.times = [200], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _client(server: ThreadingHTTPServer, **kwargs: float) -> VLLMClient:
    return VLLMClient(f"http://127.0.0.1:{server.server_address[1]}/v1", **{"backoff": 0.05, "retries": 3, **kwargs})


def test_5xx_answers_are_retried_with_doubling_backoff(scripted: ThreadingHTTPServer) -> None:
    scripted.script = [503, 500, 200]
    assert _client(scripted).models() == [{"id": "m"}]
    gaps = [b - a for a, b in zip(scripted.times, scripted.times[1:])]
    assert len(scripted.times) == 3 and gaps[0] >= 0.05 and gaps[1] >= 0.1


def test_a_server_that_keeps_failing_stops_with_its_name(scripted: ThreadingHTTPServer) -> None:
    scripted.script = [502]
    with pytest.raises(ServerUnavailable, match=rf"127.0.0.1:{scripted.server_address[1]} did not answer.*4 tries"):
        _client(scripted).models()
    assert len(scripted.times) == 4


def test_4xx_is_not_retried(scripted: ThreadingHTTPServer) -> None:
    scripted.script = [400]
    with pytest.raises(ServerError, match="HTTP 400") as err:
        _client(scripted).models()
    assert not isinstance(err.value, ServerUnavailable) and len(scripted.times) == 1


def test_a_timeout_is_retried(scripted: ThreadingHTTPServer) -> None:
    scripted.script = [("sleep", 1.0), 200]
    assert _client(scripted, timeout=0.3).models() == [{"id": "m"}]
    assert len(scripted.times) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_is_retried_then_named() -> None:
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match=rf"127.0.0.1:{port} did not answer .*ConnectError"):
        VLLMClient(f"http://127.0.0.1:{port}/v1", retries=2, backoff=0.05).models()
    assert time.monotonic() - start >= 0.05 + 0.1


def test_an_unanswered_batch_leaves_the_cache_empty() -> None:
    """A request that fails after its retries stores nothing: no partial entry for a resumed run to trust."""
    source = ServedLargeModel(f"http://127.0.0.1:{_free_port()}/v1", 8, client=None)
    source.client = VLLMClient(source.url, retries=0)
    source.client._model = "m"  # skip /v1/models: the completion itself must fail
    cache = FrozenLogitCache(["large"], 8)
    ids, mask = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ServerUnavailable):
        cache.get(ids, mask, lambda i, m: [source(i, m)])
    assert len(cache) == 0
