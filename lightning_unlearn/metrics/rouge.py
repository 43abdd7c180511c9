"""ROUGE-L F1 of generations, MUSE's verbmem and knowmem score (Shi et al. 2024; open-unlearning's MUSE
evaluation), with the knowledge-memorization prompt and the cut of its answers. Min-K%, the membership AUC, privleak
and extraction strength are TOFU's functions (:mod:`lightning_unlearn.metrics.functional`), applied to MUSE's
sets by :mod:`lightning_unlearn.evaluation.muse`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .tofu import PerSampleMean

KNOWMEM_EXAMPLE = "Question: {question}\nAnswer: {answer}\n\n"
KNOWMEM_QUESTION = "Question: {question}\nAnswer:"
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")
"""Where a knowmem answer ends: generation runs on past the answer into the next few-shot turn."""


def rouge_l_f1(predictions: Sequence[str | None], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each generation against its reference (``rouge_score``'s ``rougeL`` F-measure, stemmed).

    ``F1 = 2 P R / (P + R)`` with ``P = LCS / |prediction|`` and ``R = LCS / |reference|`` in tokens (lower-cased
    words), 0 when either side is empty. MUSE scores verbatim and knowledge memorization with F1, not TOFU's
    recall: a continuation that rambles on past the reference is penalised. Stemmed (Porter) as
    open-unlearning's ROUGE, which reports ``rougeL_f1`` for MUSE from the scorer that gives TOFU's recall.
    A prediction ``None`` (a generation that read non-finite logits) scores NaN.

    Raises:
        ValueError: when the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    from rouge_score import rouge_scorer  # imports all of NLTK: only when a generation is scored

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [math.nan if pred is None else scorer.score(ref, pred)["rougeL"].fmeasure
            for pred, ref in zip(predictions, references)]


def knowmem_prompt(question: str, examples: Sequence[tuple[str, str]]) -> str:
    """The few-shot prompt of a knowmem question: the in-context ``(question, answer)`` examples, each as
    ``Question: q\\nAnswer: a`` followed by a blank line, then ``Question: {question}\\nAnswer:``.

    The format is MUSE's and open-unlearning's (``Question: `` / ``Answer: `` tags, a blank line after each
    answer), without the space after the last ``Answer:``: byte-level BPE and SentencePiece tokenizers attach
    a word's leading space to the word, so a prompt ending in a bare space asks for a token sequence the model
    never saw in training.
    """
    shots = "".join(KNOWMEM_EXAMPLE.format(question=q, answer=a) for q, a in examples)
    return shots + KNOWMEM_QUESTION.format(question=question)


def cut_answer(text: str | None, stops: Sequence[str] = KNOWMEM_STOPS) -> str | None:
    """``text`` up to the first of ``stops`` (open-unlearning's knowmem stop words), stripped; ``None`` (no
    generation: it read non-finite logits) stays ``None``."""
    if text is None:
        return None
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end].strip()


class RougeLF1(PerSampleMean):
    """``*_verbmem_ROUGE``, ``*_knowmem_ROUGE``: mean ROUGE-L F1 of generations (see :func:`rouge_l_f1`); NaN
    if a generation is ``None``."""

    higher_is_better = None  # high on retain knowledge is good, on forget knowledge bad

    def update(self, preds: Sequence[str | None], refs: Sequence[str], index: Tensor | None = None) -> None:
        scores = torch.tensor(rouge_l_f1(preds, refs), dtype=torch.float64, device=self.device)
        self._append(scores, index)
