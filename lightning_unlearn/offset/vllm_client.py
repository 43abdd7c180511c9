"""A client for a large model served by vLLM's OpenAI-compatible server: log-probabilities by token ids.

Endpoints used (vLLM 0.32's ``vllm.entrypoints.openai.api_server``):

* ``POST /v1/completions`` with the prompt as token ids, ``max_tokens: 1``, ``temperature: 0``,
  ``logprobs: k`` and ``return_tokens_as_token_ids: true`` (the next token's top-k, keyed ``token_id:N``), and
  for teacher forcing also ``prompt_logprobs: k`` (vLLM's extension: for every prompt position after the
  first, the top-k of that position's token given the tokens before it, plus the actual token, keyed by id);
* ``POST /tokenize`` and ``POST /detokenize`` (vLLM's, at the server root) for the tokenizer check;
* ``GET /v1/models`` for the served model's name and context length.

HTTP goes through ``httpx`` (already installed with ``transformers``, through ``huggingface_hub``): one
pooled, thread-safe client with separate connect and read timeouts; a batch's requests run concurrently on a
thread pool, so the server's scheduler batches them.

Faults: a refused or dropped connection, a timeout and a 5xx answer are retried ``retries`` times with
exponential backoff (``backoff * 2**i`` seconds), then :class:`ServerUnavailable` names the server and the last
error; a 4xx answer is a request the server will never accept (e.g. ``k`` above its ``--max-logprobs``) and
raises :class:`ServerError` at once with the server's message.

Answers are checked before anything uses them (:class:`InvalidLogprobs`): every prompt position after the
first must carry a finite log-probability for the prompt's own token and at least ``k`` finite entries in all,
no entry above 0 and no more than probability 1 in all; the next-token answer likewise. vLLM has returned
``None`` for prompt positions read from its prefix cache (vllm #13409, #3251), values of another request
(#42019) and NaN; a filled-in or NaN row would otherwise become a plausible loss, a cached row or a metric.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # imported when a client is made: a run without a served model never needs it
    import httpx

__all__ = ["PREFIX_CACHE_HINT", "InvalidLogprobs", "ServerError", "ServerUnavailable", "VLLMClient", "checked_position",
           "is_served", "parse_top_logprobs"]

T = TypeVar("T")


def _http_client(timeout: float) -> httpx.Client:
    """A connection pool waiting ``timeout`` seconds for an answer, at most 10 to connect."""
    import httpx

    return httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))


def _retried() -> tuple[type[Exception], ...]:
    """The transport failures a request is retried after (a timeout, a dropped connection)."""
    import httpx

    return httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError


class ServerError(RuntimeError):
    """The server refused a request (4xx) or answered something this client cannot read."""


class ServerUnavailable(ServerError):
    """The server did not answer after every retry (timeouts, refused connections, 5xx answers)."""


class InvalidLogprobs(ServerError):
    """The server answered log-probabilities that cannot be right: missing, not finite, for another token or
    sequence length, or more than probability 1. Retrying would not help (the server answers alike)."""


PREFIX_CACHE_HINT = (
    "The likely cause is vLLM's prefix caching, which has returned missing (None) and stale prompt "
    "log-probabilities for positions read from its cache (vllm #13409, #3251, #42019): restart the server with "
    "--no-enable-prefix-caching (make serve and the tests' VLLMServer pass it). Nothing of this request was "
    "stored in the logit cache.")
"""Appended to every :class:`InvalidLogprobs` message: what to change on the server's side."""

MASS_TOLERANCE = 1e-3
"""How far above 1 the answered probabilities of one position may sum (float32 rounding of up to ``V`` terms)
before the answer is refused as not a distribution."""


def is_served(name_or_url: str | None) -> bool:
    """Whether a model name is a server's address (``http://HOST:PORT/v1``) rather than an id or directory."""
    return name_or_url is not None and name_or_url.startswith(("http://", "https://"))


