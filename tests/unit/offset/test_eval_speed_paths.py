"""The evaluation's fast paths give the values of the plain ones: finished rows leaving greedy decoding, and
teacher-forced passes pooled, sorted by length and cut by a token budget."""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor

from lightning_unlearn.data.formatting import IGNORE_INDEX, Encoded, pad_batch
from lightning_unlearn.evaluation.passes import plan_passes, score_rows
from lightning_unlearn.evaluation.tofu import TofuEvaluation
from lightning_unlearn.metrics import functional as F
from lightning_unlearn.offset.generation import greedy_generate, offset_components
from lightning_unlearn.offset.sources import TokenHistory
from tests.unit.offset.test_generation import PAD, VOCAB, left_padded


class RowCounter(torch.nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, **kwargs):
        self.rows.append(kwargs["input_ids"].shape[0])
        return self.model(**kwargs)


def staggered_stops(full: Tensor) -> list[int]:
    """Stop ids that end the rows of a full decode at different steps: a token of row r first seen at step 2 + 3r
    and in no other row before it (so the other rows are not ended early by it)."""
    stops: list[int] = []
    for row in range(full.shape[0]):
        for step in range(2 + 3 * row, full.shape[1]):
            token = int(full[row, step])
            earlier = full[:, :step] if row == 0 else torch.cat([full[:row, :step], full[row:, :step]])
            if token not in stops and not bool((earlier == token).any()):
                stops.append(token)
                break
    return stops


@pytest.mark.parametrize("offset", [False, True])
def test_dropping_finished_rows_gives_the_full_batch_tokens(offset_models, offset: bool) -> None:
    large, small, reference = offset_models
    counted = RowCounter(large)
    components = (offset_components(counted, reference, [(small, 0.8)]) if offset else [(counted, 1.0)])
    ids, mask = left_padded([7, 3, 5, 6, 2])
    full = greedy_generate(components, ids, mask, max_new_tokens=20, eos_token_id=999, pad_token_id=PAD,
                           vocab_size=VOCAB, drop_finished=False)
    stops = staggered_stops(full)
    assert len(stops) >= 3, "the test needs rows that stop at different steps"
    counted.rows.clear()
    kept = greedy_generate(components, ids, mask, max_new_tokens=20, eos_token_id=stops, pad_token_id=PAD,
                           vocab_size=VOCAB, drop_finished=False)
    assert counted.rows == [5] * len(counted.rows)
    counted.rows.clear()
    dropped = greedy_generate(components, ids, mask, max_new_tokens=20, eos_token_id=stops, pad_token_id=PAD,
                              vocab_size=VOCAB)
    assert torch.equal(dropped, kept)
    ends = {next(k for k, t in enumerate(row) if t in stops) for row in kept.tolist() if set(row) & set(stops)}
    assert len(ends) >= 3, "rows must finish at different steps"
    assert counted.rows[0] == 5 and min(counted.rows) < 5, f"finished rows stayed in the batch: {counted.rows}"
    assert counted.rows == sorted(counted.rows, reverse=True)


def test_dropping_rows_with_a_stop_function_keeps_its_rows_aligned(offset_models) -> None:
    """``stop`` sees the whole batch's tokens in their rows, also after rows left the decoding."""
    large = offset_models[0]
    ids, mask = left_padded([4, 6, 3])
    full = greedy_generate([(large, 1.0)], ids, mask, max_new_tokens=12, eos_token_id=999, pad_token_id=PAD)
    target = 1  # row 1 stops once it has produced 5 tokens; row 0 by a stop id at step 2
    seen: list[int] = []

    def stop(new: Tensor) -> Tensor:
        seen.append(new.shape[0])
        return torch.tensor([False, new.shape[1] >= 5, False])

    eos = [int(full[0, 2])] if int(full[0, 2]) not in full[1:, :3].flatten().tolist() else [999]
    kwargs = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, stop=stop)
    kept = greedy_generate([(large, 1.0)], ids, mask, drop_finished=False, **kwargs)
    dropped = greedy_generate([(large, 1.0)], ids, mask, **kwargs)
    assert torch.equal(dropped, kept)
    assert set(seen) == {3}
    assert (kept[target, 5:] == PAD).all() and (kept[2] != PAD).all()


