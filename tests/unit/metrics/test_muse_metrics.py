"""MUSE's metrics against hand-computed values: ROUGE-L F1, the few-shot prompt, Min-K% AUC and privleak's sign,
and the evaluation that assembles them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_unlearn.evaluation.muse import MuseEvaluation, MuseReference
from lightning_unlearn.metrics.functional import IGNORE_INDEX, mia_auc, min_k_score, privleak
from lightning_unlearn.metrics.rouge import cut_answer, knowmem_prompt, rouge_l_f1


def test_rouge_l_f1_on_known_strings() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F1 = 5/6
    assert rouge_l_f1(["the cat lay on the mat"], ["the cat sat on the mat"]) == [pytest.approx(5 / 6)]
    # a prefix: P = 2/2, R = 2/6, F1 = 2PR/(P+R) = 0.5 (TOFU's recall would say 1/3)
    assert rouge_l_f1(["the cat"], ["the cat sat on the mat"]) == [pytest.approx(0.5)]
    # saying more: P = 2/4, R = 1, F1 = 2/3 (recall would say 1)
    assert rouge_l_f1(["Paris it is then"], ["Paris it"]) == [pytest.approx(2 / 3)]
    assert rouge_l_f1(["cats"], ["cat"]) == [1.0], "stemmed, as open-unlearning's scorer"
    assert rouge_l_f1([""], ["anything"]) == [0.0]
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        rouge_l_f1(["a"], ["a", "b"])


def test_knowmem_prompt_and_answer_cut() -> None:
    prompt = knowmem_prompt("Who?", [("Q1?", "A1."), ("Q2?", "A2.")])
    assert prompt == "Question: Q1?\nAnswer: A1.\n\nQuestion: Q2?\nAnswer: A2.\n\nQuestion: Who?\nAnswer:"
    assert cut_answer(" Paris.\n\nQuestion: next") == "Paris."
    assert cut_answer("Paris.\nQuestion: next") == "Paris."
    assert cut_answer("  Rome  ") == "Rome"


def test_min_k_auc_and_privleak_by_hand() -> None:
    """Min-K% (k = 0.4) of 5 tokens averages the 2 lowest log-probs; AUC = P(holdout score > forget score)."""
    logprobs = torch.tensor([[-0.1, -0.2, -3.0, -0.1, -0.1],   # forget A: -(-3.0 - 0.2)/2 = 1.6
                             [-0.5, -0.5, -0.5, -0.5, -0.5],   # forget B: 0.5
                             [-2.0, -1.0, -4.0, -1.0, -1.0],   # holdout C: 3.0
                             [-0.3, -0.4, -1.0, -0.2, -0.2]])  # holdout D: 0.7
    scores = min_k_score(logprobs, torch.ones_like(logprobs, dtype=torch.bool), 0.4)
    assert scores.tolist() == pytest.approx([1.6, 0.5, 3.0, 0.7])
    auc = mia_auc(scores[:2], scores[2:])
    assert auc == pytest.approx(0.75)  # C beats A and B, D beats B only: 3 of 4 pairs
    # MUSE's sign: a model whose forget texts look more like training data than the retrained model's
    # (higher AUC) leaks: negative; as the retrained model: 0; over-unlearned (lower AUC): positive.
    assert privleak(auc, 0.5) == pytest.approx(-50.0)
    assert privleak(0.5, 0.5) == pytest.approx(0.0)
    assert privleak(0.3, 0.5) == pytest.approx(40.0)


def bigram_logits(table: torch.Tensor):
    """A stand-in model: logits at a position are the row of ``table`` for the token there (a bigram model)."""
    return lambda ids, mask: table[ids]


def sequence_batch(name: str, rows: list[list[int]], labelled_from: int = 1) -> dict:
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :labelled_from] = IGNORE_INDEX
    return {"set": name, "index": torch.arange(len(rows)), "references": ["x"] * len(rows),
            "inputs": [None] * len(rows),
            "sequence": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}}


def test_the_evaluation_scores_privleak_extraction_and_rouge(tmp_path: Path) -> None:
    vocab = 6
    table = torch.zeros(vocab, vocab)
    table[1, 2] = table[2, 3] = table[3, 1] = 8.0  # the model knows the cycle 1 -> 2 -> 3 -> 1
    evaluation = MuseEvaluation(["verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak_forget",
                                 "privleak_holdout"], MuseReference(0.5), max_new_tokens=64)
    evaluation.update(sequence_batch("privleak_forget", [[1, 2, 3, 1], [2, 3, 1, 2]]), bigram_logits(table), None)
    evaluation.update(sequence_batch("privleak_holdout", [[4, 5, 4, 5], [5, 4, 4, 5]]), bigram_logits(table), None)
    asked: list[int] = []

    def generate(ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> list[str]:
        asked.append(max_new_tokens)
        return {"verbmem": ["the cat lay on the mat"], "knowmem": ["Paris\n\nQuestion: and Rome?"]}[kind]

    kind = "verbmem"
    verbmem = sequence_batch("verbmem_forget", [[4, 1, 2, 3, 5]], labelled_from=2)  # 2, 3 right; 5 wrong
    verbmem.update(references=["the cat sat on the mat"], inputs=["prompt"],
                   prompt={"input_ids": torch.tensor([[4, 1]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)})
    evaluation.update(verbmem, bigram_logits(table), generate)
    kind = "knowmem"
    for name, reference in (("knowmem_forget", "Paris"), ("knowmem_retain", "Paris, France")):
        evaluation.update({"set": name, "index": torch.tensor([0]), "references": [reference], "inputs": ["Where?"],
                           "prompt": verbmem["prompt"]}, bigram_logits(table), generate)
    summary, report = evaluation.compute()
    assert asked == [64, 32, 32], "128 new tokens for verbmem and 32 for knowmem, capped by max_new_tokens"
    assert summary["mia_min_k"] == 1.0, "every forget text is likelier than every holdout text"
    assert summary["privleak"] == pytest.approx(-100.0)
    assert summary["forget_verbmem_ROUGE"] == pytest.approx(5 / 6)
    assert summary["forget_knowmem_ROUGE"] == 1.0 and summary["retain_knowmem_ROUGE"] == pytest.approx(2 / 3)
    # labels 2, 3, 5 after the prompt: the last is wrong, so k = 2 of 3 and ES = 1 - 2/3
    assert summary["extraction_strength"] == pytest.approx(1 / 3)
    entry = report["forget_knowmem_ROUGE"]["value_by_index"]["0"]
    assert entry == {"rougeL_f1": 1.0, "input": "Where?", "ground_truth": "Paris", "generation": "Paris"}
    assert set(report["mia_min_k"]["forget"]["value_by_index"]) == {"0", "1"}
    path = tmp_path / "MUSE_EVAL.json"
    path.write_text(json.dumps(report))
    assert MuseReference.from_file(path).mia_min_k == 1.0


def test_without_a_holdout_or_a_reference_privleak_is_missing() -> None:
    table = torch.zeros(4, 4)
    evaluation = MuseEvaluation(["privleak_forget", "privleak_holdout"], None)
    evaluation.update(sequence_batch("privleak_forget", [[1, 2, 3]]), bigram_logits(table), None)
    summary, _ = evaluation.compute()
    assert "mia_min_k" not in summary and summary["privleak"] is None
    evaluation.update(sequence_batch("privleak_holdout", [[3, 2, 1]]), bigram_logits(table), None)
    summary, _ = evaluation.compute()
    assert summary["mia_min_k"] == 0.5 and summary["privleak"] is None


def test_a_reference_without_min_k_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps({"forget_truth_ratio": {}}))
    with pytest.raises(ValueError, match="no mia_min_k.agg_value"):
        MuseReference.from_file(path)
    with pytest.raises(FileNotFoundError, match="MUSE_EVAL.json written by"):
        MuseReference.from_file(tmp_path / "missing.json")


def test_privleak_scores_are_min_k_with_k_0_4() -> None:
    """Five targets: Min-K% at k = 0.4 averages the 2 lowest log-probs (k = 0.2 would take 1)."""
    table = torch.zeros(6, 6)
    table[4, 5] = 2.0
    evaluation = MuseEvaluation(["privleak_forget", "privleak_holdout"])
    evaluation.update(sequence_batch("privleak_forget", [[1, 2, 3, 1, 2, 3]]), bigram_logits(table), None)
    evaluation.update(sequence_batch("privleak_holdout", [[4, 5, 4, 4, 5, 4]]), bigram_logits(table), None)
    _, report = evaluation.compute()
    # targets 5 | 4, 4 | 5, 5 | 4, 4 | 5: log-probs 2 - log(5 + e^2), -log 6, -log(5 + e^2), the first, the second
    lowest_two = (math.log(5 + math.e ** 2) + math.log(6)) / 2
    assert report["mia_min_k"]["holdout"]["value_by_index"]["0"]["score"] == pytest.approx(lowest_two)
    assert report["mia_min_k"]["forget"]["value_by_index"]["0"]["score"] == pytest.approx(math.log(6))