def parse_top_logprobs(entry: dict[str, float] | None) -> dict[int, float]:
    """``{"token_id:17": -0.3, ...}`` (``return_tokens_as_token_ids``) or ``{"17": {"logprob": -0.3}}``
    (``prompt_logprobs``) -> ``{17: -0.3}``. Values that are not numbers (``null``) become NaN, for
    :func:`checked_position` to refuse.

    Raises:
        ServerError: a key that is not a token id (the server ignored ``return_tokens_as_token_ids``).
    """
    out: dict[int, float] = {}
    for key, value in (entry or {}).items():
        token = key.removeprefix("token_id:")
        if not token.lstrip("-").isdigit():
            raise ServerError(f"The server keyed a log-probability by {key!r}, not a token id: it does not support "
                              "return_tokens_as_token_ids (vLLM >= 0.5 does).")
        number = value.get("logprob") if isinstance(value, dict) else value
        out[int(token)] = float(number) if isinstance(number, (int, float)) else math.nan
    return out


def checked_position(entry: Any, token: int | None, k: int) -> tuple[dict[int, float], str | None]:
    """One position's answer read (token id -> log-probability) and what is wrong with it (``None`` when
    nothing is): ``entry`` as the server sent it, ``token`` the prompt's token at that position (``None`` for the
    next-token answer), ``k`` the top-k asked.

    Raises:
        ServerError: a key that is not a token id (see :func:`parse_top_logprobs`).
    """
    if entry is None:
        return {}, "no log-probabilities (None)"
    if not isinstance(entry, dict) or not entry:
        return {}, f"no log-probabilities ({entry!r:.80})"
    answer = parse_top_logprobs(entry)
    return answer, _fault(answer, token, k)


def _fault(answer: dict[int, float], token: int | None, k: int) -> str | None:
    """Single passes over C-level iterators: with the whole vocabulary asked, ``answer`` has ``V`` entries for
    every position."""
    if not all(map(math.isfinite, answer.values())):
        i, v = next((i, v) for i, v in answer.items() if not math.isfinite(v))
        return f"a log-probability that is not finite ({v} for token {i})"
    if token is not None and token not in answer:
        return (f"no log-probability for the prompt's token {token} (values for another token or sequence: "
                "a stale answer)")
    if len(answer) < k:
        return f"{len(answer)} log-probabilities where {k} were asked"
    if max(answer.values()) > MASS_TOLERANCE:
        return f"a log-probability above 0 ({max(answer.values())})"
    mass = math.fsum(map(math.exp, answer.values()))
    if mass > 1 + MASS_TOLERANCE:
        return f"probabilities summing to {mass:.4f} > 1 (not one distribution: a stale or mixed answer)"
    return None


