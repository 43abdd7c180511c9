"""Forget/retain data: sources and their errors, prompt formatting, label masking, pairing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lightning_unlearn.data import UnlearnDataModule, load_split
from lightning_unlearn.data.datasets import PairedDataset, PairingSampler
from lightning_unlearn.data.formatting import IGNORE_INDEX, PromptFormatter
from lightning_unlearn.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_world: dict):
    return load_tokenizer(tiny_world["tokenizer"])


def write_split(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_bundled_tofu_splits_have_their_documented_sizes() -> None:
    sizes = {"forget01": 40, "forget10": 400, "retain99": 3960, "full": 4000, "retain_perturbed": 400}
    for split, size in sizes.items():
        assert len(load_split("bundled", split)) == size
    assert load_split("bundled", "forget01") == load_split("bundled", "full")[-40:]


def test_unknown_split_names_the_available_ones() -> None:
    with pytest.raises(FileNotFoundError, match="forget11.*Splits available.*forget10"):
        load_split("bundled", "forget11")


def test_missing_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(str(tmp_path / "nowhere"), "forget01")


def test_invalid_json_line_is_located(tmp_path: Path) -> None:
    (tmp_path / "forget.jsonl").write_text('{"question": "q", "answer": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="forget.jsonl, line 2"):
        load_split(str(tmp_path), "forget")


def test_local_folder_with_custom_keys(tmp_path: Path, tokenizer) -> None:
    write_split(tmp_path, "mine", [{"prompt": "Who?", "response": "Me."}])
    write_split(tmp_path, "keep", [{"prompt": "What?", "response": "That."}])
    dm = UnlearnDataModule("mine", "keep", dataset=str(tmp_path), question_key="prompt", answer_key="response")
    dm.connect(tokenizer, ("forget", "retain"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"forget", "retain"}


def test_missing_field_names_split_row_and_fix(tmp_path: Path) -> None:
    write_split(tmp_path, "mine", [{"question": "Who?", "answer": "Me."}, {"question": "No answer"}])
    dm = UnlearnDataModule("mine", None, dataset=str(tmp_path))
    with pytest.raises(ValueError, match=r"mine\.jsonl, line 2: no field 'answer'.*answer_key"):
        dm.setup("fit")


def test_empty_forget_set_is_refused(tmp_path: Path) -> None:
    write_split(tmp_path, "empty", [])
    with pytest.raises(ValueError, match="empty: nothing to unlearn"):
        UnlearnDataModule("empty", None, dataset=str(tmp_path)).setup("fit")


def test_loss_needing_retain_data_without_a_retain_split(tokenizer) -> None:
    dm = UnlearnDataModule("forget01", None)
    dm.connect(tokenizer, ("forget", "retain"))
    dm.setup("fit")
    with pytest.raises(ValueError, match="set data.retain_split"):
        dm.train_dataloader()


def test_no_tokenizer_is_a_clear_error() -> None:
    dm = UnlearnDataModule("forget01", "retain99")
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="set data.tokenizer"):
        dm.train_dataloader()


def test_labels_mask_the_prompt_and_label_the_answer_and_eos(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, max_length=128)
    encoded = formatter.encode("Who wrote it?", "Basil did.")
    prompt = tokenizer("Question: Who wrote it?\nAnswer:")["input_ids"]
    answer = tokenizer(" Basil did.", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == prompt + answer + [tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert encoded.input_ids[0] == tokenizer.bos_token_id


def test_padding_is_masked_in_labels_and_attention(tokenizer) -> None:
    dm = UnlearnDataModule("forget01", "retain99", batch_size=4)
    dm.connect(tokenizer, ("forget", "retain"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for part in batch.values():
        pad = part["attention_mask"] == 0
        assert pad.any()
        assert (part["labels"][pad] == IGNORE_INDEX).all()
        assert (part["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert batch["forget"]["input_ids"].shape == batch["retain"]["input_ids"].shape


def test_long_answer_is_truncated_with_one_warning(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer, max_length=20)
    with pytest.warns(UserWarning, match="longer than max_length=20") as record:
        first = formatter.encode("Who?", "word " * 50)
        formatter.encode("Who?", "word " * 50)
    assert len(record) == 1
    assert len(first.input_ids) == 20 and first.labels[-1] != IGNORE_INDEX


def test_prompt_longer_than_max_length_is_an_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="raise max_length"):
        PromptFormatter(tokenizer, max_length=4).encode("A rather long question indeed?", "Yes.")


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer) -> None:
    chat = load_tokenizer(tokenizer.name_or_path)
    chat.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[USER] {{ m['content'] }} [BOT]"
                          "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    formatter = PromptFormatter(chat, max_length=128)
    encoded = formatter.encode("Who?", "Me.")
    assert chat.decode(encoded.input_ids) == "<s>[USER] Who? [BOT]Me.</s>", "the template's BOS, not doubled"
    assert chat.decode([i for i in encoded.labels if i != IGNORE_INDEX]) == "Me.</s>"
    plain = PromptFormatter(chat, max_length=128, use_chat_template=False).encode("Who?", "Me.")
    assert chat.decode(plain.input_ids).startswith("<s>Question: Who?\nAnswer: Me.")


def test_template_without_question_field_is_refused(tokenizer) -> None:
    with pytest.raises(ValueError, match="needs a '\\{question\\}' field"):
        PromptFormatter(tokenizer, template="Q: A:")


def test_pairing_is_one_pass_over_forget_reproducible_and_changes_per_epoch() -> None:
    dataset = list(range(10))
    sampler = PairingSampler(dataset, seed=3)  # type: ignore[arg-type]
    first = list(sampler)
    assert sorted(f for f, _ in first) == list(range(10))
    assert list(PairingSampler(dataset, seed=3)) == first  # type: ignore[arg-type]
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_pairing_splits_one_global_order_across_ranks() -> None:
    dataset = list(range(7))
    single = list(PairingSampler(dataset, seed=0))  # type: ignore[arg-type]
    ranks = [list(PairingSampler(dataset, num_replicas=2, rank=r, seed=0)) for r in range(2)]  # type: ignore[arg-type]
    assert len(ranks[0]) == len(ranks[1]) == 4
    assert ranks[0][:3] + ranks[1][:3] == single[0:6:2] + single[1:6:2]


def test_paired_items_draw_retain_and_refusal_from_the_draw(tokenizer) -> None:
    forget = [{"question": "F?", "answer": "f"}]
    retain = [{"question": f"R{i}?", "answer": f"r{i}"} for i in range(50)]
    formatter = PromptFormatter(tokenizer, max_length=64)
    dataset = PairedDataset(forget, retain, formatter, ("forget", "retain", "forget_idk"), ["I don't know.", "No idea."])
    a, b = dataset[(0, 11)], dataset[(0, 11)]
    assert a == b
    retains = {tuple(dataset[(0, draw)]["retain"].input_ids) for draw in range(20)}
    assert len(retains) > 5
    idk = tokenizer.decode([t for t in a["forget_idk"].labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert idk.strip() in {"I don't know.", "No idea."}


def test_dpo_data_carries_refusals_from_idontknow(tokenizer) -> None:
    dm = UnlearnDataModule("forget01", "retain99", batch_size=2)
    dm.connect(tokenizer, ("forget", "retain", "forget_idk"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(dm.refusals) == 100
    assert torch.equal(batch["forget"]["input_ids"][:, :5], batch["forget_idk"]["input_ids"][:, :5])


def test_hub_dataset_id_reads_the_split_as_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline here, so the hub call is replaced: the id, the split as config name and 'train' are passed."""
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        return [{"question": "q", "answer": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split("locuslab/TOFU", "forget01") == [{"question": "q", "answer": "a"}]
    assert calls == [("locuslab/TOFU", "forget01", "train")]


def test_unreachable_hub_dataset_says_how_to_work_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="dataset: bundled or a local folder"):
        load_split("locuslab/TOFU", "forget01")


BAD_VALUES = {"number": (42, r"a number \(42\)"), "null": (None, "null"), "list": (["Me."], r"a list \(\['Me.'\]\)"),
              "object": ({"text": "Me."}, r"an object \({'text': 'Me.'}\)"), "boolean": (True, r"a boolean \(true\)")}


@pytest.mark.parametrize("field", ["question", "answer"])
@pytest.mark.parametrize("kind", sorted(BAD_VALUES))
def test_a_field_that_is_not_text_is_refused_with_file_line_and_field(kind: str, field: str, tmp_path: Path) -> None:
    """Before: accepted here, then a crash inside the tokenizer about pretokenized input."""
    value, shown = BAD_VALUES[kind]
    rows = [{"question": "Who?", "answer": "Me."}, {"question": "Where?", "answer": "Here."}]
    rows[1][field] = value
    write_split(tmp_path, "mine", rows)
    dm = UnlearnDataModule("mine", None, dataset=str(tmp_path))
    with pytest.raises(ValueError, match=rf"mine\.jsonl, line 2: field '{field}' is {shown}, not text"):
        dm.setup("fit")


def test_rows_of_a_slice_are_named_by_their_line_in_the_file(tmp_path: Path) -> None:
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(5)]
    rows[3]["answer"] = 3
    write_split(tmp_path, "mine", rows)
    assert len(load_split(str(tmp_path), "mine[:3]", ("question", "answer"))) == 3
    with pytest.raises(ValueError, match=r"mine\.jsonl, line 4: field 'answer' is a number \(3\)"):
        load_split(str(tmp_path), "mine[2:4]", ("question", "answer"))