def test_token_history_rows_follow_the_dropped_rows() -> None:
    history = TokenHistory()
    history.extend(torch.tensor([[5, 6], [0, 7], [8, 9]]), torch.tensor([[1, 1], [0, 1], [1, 1]]))
    history.select_rows(torch.tensor([0, 2]))
    assert history.rows == [[5, 6], [8, 9]]


def test_plan_passes_keeps_the_budget_and_every_row_once() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    for budget in (50, 256, 1000, 4096):
        passes = plan_passes(lengths, budget)
        assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
        for members in passes:
            size = len(members) * max(lengths[i] for i in members)
            assert size <= budget or len(members) == 1, (budget, size)
        widths = [max(lengths[i] for i in p) for p in passes]
        assert widths == sorted(widths, reverse=True), "rows are not taken longest first"
        # sorted passes waste little: the padded tokens are within a few rows' worth of the real ones
        padded = sum(len(p) * w for p, w in zip(passes, widths))
        assert padded <= sum(lengths) + len(passes) * 300
    with pytest.raises(ValueError, match="token budget"):
        plan_passes([3], 0)


def encoded_rows(lengths: list[int], seed: int) -> list[Encoded]:
    torch.manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,)).tolist()
        prompt = max(1, n // 3)
        rows.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def nll_and_em(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    return {"nll": F.answer_token_stats(logits, labels).mean_nll, "em": F.exact_memorization(logits, labels)}


def test_pooled_passes_give_each_rows_batch_of_one_values(offset_models) -> None:
    model = offset_models[0]

    def logits_fn(ids: Tensor, mask: Tensor) -> Tensor:
        return model(input_ids=ids, attention_mask=mask).logits.float()

    groups_rows = [encoded_rows([9, 30, 4, 17], seed=1), encoded_rows([25, 6, 12, 31, 8, 20], seed=2)]
    groups = [(pad_batch(rows, PAD), nll_and_em) for rows in groups_rows]
    calls: list[tuple[int, int]] = []

    def counted(ids: Tensor, mask: Tensor) -> Tensor:
        calls.append(tuple(ids.shape))
        return logits_fn(ids, mask)

    pooled = score_rows(counted, groups, token_budget=64)
    assert all(b * t <= 64 or b == 1 for b, t in calls)
    assert len(calls) < 10, "rows were not pooled across the groups"
    with torch.no_grad():
        for g, rows in enumerate(groups_rows):
            for r, row in enumerate(rows):
                one = pad_batch([row], PAD)
                expected = nll_and_em(logits_fn(one["input_ids"], one["attention_mask"]), one["labels"])
                for key, value in expected.items():
                    assert pooled[g][key][r].item() == pytest.approx(value.item(), abs=1e-5), (g, r, key)


def test_tofu_values_do_not_depend_on_the_token_budget(offset_models) -> None:
    """The whole TOFU update on a forget batch: a budget of one row per pass and one of everything in one pass
    give the same per-sample values, in the samples' order."""
    model = offset_models[0]

    def logits_fn(ids: Tensor, mask: Tensor) -> Tensor:
        return model(input_ids=ids, attention_mask=mask).logits.float()

    answers = encoded_rows([14, 22, 9], seed=4)
    batch = {
        "set": "forget", "index": torch.tensor([5, 0, 3]), "answer_texts": ["a b", "c d e", "f"],
        "answer": pad_batch(answers, PAD), "correct": pad_batch(encoded_rows([11, 19, 16], seed=5), PAD),
        "perturbed": pad_batch(encoded_rows([10, 21, 8, 13, 24, 7], seed=6), PAD), "num_perturbed": 2,
    }
    results = []
    for budget in (1, 10_000):
        evaluation = TofuEvaluation(["forget", "holdout"], token_budget=budget)
        with torch.no_grad():
            evaluation.update(batch, logits_fn, None)
        m = evaluation.metrics["forget"]
        results.append({key: (m[key].sample_index(), m[key].per_sample()) for key in ("prob", "truth", "em", "es")}
                       | {key: torch.cat(metric.values) for key, metric in evaluation.mia.items()})
    one, pooled = results
    for key, value in one.items():
        if isinstance(value, tuple):
            assert value[0] == pooled[key][0] == [0, 3, 5]
            value, other = value[1], pooled[key][1]
        else:
            other = pooled[key]
        # Min-K%++ divides by the spread of the next-token log-probs, E[l^2] - E[l]^2 in float32: nearly uniform
        # predictions (this random model's) make that a difference of close numbers, which turns float rounding
        # of the logits (the padding differs) into ~1e-4; a misplaced row differs by far more.
        atol = 1e-3 if key == "mia_min_k_plus_plus" else 1e-5
        torch.testing.assert_close(other, value, rtol=0, atol=atol, msg=key)
    # the answer NLL of sample 5 (batch row 0) is the one of its own answer
    with torch.no_grad():
        row = pad_batch([answers[0]], PAD)
        nll = F.answer_token_stats(logits_fn(row["input_ids"], row["attention_mask"]), row["labels"]).mean_nll
    assert pooled["prob"][1][2].item() == pytest.approx(torch.exp(-nll.double()).item(), abs=1e-6)


def test_sorted_collection_serves_each_set_longest_first_with_its_own_indices(tiny_world) -> None:
    from lightning_unlearn.data.formatting import PromptFormatter
    from lightning_unlearn.data.tofu_eval import EvalCollection, EvalDataset, item_length, tofu_eval_specs
    from lightning_unlearn.data.tokenizer import load_tokenizer

    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), 192)
    datasets = [EvalDataset.load(s, "bundled", formatter, subset=12) for s in tofu_eval_specs("forget01", None, None)]
    plain, ordered = EvalCollection(datasets), EvalCollection(datasets, sort_by_length=True)
    assert len(plain) == len(ordered) == 60
    served = [ordered[i] for i in range(len(ordered))]
    for k, dataset in enumerate(datasets):
        block = served[12 * k: 12 * (k + 1)]
        assert {item["set"] for item in block} == {dataset.name}, "sets must stay in their order"
        assert sorted(item["index"] for item in block) == list(range(12))
        lengths = [item_length(item) for item in block]
        assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
        for item in block:  # each index still names its own sample
            assert item["prompt"] == dataset[item["index"]]["prompt"]
            assert item["question"] == dataset.records[item["index"]]["question"]


