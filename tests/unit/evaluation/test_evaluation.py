"""The TOFU evaluation pipeline: evaluation data, report files, reference handling, generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.formatting import PromptFormatter
from lightning_unlearn.data.tofu_eval import (
    AnswerDataset,
    EvalCollection,
    EvalDataset,
    collate_answers,
    collate_collection,
    collate_eval,
    tofu_eval_specs,
)
from lightning_unlearn.evaluation.loss import LossEvaluation
from lightning_unlearn.sweep import sweep
from lightning_unlearn.evaluation.tofu import RetainReference
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import NPO, GA

ROOT = Path(__file__).resolve().parents[3]
TOFU_EVAL = str(ROOT / "configs" / "tests" / "tofu_eval.yaml")
SUMMARY_KEYS = {
    "forget_quality", "model_utility", "privleak", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
    "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
    "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio", "exact_memorization",
    "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus",
    "forget_nll", "retain_nll", "forget_truth_ratio_exact", "retain_Truth_Ratio_exact", "ra_Truth_Ratio_exact",
    "wf_Truth_Ratio_exact",
}


@pytest.fixture(scope="module")
def formatter(tiny_world: dict) -> PromptFormatter:
    return PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=256)


def test_specs_follow_the_forget_split() -> None:
    specs = {s.name: s.split for s in tofu_eval_specs("forget05", None, None)}
    assert specs == {"forget": "forget05_perturbed", "retain": "retain_perturbed", "ra": "real_authors_perturbed",
                     "wf": "world_facts_perturbed", "holdout": "holdout05"}
    assert "holdout" not in {s.name for s in tofu_eval_specs("mine", "mine_perturbed", None)}


def test_forget_batch_holds_every_answer_variant(formatter: PromptFormatter) -> None:
    spec = tofu_eval_specs("forget01", None, None)[0]
    dataset = EvalDataset.load(spec, "bundled", formatter, subset=3)
    batch = collate_eval([dataset[i] for i in range(3)], "forget", formatter.tokenizer.pad_token_id)
    assert batch["index"].tolist() == [0, 1, 2] and batch["num_perturbed"] == 5
    assert batch["perturbed"]["input_ids"].shape[0] == 15
    assert batch["correct"]["input_ids"].shape[0] == 3
    prompt = batch["prompt"]
    assert (prompt["attention_mask"][:, -1] == 1).all(), "prompts are left-padded for generation"
    first = dataset[0]
    n = len(first["prompt"])
    assert prompt["input_ids"][0, -n:].tolist() == first["prompt"]


def test_real_authors_use_the_answer_as_the_correct_variant(formatter: PromptFormatter) -> None:
    spec = next(s for s in tofu_eval_specs("forget01", None, None) if s.name == "ra")
    batch = collate_eval([EvalDataset.load(spec, "bundled", formatter)[0]], "ra", formatter.tokenizer.pad_token_id)
    assert "correct" not in batch and batch["num_perturbed"] == 3


def test_collection_regroups_mixed_batches_by_set(formatter: PromptFormatter) -> None:
    specs = tofu_eval_specs("forget01", None, None)
    collection = EvalCollection([EvalDataset.load(s, "bundled", formatter, subset=2) for s in specs])
    assert len(collection) == 10
    batch = collate_collection([collection[i] for i in (1, 2, 3, 9)], formatter.tokenizer.pad_token_id)
    assert [(p["set"], p["index"].tolist()) for p in batch["parts"]] == [
        ("forget", [1]), ("retain", [0, 1]), ("holdout", [1])]


def test_loss_mode_items_carry_their_index_in_their_set(formatter: PromptFormatter) -> None:
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    collection = EvalCollection([AnswerDataset("forget", records, formatter), AnswerDataset("retain", records[:2],
                                                                                               formatter)])
    batch = collate_answers([collection[i] for i in (2, 3, 4)], formatter.tokenizer.pad_token_id)
    assert [(p["set"], p["index"].tolist()) for p in batch["parts"]] == [("forget", [2]), ("retain", [0, 1])]
    assert batch["parts"][1]["answer"]["labels"].shape[0] == 2


def test_loss_evaluation_counts_a_repeated_sample_once() -> None:
    # p = (1/2, 1/4, 1/4) at every position: answer tokens 0 cost ln 2 each, tokens 1 cost ln 4.
    probs = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)

    def logits_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return probs.log().expand(*ids.shape, 3)

    def part(index: list[int], answers: list[list[int]]) -> dict:
        ids = torch.tensor([[2, *a] for a in answers])
        labels = ids.clone()
        labels[:, 0] = -100
        return {"set": "forget", "index": torch.tensor(index),
                "answer": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}}

    evaluation = LossEvaluation(["forget", "retain"])
    evaluation.update(part([0, 1], [[0, 0], [1, 1]]), logits_fn)
    evaluation.update(part([0], [[0, 0]]), logits_fn)  # sample 0 again, as a padded distributed sampler repeats it
    summary, report = evaluation.compute()
    ln2 = math.log(2.0)
    assert summary == {"forget_nll": pytest.approx((ln2 + 2 * ln2) / 2)}  # not (ln2 + 2 ln2 + ln2) / 3
    assert report["forget_nll"]["value_by_index"] == {"0": {"nll": pytest.approx(ln2)},
                                                      "1": {"nll": pytest.approx(2 * ln2)}}
    with pytest.raises(KeyError, match="holdout"):
        evaluation.update({**part([0], [[0]]), "set": "holdout"}, logits_fn)


def test_loss_evaluation_reports_a_set_after_one_without_samples() -> None:
    """A set that received nothing (forget, listed first) is left out of the summary, and the sets after it
    are still reported: the loop skips the empty one rather than stopping there."""
    probs = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    ids = torch.tensor([[2, 1, 1]])
    labels = torch.tensor([[-100, 1, 1]])
    evaluation = LossEvaluation(["forget", "retain"])
    evaluation.update({"set": "retain", "index": torch.tensor([0]),
                       "answer": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}},
                      lambda i, m: probs.log().expand(*i.shape, 3))
    summary, report = evaluation.compute()
    assert summary == {"retain_nll": pytest.approx(math.log(4.0))}
    assert list(report) == ["retain_nll"]


def test_missing_evaluation_split_says_what_to_set(formatter: PromptFormatter, tmp_path: Path) -> None:
    (tmp_path / "mine.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    spec = tofu_eval_specs("mine", None, None)[0]
    with pytest.raises(FileNotFoundError, match="data.evaluation: loss"):
        EvalDataset.load(spec, str(tmp_path), formatter)


def test_missing_reference_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="retain_reference"):
        RetainReference.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="forget_truth_ratio"):
        RetainReference.from_file(tmp_path / "bad.json")


def test_reference_file_gives_every_field_forget_quality_privleak_and_the_utility_ratio_read(tmp_path: Path) -> None:
    """The scores (null ones skipped), the retain model's Min-K% AUC and its model utility, as written in a
    TOFU_EVAL.json: each feeds a reported number (forget quality, privleak, model_utility_vs_retain)."""
    report = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {"0": {"score": 0.5}, "3": {"score": None},
                                                                          "7": {"score": 0.75}}},
              "mia_min_k": {"agg_value": 0.42}, "model_utility": {"agg_value": 0.91}}
    (tmp_path / "TOFU_EVAL.json").write_text(json.dumps(report))
    reference = RetainReference.from_file(tmp_path / "TOFU_EVAL.json")
    assert reference.forget_truth_ratios.tolist() == [0.5, 0.75]
    assert reference.forget_truth_ratios.dtype == torch.float64
    assert reference.mia_min_k == 0.42 and reference.model_utility == 0.91


def test_offset_generation_at_initialisation_is_the_large_models_greedy_output(tiny_world: dict) -> None:
    module = NPO(small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="float32")
    module.setup("test")
    module.configure_model()
    module.eval()
    tok = module.tokenizer
    tok.padding_side = "left"
    enc = tok(["Question: Who is Basil?\nAnswer:", "Question: Where?\nAnswer:"], return_tensors="pt", padding=True)
    ours = module.generate(enc["input_ids"], enc["attention_mask"], 12)
    large = load_causal_lm(tiny_world["large"]).eval()
    theirs = large.generate(**enc, do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs)
    direct = GA(small_model=tiny_world["small"])
    direct.setup("test")
    direct.configure_model()
    assert direct.generate(enc["input_ids"], enc["attention_mask"], 5).shape == (2, 5)


def run_test(world: dict, cwd: Path, *extra: str) -> Path:
    cli = main(["test", "--config", TOFU_EVAL, "--model", "NPO", "--model.small_model", world["small"],
                "--model.large_model", world["large"], "--trainer.callbacks", "null", *extra])
    return Path(cli.trainer.log_dir)


def test_test_writes_summary_and_per_sample_report(tiny_world: dict, tmp_cwd: Path) -> None:
    out = run_test(tiny_world, tmp_cwd)
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["forget_quality"] is None and summary["privleak"] is None, "no reference: missing, not a number"
    report = json.loads((out / "TOFU_EVAL.json").read_text())
    rouge = report["forget_Q_A_ROUGE"]["value_by_index"]
    assert set(rouge) == {"0", "1", "2"}
    assert {"rougeL_recall", "generation", "ground_truth", "input"} <= set(rouge["0"])
    assert set(report["forget_truth_ratio"]["value_by_index"]["2"]) == {"score"}
    assert report["forget_Q_A_Prob"]["agg_value"] == pytest.approx(summary["forget_Q_A_Prob"])
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temporary file"


def test_reference_gives_forget_quality_and_privleak(tiny_world: dict, tmp_cwd: Path) -> None:
    first = run_test(tiny_world, tmp_cwd)
    second = run_test(tiny_world, tmp_cwd, "--model.retain_reference", str(first / "TOFU_EVAL.json"))
    summary = json.loads((second / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_quality"] == pytest.approx(1.0)
    assert summary["privleak"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.timeout(300)  # a fit, four tests and a sweep in-process: about 15 s on one thread
def test_fit_evaluates_every_epoch_and_keeps_the_best_checkpoint(tiny_world: dict, tmp_cwd: Path) -> None:
    reference = run_test(tiny_world, tmp_cwd) / "TOFU_EVAL.json"
    cli = main(["fit", "--config", TOFU_EVAL, "--model", "NPO", "--model.small_model", tiny_world["small"],
                "--model.large_model", tiny_world["large"], "--model.retain_reference", str(reference)])
    out = Path(cli.trainer.log_dir)
    history = json.loads((out / "TOFU_HISTORY.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(h["forget_quality"] is not None for h in history)
    assert (out / "tradeoff_by_epoch.png").is_file()
    best = cli.trainer.checkpoint_callback
    assert best.monitor == "val/forget_quality" and Path(best.best_model_path).is_file()
    assert best.best_model_score == pytest.approx(max(h["forget_quality"] for h in history))

    results = sweep(TOFU_EVAL, [0.0, 0.5, 1.0], tmp_cwd / "sweep", str(out / "checkpoints" / "last.ckpt"), [
        "--model", "NPO", "--model.small_model", tiny_world["small"], "--model.large_model", tiny_world["large"],
        "--model.retain_reference", str(reference), "--trainer.callbacks", "null"])
    untrained = json.loads((reference.parent / "TOFU_SUMMARY.json").read_text())
    for alpha in (0.0, 0.5, 1.0):  # each run used the alpha given at test time, not the checkpoint's
        assert json.loads((tmp_cwd / "sweep" / f"alpha_{alpha:g}" / "TOFU_SUMMARY.json").read_text())["alpha"] == alpha
    prob = [r["forget_Q_A_Prob"] for r in results]
    assert prob[0] == pytest.approx(untrained["forget_Q_A_Prob"], rel=1e-6), "alpha 0 is the large model"
    assert prob[0] > prob[1] > prob[2], "NPO lowered the forget answers' probability, more at full strength"
    assert (tmp_cwd / "sweep" / "ALPHA_SWEEP.json").is_file() and (tmp_cwd / "sweep" / "alpha_sweep.png").is_file()


def test_monitoring_forget_quality_without_reference_fails_before_training(tiny_world: dict, tmp_cwd: Path) -> None:
    with pytest.raises(ValueError, match="set model.retain_reference"):
        main(["fit", "--config", TOFU_EVAL, "--model", "NPO", "--model.small_model", tiny_world["small"],
              "--model.large_model", tiny_world["large"]])


def test_the_sweep_command_documents_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_unlearn.sweep import main as sweep_main

    with pytest.raises(SystemExit) as done:
        sweep_main(["--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for option, says in [("--config", "config of the unlearning run"), ("--ckpt_path", "checkpoint of the trained offset"),
                         ("--alphas ALPHAS [ALPHAS ...]", ""), ("--out", "per-alpha runs and the plot"),
                         ("--floor", "floor on model utility")]:
        assert option in help_text and says in help_text, option
