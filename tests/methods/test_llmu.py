"""LLMU: the objective by hand, the random-answer data (pool, K per question, answer-only labels), the stop
bound, and the command line in offset and direct mode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data import UnlearnDataModule, load_split
from lightning_unlearn.data.datasets import PairedDataset
from lightning_unlearn.data.formatting import IGNORE_INDEX, PromptFormatter, collate_parts
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import LLMU, PartOutput
from lightning_unlearn.modules import divergence
from lightning_unlearn.modules.llmu import llmu_objective

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
LN = math.log


@pytest.fixture(scope="module")
def tokenizer(tiny_world: dict):
    return load_tokenizer(tiny_world["tokenizer"])


def parts_by_hand() -> tuple[PartOutput, PartOutput, PartOutput]:
    """Two-token vocabulary; logits at unlabelled positions are extreme so that counting them would show.

    forget: labels 1 then 0 with p = 3/4 and 1/2.  mismatch (K = 2 rows): p = 1/5 in row 0, p = 3/4 in
    row 1.  retain: one labelled position, reference uniform, model p = (1/4, 3/4).
    """
    forget = PartOutput(
        torch.tensor([[[0.0, LN(3)], [0.0, 0.0], [40.0, -40.0]]]), None, torch.tensor([[-100, 1, 0]])
    )
    mismatch = PartOutput(
        torch.tensor([[[LN(4), 0.0], [-30.0, 30.0], [9.0, 0.0]], [[50.0, -50.0], [0.0, LN(3)], [0.0, 9.0]]]),
        None,
        torch.tensor([[-100, 1, -100], [-100, -100, 1]]),
    )
    retain = PartOutput(
        torch.tensor([[[0.0, LN(3)], [30.0, -30.0], [0.0, 0.0]]]),
        torch.zeros(1, 3, 2),
        torch.tensor([[-100, 1, -100]]),
    )
    return forget, mismatch, retain


def test_objective_by_hand() -> None:
    forget_nll = (LN(4 / 3) + LN(2)) / 2
    random_nll = (LN(5) + LN(4 / 3)) / 2
    kl = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
    out = llmu_objective(*parts_by_hand())
    assert out["loss"].item() == pytest.approx(-0.5 * forget_nll + random_nll + kl, rel=1e-6)
    assert out["forget_nll"].item() == pytest.approx(forget_nll, rel=1e-6)
    assert out["forget_loss"].item() == pytest.approx(-forget_nll, rel=1e-6)
    assert out["random_loss"].item() == pytest.approx(random_nll, rel=1e-6)
    assert out["retain_loss"].item() == pytest.approx(kl, rel=1e-6)
    weighted = llmu_objective(*parts_by_hand(), eps1=2.0, eps2=0.25, eps3=3.0)["loss"].item()
    assert weighted == pytest.approx(-2.0 * forget_nll + 0.25 * random_nll + 3.0 * kl, rel=1e-6)


def test_random_answers_come_from_the_pool_k_per_question_on_answers_only(tokenizer) -> None:
    forget = [{"question": f"Who is author {i}?", "answer": f"Author {i} is secret."} for i in range(4)]
    retain = [{"question": "Q?", "answer": "A."}]
    pool = [f"Normal answer number {i}." for i in range(12)]
    formatter = PromptFormatter(tokenizer, max_length=64)
    dataset = PairedDataset(forget, retain, formatter, ("forget", "retain", "forget_random"),
                            answer_pool=pool, num_random_answers=3)
    item = dataset[(2, 7)]
    assert item == dataset[(2, 7)]  # the draw decides the answers: reproducible
    prompt = formatter.prompt_ids(forget[2]["question"])
    answers = []
    for example in item["forget_random"]:
        assert example.input_ids[: len(prompt)] == prompt
        assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert example.labels[len(prompt):] == example.input_ids[len(prompt):]
        answers.append(tokenizer.decode(example.labels[len(prompt):], skip_special_tokens=True).strip())
    assert len(answers) == 3 and len(set(answers)) == 3 and set(answers) <= set(pool)
    assert len({tuple(dataset[(0, draw)]["forget_random"][0].input_ids) for draw in range(20)}) > 3

    batch = collate_parts([dataset[(0, 1)], dataset[(1, 2)]], tokenizer.pad_token_id)
    assert batch["forget"]["input_ids"].shape[0] == 2 and batch["forget_random"]["input_ids"].shape[0] == 6
    assert batch["forget_random"]["input_ids"].shape[1] == batch["forget"]["input_ids"].shape[1]
    second = formatter.prompt_ids(forget[1]["question"])  # rows 3-5 belong to the second item
    assert batch["forget_random"]["input_ids"][3, : len(second)].tolist() == second


def test_an_answer_pool_smaller_than_k_is_refused(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, max_length=64)
    with pytest.raises(ValueError, match="5 distinct random answers but the answer pool holds 2"):
        PairedDataset([{"question": "Q?", "answer": "A."}], [], formatter, ("forget", "forget_random"),
                      answer_pool=["a", "b"], num_random_answers=5)


@pytest.mark.parametrize("pool_split", [None, "retain_perturbed[:3]"])
def test_data_module_pool_is_the_retain_answers_or_a_named_split(tokenizer, pool_split: str | None) -> None:
    dm = UnlearnDataModule("forget01", "retain99", batch_size=2, answer_pool_split=pool_split)
    dm.connect(tokenizer, ("forget", "retain", "forget_random"), num_random_answers=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    source = dm.retain if pool_split is None else load_split("bundled", "retain_perturbed")[:3]
    assert dm.answer_pool == [row["answer"] for row in source]
    assert batch["forget_random"]["input_ids"].shape[0] == 6
    for row, labels in enumerate(batch["forget_random"]["labels"]):
        forget_labels = batch["forget"]["labels"][row // 3]  # same question, so the same prompt length
        prompt_len = int((forget_labels != IGNORE_INDEX).nonzero()[0])
        assert (labels[:prompt_len] == IGNORE_INDEX).all() and labels[prompt_len] != IGNORE_INDEX


def model_args(world: dict, offset: bool) -> list[str]:
    return ["--model.small_model", world["small"], "--model.large_model", world["large"] if offset else "null"]


@pytest.mark.parametrize("offset", [True, False], ids=["offset", "direct"])
def test_fit_runs_in_offset_and_direct_mode(offset: bool, tiny_world: dict, tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", FAST, "--model", "LLMU", *model_args(tiny_world, offset),
                "--model.num_random_answers", "2"])
    module = cli.model
    assert isinstance(module, LLMU) and (module.large is not None) == offset
    assert module.reference is not None  # p_orig: the large model's pair in offset mode, the frozen copy in direct
    assert cli.datamodule.num_random_answers == 2
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/forget_loss", "train/forget_nll", "train/random_loss", "train/retain_loss"} <= set(metrics)
    # The first step is taken from the original model, so its KL to the reference is zero.
    assert metrics["train/retain_loss"].item() == pytest.approx(0.0, abs=1e-6)
    expected = -0.5 * metrics["train/forget_nll"] + metrics["train/random_loss"]
    assert metrics["train/loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("bound", "steps"), [(0.0, 1), (1.0e6, 3)], ids=["exceeded", "not-reached"])
def test_stop_bound_on_forget_nll_stops_training(
    bound: float, steps: int, tiny_world: dict, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages: list[str] = []
    monkeypatch.setattr(divergence, "rank_zero_info", messages.append)  # the bound is shared with GA and EUL
    cli = main(["fit", "--config", FAST, "--model", "LLMU", *model_args(tiny_world, False),
                "--model.num_random_answers", "1", "--model.stop_forget_nll", str(bound),
                "--trainer.fast_dev_run", "false", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                "--trainer.enable_checkpointing", "false"])
    stopped = bound == 0.0
    assert cli.trainer.global_step == steps
    assert cli.trainer.should_stop == stopped
    assert len(messages) == int(stopped) and all("exceeds stop_forget_nll=0 at step 0: stopping" in m for m in messages)