def test_longest_first_evaluation_reports_as_dataset_order(tiny_world) -> None:
    """The whole TOFU evaluation with the data module's longest-first order and with dataset order: the same
    report, keys in dataset order, every per-sample value and generation the same."""
    from functools import partial

    from torch.utils.data import DataLoader

    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.data.tofu_eval import collate_collection
    from lightning_unlearn.modules import GA

    dm = UnlearnDataModule(forget_split="forget01", retain_split="retain99", evaluation="tofu", eval_subset=6,
                           eval_batch_size=4, max_length=128)
    module = GA(small_model=tiny_world["large"], max_new_tokens=6)
    module.setup("test")
    dm.connect(module.tokenizer, module.parts)
    dm.setup("test")
    module.configure_model()
    module.build_evaluation([spec.name for spec in dm.eval_specs()], "tofu", dm.eval_token_budget())
    module.eval()
    pad = module.tokenizer.pad_token_id
    plain = dm._eval_collections(dm.formatter, pad, sort_by_length=False)[0][0]
    loaders = {"sorted": dm.test_dataloader()[0],
               "plain": DataLoader(plain, batch_size=4, collate_fn=partial(collate_collection, pad_token_id=pad))}
    first = next(iter(loaders["sorted"]))["parts"][0]
    assert first["index"].tolist() != list(range(len(first["index"]))), "the data module did not sort"
    reports = {}
    for name, loader in loaders.items():
        module.evaluation.reset()
        with torch.inference_mode():
            for batch in loader:
                for part in batch["parts"]:
                    module.evaluation.update(part, module, module.generate_texts)
            reports[name] = module.evaluation.compute()[1]
    plain_report, sorted_report = reports["plain"], reports["sorted"]
    assert list(sorted_report) == list(plain_report)
    for key, entry in plain_report.items():
        other = sorted_report[key]
        if "value_by_index" not in entry:
            continue
        assert list(other["value_by_index"]) == [str(i) for i in range(6)] == list(entry["value_by_index"])
        for i, values in entry["value_by_index"].items():
            for field, value in values.items():
                if isinstance(value, float):
                    assert other["value_by_index"][i][field] == pytest.approx(value, abs=1e-5), (key, i, field)
                else:
                    assert other["value_by_index"][i][field] == value, (key, i, field)