@dataclass
class VLLMClient:
    """Log-probabilities from a vLLM server.

    Args:
        url: the OpenAI-compatible base, ``http://HOST:PORT/v1``.
        timeout: seconds to wait for an answer (connecting: ``min(timeout, 10)``).
        retries: further attempts after a failed one (timeouts, refused connections, 5xx).
        backoff: seconds before the first retry, doubled at each further one.
        concurrency: requests in flight at once for a batch.

    Raises:
        ValueError: a URL that is not ``http(s)://HOST:PORT/v1``.
    """

    url: str
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 1.0
    concurrency: int = 16

    def __post_init__(self) -> None:
        if not is_served(self.url) or not self.url.rstrip("/").endswith("/v1"):
            raise ValueError(f"A served large model is given as http://HOST:PORT/v1, got {self.url!r}.")
        self.base = self.url.rstrip("/")
        self.root = self.base.removesuffix("/v1")
        self._http = _http_client(self.timeout)
        self._model: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # the connection pool does not pickle (checkpoints, spawn)
        return {k: v for k, v in self.__dict__.items() if k != "_http"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._http = _http_client(self.timeout)

    def close(self) -> None:
        self._http.close()

    # --- transport ------------------------------------------------------------------------------------------

    def _request(self, method: str, url: str, payload: dict[str, Any] | None = None) -> Any:
        """One JSON request with the retry policy of the module docstring."""
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._http.request(method, url, json=payload)
            except _retried() as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise ServerError(f"The large model's server {self.root} refused {method} {url}: HTTP "
                                  f"{response.status_code}: {response.text[:500]}")
            try:
                return response.json()
            except ValueError as err:
                raise ServerError(f"The large model's server {self.root} answered {url} with no JSON: "
                                  f"{response.text[:200]!r}") from err
        raise ServerUnavailable(
            f"The large model's server {self.root} did not answer {method} {url} after {self.retries + 1} tries "
            f"({last}). Check that it runs (make serve MODEL=...) and is reachable; a disk logit cache keeps every "
            "sequence already answered, so resuming from the last checkpoint asks only for the rest.")

    def map(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        """``fn`` over ``items`` with up to ``concurrency`` requests in flight; results in order."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # --- endpoints ------------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The ``/v1/models`` entries (``id``, ``root``, ``max_model_len``, ...)."""
        return self._request("GET", f"{self.base}/models")["data"]

    @property
    def model(self) -> str:
        """The served model's name (the first of ``/v1/models``), sent with every completion."""
        if self._model is None:
            served = self.models()
            if not served:
                raise ServerError(f"The server {self.root} serves no model.")
            self._model = served[0]["id"]
        return self._model

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The server tokenizer's ids of ``text``."""
        answer = self._request("POST", f"{self.root}/tokenize",
                               {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens})
        return [int(t) for t in answer["tokens"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        """The server tokenizer's text of ``ids``."""
        return self._request("POST", f"{self.root}/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"]

    def completion_logprobs(self, ids: Sequence[int], k: int, prompt: bool) -> list[dict[int, float]]:
        """Log-probabilities for one token sequence: with ``prompt``, one dict per position ``t`` of
        ``log p(. | ids[:t+1])`` (top-k plus, from the prompt's logprobs, the actual token ``ids[t+1]``);
        without, only the last position's. Each dict maps token id -> log-probability (natural log).

        Raises:
            InvalidLogprobs: an answer that cannot be right (see the module docstring), naming the server, the
                request, the position and the likely cause.
            ServerError, ServerUnavailable: see the module docstring.
        """
        ids = [int(i) for i in ids]
        payload: dict[str, Any] = {"model": self.model, "prompt": ids, "max_tokens": 1,
                                   "temperature": 0.0, "logprobs": k, "return_tokens_as_token_ids": True}
        if prompt:
            payload["prompt_logprobs"] = k
        choice = self._request("POST", f"{self.base}/completions", payload)["choices"][0]
        request = (f"POST {self.base}/completions for a prompt of {len(ids)} token ids {ids[:8]}"
                   f"{'...' if len(ids) > 8 else ''} ({'prompt_logprobs' if prompt else 'logprobs'}={k})")
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        last, fault = checked_position(tops[0], None, k)
        if fault:
            raise InvalidLogprobs(f"The large model's server {self.root} answered {request} with {fault} for the "
                                  f"next token (position {len(ids) - 1}). {PREFIX_CACHE_HINT}")
        if not prompt:
            return [last]
        given = choice.get("prompt_logprobs")
        if not isinstance(given, list) or len(given) != len(ids):
            raise InvalidLogprobs(
                f"The large model's server {self.root} answered {request} with "
                f"{'no' if not isinstance(given, list) else len(given)} prompt log-probabilities for {len(ids)} "
                f"tokens (a stale answer for another sequence). {PREFIX_CACHE_HINT}")
        answers = []
        for t in range(1, len(ids)):
            answer, fault = checked_position(given[t], ids[t], k)
            if fault:
                raise InvalidLogprobs(
                    f"The large model's server {self.root} answered {request} with {fault} at prompt position {t} "
                    f"(log p(token {ids[t]} | the {t} tokens before)). {PREFIX_CACHE_HINT}")
            answers.append(answer)
        return answers + [last]
