"""Full-vocabulary log-probability rows from a server's top-k answer, and why log-probabilities suffice.

Why log-probabilities replace logits
    A served model returns ``log p_L = z_L - logsumexp(z_L)``, not its logits. Per position the two differ by
    a constant ``c``, and ``softmax(z + c) = softmax(z)``; the offset model's logits
    ``z_L + alpha (z_S - z_S0)`` shift by the same ``c`` when ``log p_L`` replaces ``z_L``, so its next-token
    distribution, every loss built on it by ``log_softmax`` (NLL, NPO, DPO, KL), its argmax (greedy decoding)
    and every TOFU metric are unchanged. (Offset unlearning: Huang et al., "Offset Unlearning for Large
    Language Models", 2024, eq. 2, combines logits; the shift invariance is that of softmax.)

The top-k approximation
    A server answers ``k`` tokens per position (vLLM's ``prompt_logprobs`` / ``logprobs``: the ``k`` most
    likely, plus the actual next token when it is outside them). The other ``V - n`` tokens of the
    vocabulary (``n`` tokens answered) get the remaining mass ``r = 1 - sum exp(answered)`` spread evenly:
    ``log(r / (V - n))`` each. The row is again a distribution, the answered tokens' log-probabilities are
    exact, and every unanswered token is given the same value, below the answered ones in any well-ordered
    answer. With ``k >= V`` nothing is filled in and the row is the server's log-softmax. What the fill
    loses is the shape of the tail: the offset ``alpha (z_S - z_S0)`` can lift a tail token above the head
    only through its own term, since ``z_L`` no longer ranks tail tokens; ``benchmarks/served_large.py``
    measures what this costs for ``k`` in {5, 20, 100, full}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["MIN_TAIL_MASS", "dense_logprobs", "dense_rows"]

MIN_TAIL_MASS = 1e-30
"""Floor of the remaining mass ``r``: rounding in the server's float32 can make the answered mass reach 1 with
tokens still unanswered; the floor keeps their log-probability finite (about -69 - log(V - n)) instead of
``-inf``, which a float16 cache and the offset's arithmetic could not carry."""


def dense_logprobs(answer: Mapping[int, float], vocab_size: int) -> Tensor:
    """One position's log-probabilities over the whole vocabulary, float32 ``[vocab_size]``.

    Ids from ``V`` on are dropped: they are rows of an embedding padded past the tokenizer (families pad to
    multiples of 64 or 128), which no token has; the in-process offset drops them too
    (:func:`~lightning_unlearn.offset.generation.combine_logits`), and their mass joins the fill.

    Args:
        answer: token id -> log-probability for the tokens the server returned (top-k and the actual token).
        vocab_size: ``V``, the shared tokenizer's vocabulary size.

    Raises:
        ValueError: an empty answer, a value that is not finite, or a negative id: not a server's answer (the
            client refuses those first, naming the server; filling an empty row would make it uniform).
    """
    if not answer:
        raise ValueError("No log-probabilities to fill a row from: an empty answer would become a uniform row.")
    if not all(math.isfinite(v) for v in answer.values()):
        raise ValueError(f"A log-probability that is not finite cannot be filled into a row: {dict(answer)!r:.200}")
    kept = {i: v for i, v in answer.items() if i < vocab_size}
    ids = torch.tensor(list(kept.keys()), dtype=torch.long)
    values = torch.tensor(list(kept.values()), dtype=torch.float64)
    if len(ids) and int(ids.min()) < 0:
        raise ValueError(f"The server answered a negative token id {int(ids.min())}.")
    rest = vocab_size - len(ids)
    fill = 0.0
    if rest > 0:
        mass = max(1.0 - float(values.exp().sum()), MIN_TAIL_MASS)
        fill = math.log(mass) - math.log(rest)
    row = torch.full((vocab_size,), fill, dtype=torch.float64)
    row[ids] = values
    return row.float()


def dense_rows(answers: Sequence[Mapping[int, float]], vocab_size: int) -> Tensor:
    """:func:`dense_logprobs` of several positions, stacked: float32 ``[len(answers), vocab_size]``."""
    if not answers:
        return torch.empty(0, vocab_size)
    return torch.stack([dense_logprobs(a, vocab_size) for a in answers])
