"""The TOFU evaluation driver against a straightforward computation, on a tiny model that has memorised its data.

``TofuEvaluation`` shares forward passes between metrics, batches samples of several sets together, pads them,
splits perturbed answers into chunks and gathers states; each of these can put the right formula on the wrong
tensor. Here a tiny model is trained until it half knows the answers of a few TOFU rows (so that probabilities,
truth ratios, exact memorization and ROUGE are far from 0 and 1, where wrong wiring would still give the right
number), the driver evaluates it exactly as the test loop does, and every per-sample value is compared with the
plain way: one unpadded forward pass per answer, the formulas written out below (log-softmax, gather, masks),
one greedy generation per prompt. Forget quality is compared with ``scipy.stats.ks_2samp`` against a reference
file written here, privleak with AUCs counted pair by pair.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

import pytest
import torch
from rouge_score import rouge_scorer
from scipy import stats

from lightning_unlearn.data.datamodule import UnlearnDataModule
from lightning_unlearn.data.formatting import PromptFormatter, pad_batch
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.data.tofu_eval import tofu_eval_specs
from lightning_unlearn.evaluation.tofu import PROB_NAME, TRUTH_NAME
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.models.tiny import build_tiny_llama
from lightning_unlearn.modules import GA

SUBSET, MAX_LENGTH, MAX_NEW_TOKENS, MIN_K = 4, 256, 24, 0.3  # not the default 0.4: the driver must use its own k
SPECS = {spec.name: spec for spec in tofu_eval_specs("forget01", None, None)}
# Forget quality and privleak are computed against these, as if a retain model had written them.
REFERENCE_RATIOS = [0.35, 0.6, 0.9, 1.3, 2.5]
REFERENCE_MIA_MIN_K = 0.38
REFERENCE_MODEL_UTILITY = 0.8


def records(name: str) -> list[dict[str, Any]]:
    return load_split("bundled", SPECS[name].split)[:SUBSET]


# What the model is trained on, by set: ``answer`` rows, rows trained on their first ``perturbed`` (wrong) answer
# instead, so that their truth ratio is above 1; the other rows of the evaluated subset are never seen, and
# neither are paraphrases. One holdout row is trained on, so that membership scores overlap.
TRAINED = {"forget": {"answer": [0, 1, 2], "perturbed": [3]}, "retain": {"answer": [0, 1, 2], "perturbed": []},
           "ra": {"answer": [0, 1], "perturbed": [2]}, "wf": {"answer": [0, 1], "perturbed": [2]},
           "holdout": {"answer": [0], "perturbed": []}}
STEPS = 45


@pytest.fixture(scope="session")
def memorised(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model trained (full batch, AdamW) on the ``TRAINED`` rows until it knows them in part; saved with its
    tokenizer."""
    folder = tmp_path_factory.mktemp("memorised") / "model"
    tokenizer = load_tokenizer(tiny_world["tokenizer"])
    formatter = PromptFormatter(tokenizer, max_length=MAX_LENGTH)
    examples = []
    for name, which in TRAINED.items():
        rows = records(name)
        examples += [formatter.encode(rows[i]["question"], rows[i]["answer"]) for i in which["answer"]]
        examples += [formatter.encode(rows[i]["question"], rows[i]["perturbed_answer"][0]) for i in which["perturbed"]]
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_tiny_llama(tokenizer, hidden_size=48, num_layers=2, num_heads=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(STEPS):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# --- the straightforward way ----------------------------------------------------------------------------------


class Plain:
    """Per-sample TOFU values the plain way: one unpadded pass per (question, answer), formulas by hand."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, "float32").eval()
        self.formatter = PromptFormatter(self.tokenizer, max_length=MAX_LENGTH)
        self.vocab = len(self.tokenizer)

    @torch.no_grad()
    def tokens(self, question: str, answer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each answer token (EOS last): its log-prob, whether it is the argmax, and the full log-softmax."""
        encoded = self.formatter.encode(question, answer)
        ids = torch.tensor([encoded.input_ids])
        logits = self.model(input_ids=ids).logits[0, :, : self.vocab].double()
        logp = torch.log_softmax(logits, dim=-1)
        positions = [t for t, label in enumerate(encoded.labels) if label != -100]
        rows = logp[[t - 1 for t in positions]]  # the position before a token predicts it
        targets = torch.tensor([encoded.labels[t] for t in positions])
        return rows[torch.arange(len(positions)), targets], rows.argmax(dim=-1) == targets, rows

    def mean_nll(self, question: str, answer: str) -> float:
        return float(-self.tokens(question, answer)[0].mean())

    def em(self, question: str, answer: str) -> float:
        return float(self.tokens(question, answer)[1][:-1].double().mean())  # EOS left out

    def es(self, question: str, answer: str) -> float | None:
        """``1 - k/|y|`` with k the first token from which every argmax is right; None if the last is wrong (those
        samples' value is a convention that differs between implementations)."""
        right = self.tokens(question, answer)[1][:-1].tolist()
        if not right[-1]:
            return None
        k = len(right)
        while k > 0 and right[k - 1]:
            k -= 1
        return 1 - k / len(right)

    def min_k(self, question: str, answer: str, plus_plus: bool = False) -> float:
        logp, _, rows = self.tokens(question, answer)
        logp, rows = logp[:-1], rows[:-1]  # EOS left out
        if plus_plus:
            probs = rows.exp()
            mu = (probs * rows).sum(dim=-1)
            sigma = ((probs * rows**2).sum(dim=-1) - mu**2).clamp(min=1e-6).sqrt()
            logp = (logp - mu) / sigma
        lowest = sorted(logp.tolist())[: max(1, math.floor(MIN_K * len(logp)))]
        return -sum(lowest) / len(lowest)

    @torch.no_grad()
    def generation(self, question: str) -> str:
        prompt = torch.tensor([self.formatter.prompt_ids(question)])
        out = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=MAX_NEW_TOKENS, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()

    def evaluate(self) -> dict[str, dict[str, list]]:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        per: dict[str, dict[str, list]] = {}
        for name, spec in SPECS.items():
            out = per.setdefault(name, {})
            for r in records(name):
                q, a = r["question"], r["answer"]
                if name != "holdout":
                    out.setdefault("prob", []).append(math.exp(-self.mean_nll(q, a)))
                    correct = self.mean_nll(q, r[spec.correct_key])
                    wrong = [self.mean_nll(q, w) for w in r[spec.perturbed_key]]
                    out.setdefault("truth", []).append(math.exp(correct - sum(wrong) / len(wrong)))
                    text = self.generation(q)
                    out.setdefault("generation", []).append(text)
                    out.setdefault("rouge", []).append(scorer.score(a, text)["rougeL"].recall)
                if name in ("ra", "wf"):
                    p_true, p_wrong = math.exp(-self.mean_nll(q, a)), [math.exp(-self.mean_nll(q, w))
                                                                      for w in r[spec.perturbed_key]]
                    out.setdefault("prob_norm", []).append(p_true / (p_true + sum(p_wrong)))
                if name == "forget":
                    out.setdefault("em", []).append(self.em(q, a))
                    out.setdefault("es", []).append(self.es(q, a))
                if name in ("forget", "holdout"):
                    loss = self.mean_nll(q, a)
                    out.setdefault("mia_loss", []).append(loss)
                    out.setdefault("mia_zlib", []).append(loss / len(zlib.compress(a.encode("utf-8"))))
                    out.setdefault("mia_min_k", []).append(self.min_k(q, a))
                    out.setdefault("mia_min_k_plus_plus", []).append(self.min_k(q, a, plus_plus=True))
        return per


def auc(forget: list[float], holdout: list[float]) -> float:
    """P(holdout score > forget score) + P(tie) / 2, counted over every pair."""
    pairs = [(h > f) + 0.5 * (h == f) for f in forget for h in holdout]
    return sum(pairs) / len(pairs)


# --- the driver, run as the test loop runs it -----------------------------------------------------------------


def run_driver(model_dir: str, reference: str, eval_batch_size: int) -> tuple[dict, dict, dict]:
    """Summary, report and the membership scores of each attack (forget then holdout, in dataset order)."""
    dm = UnlearnDataModule(forget_split="forget01", retain_split="retain99", evaluation="tofu", eval_subset=SUBSET,
                           eval_batch_size=eval_batch_size, max_length=MAX_LENGTH)
    module = GA(small_model=model_dir, retain_reference=reference, max_new_tokens=MAX_NEW_TOKENS)
    module.setup("test")
    dm.connect(module.tokenizer, module.parts)
    dm.setup("test")
    module.configure_model()
    module.build_evaluation([spec.name for spec in dm.eval_specs()])
    module.evaluation.min_k = MIN_K
    module.eval()
    with torch.inference_mode():
        for batch in dm.test_dataloader()[0]:
            for part in batch["parts"]:
                module.evaluation.update(part, module, module.generate_texts)
        summary, report = module.evaluation.compute()
    mia = {}
    for key, metric in module.evaluation.mia.items():
        scores, holdout = metric.per_sample(), metric.holdout_mask()
        mia[key] = {"forget": scores[~holdout].tolist(), "holdout": scores[holdout].tolist()}
    return summary, report, mia


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A hand-written ``TOFU_EVAL.json`` of a retain model: forget truth ratios and the Min-K% AUC."""
    path = tmp_path_factory.mktemp("reference") / "TOFU_EVAL.json"
    path.write_text(json.dumps({
        "forget_truth_ratio": {"agg_value": 0.5, "value_by_index": {str(i): {"score": r}
                                                                     for i, r in enumerate(REFERENCE_RATIOS)}},
        "mia_min_k": {"agg_value": REFERENCE_MIA_MIN_K},
        "model_utility": {"agg_value": REFERENCE_MODEL_UTILITY},
    }))
    return str(path)


@pytest.fixture(scope="module")
def plain(memorised: str) -> dict[str, dict[str, list]]:
    return Plain(memorised).evaluate()


@pytest.fixture(scope="module")
def driver(memorised: str, reference_file: str) -> tuple[dict, dict, dict]:
    """Batches of 3 mix the sets and pad forget, paraphrased and perturbed answers of different lengths."""
    return run_driver(memorised, reference_file, eval_batch_size=3)


PER_SAMPLE = [  # (report key, field, set, plain key)
    *[(PROB_NAME[n], "prob", n, "prob") for n in ("forget", "retain", "ra", "wf")],
    *[(TRUTH_NAME[n], "score", n, "truth") for n in ("forget", "retain", "ra", "wf")],
    *[(f"{n}_Q_A_Prob_normalised", "prob", n, "prob_norm") for n in ("ra", "wf")],
    *[(f"{n}_Q_A_ROUGE", "rougeL_recall", n, "rouge") for n in ("forget", "retain", "ra", "wf")],
    *[(f"{n}_Q_A_ROUGE", "generation", n, "generation") for n in ("forget", "retain", "ra", "wf")],
    ("exact_memorization", "score", "forget", "em"),
    ("extraction_strength", "score", "forget", "es"),
]


def test_the_model_knows_its_data_in_part(plain: dict) -> None:
    """The comparisons below only have power if the values are far from 0 and 1 and on both sides of 1."""
    forget = plain["forget"]
    assert 0.3 < sum(forget["em"]) / SUBSET < 0.95 and min(forget["em"]) < 0.8
    assert any(0.1 < p < 0.9 for p in forget["prob"]) and any(0.05 < r < 0.95 for r in plain["retain"]["rouge"])
    for name in ("forget", "ra", "wf"):
        assert min(plain[name]["truth"]) < 0.7 and max(plain[name]["truth"]) > 1.3, name
    for name in ("ra", "wf"):
        assert any(0.05 < p < 0.95 for p in plain[name]["prob_norm"]), name
    assert sum(v is not None and 0 < v < 1 for v in forget["es"]) >= 2
    for key in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        assert 0.0 < auc(forget[key], plain["holdout"][key]) < 1.0, key


@pytest.mark.parametrize(("key", "field", "name", "plain_key"), PER_SAMPLE,
                         ids=[f"{k}.{f}" for k, f, _, _ in PER_SAMPLE])
def test_every_per_sample_value_equals_the_plain_computation(
    key: str, field: str, name: str, plain_key: str, plain: dict, driver: tuple
) -> None:
    by_index = driver[1][key]["value_by_index"]
    assert sorted(by_index, key=int) == [str(i) for i in range(SUBSET)]
    got = [by_index[str(i)][field] for i in range(SUBSET)]
    want = plain[name][plain_key]
    if plain_key == "es":  # only where the last token is right: elsewhere the value is a convention
        got, want = zip(*[(g, w) for g, w in zip(got, want) if w is not None])
    if field == "generation":
        assert got == want
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("key", ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"])
def test_membership_scores_and_aucs_equal_the_plain_computation(key: str, plain: dict, driver: tuple) -> None:
    summary, _, mia = driver
    assert mia[key]["forget"] == pytest.approx(plain["forget"][key], rel=1e-5)
    assert mia[key]["holdout"] == pytest.approx(plain["holdout"][key], rel=1e-5)
    assert summary[key] == pytest.approx(auc(plain["forget"][key], plain["holdout"][key]), abs=1e-12)


def test_aggregates_follow_the_tofu_definitions(plain: dict, driver: tuple) -> None:
    summary = driver[0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    want = {"exact_memorization": mean(plain["forget"]["em"]),
            "forget_truth_ratio": mean([min(r, 1 / r) for r in plain["forget"]["truth"]])}
    for name in ("forget", "retain", "ra", "wf"):
        want[PROB_NAME[name]] = mean(plain[name]["prob"])
        want[f"{name}_Q_A_ROUGE"] = mean(plain[name]["rouge"])
    for name in ("retain", "ra", "wf"):
        want[TRUTH_NAME[name]] = mean([max(0.0, 1 - r) for r in plain[name]["truth"]])
        if name != "retain":
            want[f"{name}_Q_A_Prob_normalised"] = mean(plain[name]["prob_norm"])
    utility = [want[k] for k in ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                                 "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                                 "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")]
    want["model_utility"] = len(utility) / sum(1 / u for u in utility)
    for key, value in want.items():
        assert summary[key] == pytest.approx(value, rel=1e-5), key


def test_forget_quality_is_the_ks_test_against_the_reference_file(plain: dict, driver: tuple) -> None:
    expected = stats.ks_2samp(plain["forget"]["truth"], REFERENCE_RATIOS).pvalue
    assert 0.01 < expected < 0.99, "a p-value at either end would not tell the samples apart"
    assert driver[0]["forget_quality"] == pytest.approx(expected, rel=1e-9)


def test_privleak_is_the_relative_gap_of_the_min_k_auc_to_the_reference(plain: dict, driver: tuple) -> None:
    score = 1 - auc(plain["forget"]["mia_min_k"], plain["holdout"]["mia_min_k"])
    reference = 1 - REFERENCE_MIA_MIN_K
    assert driver[0]["privleak"] == pytest.approx((score - reference) / reference * 100, rel=1e-6)


def test_utility_ratio_divides_by_the_reference_files_model_utility(driver: tuple) -> None:
    summary = driver[0]
    assert summary["model_utility_vs_retain"] == pytest.approx(summary["model_utility"] / REFERENCE_MODEL_UTILITY,
                                                               rel=1e-12)