def test_limited_evaluation_keeps_dataset_order_and_budget_is_checked(tiny_world) -> None:
    """``limit_val_batches`` means the first samples: with a limit the sets are served in dataset order."""
    from types import SimpleNamespace

    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.data.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="eval_token_budget"):
        UnlearnDataModule(forget_split="forget01", retain_split=None, eval_token_budget=0)
    orders = {}
    for limit in (1.0, 2):
        dm = UnlearnDataModule(forget_split="forget01", retain_split=None, evaluation="tofu", eval_subset=5,
                               eval_batch_size=5, max_length=128)
        dm.trainer = SimpleNamespace(limit_val_batches=limit, limit_test_batches=1.0)
        dm.connect(load_tokenizer(tiny_world["tokenizer"]))
        dm.setup("validate")
        orders[limit] = next(iter(dm.val_dataloader()[0]))["parts"][0]["index"].tolist()
    assert orders[2] == list(range(5))
    assert sorted(orders[1.0]) == list(range(5)) and orders[1.0] != orders[2]


def test_the_default_evaluation_batch_is_the_measured_one_and_gives_the_values_of_batch_8(tiny_world) -> None:
    """A user who changes nothing evaluates 32 samples per batch (open-unlearning's batch, measured fastest:
    docs/results/benchmarks.md), not the training batch of 8; and every per-sample value, generation and ROUGE
    score is the one batches of 8 give (a row's logits do not depend on the other rows of its batch or pass,
    beyond float rounding)."""
    from lightning_unlearn.data.datamodule import UnlearnDataModule
    from lightning_unlearn.modules import GA

    reports, sizes = {}, {}
    for batch in (None, 8):
        options = {} if batch is None else {"eval_batch_size": batch}
        dm = UnlearnDataModule(forget_split="forget01", retain_split="retain99", evaluation="tofu", eval_subset=7,
                               max_length=128, **options)
        module = GA(small_model=tiny_world["large"], max_new_tokens=6)
        module.setup("test")
        dm.connect(module.tokenizer, module.parts)
        dm.setup("test")
        module.configure_model()
        module.build_evaluation([spec.name for spec in dm.eval_specs()], "tofu", dm.eval_token_budget())
        module.eval()
        with torch.inference_mode():
            batches = list(dm.test_dataloader()[0])
            for loader_batch in batches:
                for part in loader_batch["parts"]:
                    module.evaluation.update(part, module, module.generate_texts)
            reports[batch] = module.evaluation.compute()[1]
        sizes[batch] = [sum(len(part["index"]) for part in b["parts"]) for b in batches]
    assert dm.hparams.batch_size == 8
    assert sizes[None] == [32, 3] and sizes[8] == [8, 8, 8, 8, 3], sizes
    default, eight = reports[None], reports[8]
    assert list(default) == list(eight)
    for key, entry in eight.items():
        if "value_by_index" not in entry:
            value = entry["agg_value"]  # forget quality and privleak are None without a retain reference
            assert default[key]["agg_value"] == (value if value is None else pytest.approx(value, rel=1e-5)), key
            continue
        assert list(default[key]["value_by_index"]) == list(entry["value_by_index"])
        for i, values in entry["value_by_index"].items():
            for field, value in values.items():
                got = default[key]["value_by_index"][i][field]
                if isinstance(value, float) and "ROUGE" not in key:
                    assert got == pytest.approx(value, rel=1e-5, abs=1e-5, nan_ok=True), (key, i, field)
                else:
                    assert got == value, (key, i, field)  # generations and their ROUGE: identical