def test_retain_rows_are_checked_too(tmp_path: Path) -> None:
    write_split(tmp_path, "forget", [{"question": "Who?", "answer": "Me."}])
    write_split(tmp_path, "keep", [{"question": None, "answer": "That."}])
    with pytest.raises(ValueError, match=r"keep\.jsonl, line 1: field 'question' is null"):
        UnlearnDataModule("forget", "keep", dataset=str(tmp_path)).setup("fit")


def test_a_bad_row_in_the_bundled_files_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_unlearn.data import sources

    write_split(tmp_path, "forget01", [{"question": "Who?", "answer": ["a", "list"]}])
    monkeypatch.setattr(sources, "bundled_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path}/forget01\.jsonl, line 1: field 'answer' is a list"):
        UnlearnDataModule("forget01", None).setup("fit")


def test_a_bad_row_of_a_hub_dataset_names_dataset_configuration_and_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: [
        {"question": "q", "answer": "a"}, {"question": "q", "answer": 7.5}])
    with pytest.raises(ValueError, match=r"hub dataset 'someone/data', configuration 'forget01', row 1: field 'answer' "
                                         r"is a number \(7\.5\)"):
        UnlearnDataModule("forget01", None, dataset="someone/data").setup("fit")


def test_an_empty_answer_is_kept_with_one_warning(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    rows = [{"question": "Who?", "answer": "Me."}, {"question": "Where?", "answer": ""},
            {"question": "When?", "answer": "  "}]
    write_split(tmp_path, "mine", rows)
    dm = UnlearnDataModule("mine", None, dataset=str(tmp_path))
    dm.setup("fit")
    assert len(dm.forget) == 3
    messages = [str(w.message) for w in recwarn if "is empty" in str(w.message)]
    assert len(messages) == 1
    assert re.match(r".*mine\.jsonl: field 'answer' is empty in 2 row\(s\) \(line 2, line 3\)", messages[0])


def write_eval_world(folder: Path, forget_row: dict) -> None:
    """A folder with the TOFU evaluation files whose forget set is one given row (the others are valid)."""
    good = {"question": "Q?", "answer": "A.", "paraphrased_answer": "A!", "perturbed_answer": ["B.", "C."]}
    write_split(folder, "mine_perturbed", [good, {**good, **forget_row}])
    for split in ("retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        write_split(folder, split, [good])


@pytest.mark.parametrize(("row", "expected"), [
    ({"perturbed_answer": ["B.", 12]}, r"field 'perturbed_answer\[1\]' is a number \(12\), not text"),
    ({"perturbed_answer": "B."}, r"field 'perturbed_answer' must be a non-empty list of texts, not text"),
    ({"perturbed_answer": []}, r"field 'perturbed_answer' must be a non-empty list of texts, not a list"),
    ({"paraphrased_answer": None}, r"field 'paraphrased_answer' is null, not text"),
    ({"answer": 1}, r"field 'answer' is a number \(1\), not text"),
], ids=["perturbed-item", "perturbed-not-list", "perturbed-empty", "paraphrase", "answer"])
def test_evaluation_rows_and_perturbed_options_are_checked(row: dict, expected: str, tmp_path: Path, tokenizer) -> None:
    from lightning_unlearn.data.tofu_eval import EvalDataset, tofu_eval_specs

    write_eval_world(tmp_path, row)
    spec = tofu_eval_specs("mine", None, None)[0]
    with pytest.raises(ValueError, match=rf"mine_perturbed\.jsonl, line 2: {expected}"):
        EvalDataset.load(spec, str(tmp_path), PromptFormatter(tokenizer))


def test_records_built_in_code_are_checked_by_the_datasets(tokenizer) -> None:
    formatter = PromptFormatter(tokenizer)
    with pytest.raises(ValueError, match=r"forget records, row 0: field 'answer' is null"):
        PairedDataset([{"question": "Who?", "answer": None}], [], formatter, ("forget",))
    with pytest.raises(ValueError, match=r"answer pool, item 1: a number"):
        PairedDataset([{"question": "Who?", "answer": "Me."}], [], formatter, ("forget", "forget_random"),
                      answer_pool=["x", 2, "y"], num_random_answers=2)
