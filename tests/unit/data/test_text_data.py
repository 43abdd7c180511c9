"""Raw-text corpora and MUSE's data layout: windows, the data module on text, sharding, errors, hub vs folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.data.datasets import PairedDataset
from lightning_unlearn.data.formatting import IGNORE_INDEX, Encoded, PromptFormatter
from lightning_unlearn.data.muse_sources import CONFIGS, read_muse
from lightning_unlearn.data.muse_world import build_muse_world
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.data.steps import StepDataset, StepSampler, label_count
from lightning_unlearn.data.text import windows
from lightning_unlearn.data.muse_eval import MuseEvalDataset, muse_eval_specs

I = IGNORE_INDEX


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def muse_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_muse_world(tmp_path_factory.mktemp("muse") / "world")


# --- windows -----------------------------------------------------------------------------------------------------


def test_windows_without_overlap_cut_the_document_in_max_length_pieces() -> None:
    got = windows(list(range(10, 17)), max_length=4)
    assert got == [Encoded([10, 11, 12, 13], [I, 11, 12, 13]), Encoded([14, 15, 16], [14, 15, 16])]


def test_overlapping_windows_label_each_token_once_and_keep_the_overlap_as_context() -> None:
    got = windows(list(range(10, 17)), max_length=4, stride=2)
    assert got == [Encoded([10, 11, 12, 13], [I, 11, 12, 13]), Encoded([12, 13, 14, 15], [I, I, 14, 15]),
                   Encoded([14, 15, 16], [I, I, 16])]
    # each token after the first is a next-token target exactly once (a window's first label is never one)
    targets = [t for w in got for t in w.labels[1:] if t != I]
    assert targets == list(range(11, 17))


@pytest.mark.parametrize("max_length,stride", [(1, None), (4, 0), (4, 5)])
def test_bad_window_settings_are_refused(max_length: int, stride: int | None) -> None:
    with pytest.raises(ValueError, match="data.max_length and data.text_stride"):
        windows([1, 2, 3], max_length, stride)


# --- the data module on text -------------------------------------------------------------------------------------


def text_module(folder: str | Path, tokenizer, forget: str = "forget", retain: str | None = "retain", **kwargs) -> UnlearnDataModule:
    dm = UnlearnDataModule(forget, retain, dataset=str(folder), evaluation="loss", **kwargs)
    dm.setup("fit")
    dm.connect(tokenizer, ("forget", "retain") if retain else ("forget",))
    return dm


def test_a_jsonl_text_split_becomes_windows_of_every_document(tiny_world: dict, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    docs = ["The quick brown fox jumps over the lazy dog. " * 6, "A short one."]
    write_jsonl(tmp_path / "forget.jsonl", [{"text": d} for d in docs])
    write_jsonl(tmp_path / "retain.jsonl", [{"text": "Kept text, kept."}])
    dm = text_module(tmp_path, tokenizer, max_length=16)
    ids = [tokenizer(d)["input_ids"] for d in docs]
    assert [w.input_ids for w in dm.forget] == [ids[0][i:i + 16] for i in range(0, len(ids[0]), 16)] + [ids[1]]
    assert all(w.labels[1:] == w.input_ids[1:] for w in dm.forget), "every token a target, no prompt"
    assert dm.forget[0].labels[0] == I and dm.forget[0].input_ids[0] == tokenizer.bos_token_id
    item = next(iter(dm.train_dataloader()))
    assert item["forget"]["labels"].shape[1] <= 16 and "retain" in item


def test_txt_files_and_folders_are_text_splits(tiny_world: dict, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "b.txt").write_text("Chapter two.", encoding="utf-8")
    (tmp_path / "book" / "a.txt").write_text("Chapter one.", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("Some notes.", encoding="utf-8")
    dm = text_module(tmp_path, tokenizer, forget="book", retain="notes")
    assert [tokenizer.decode(w.input_ids, skip_special_tokens=True) for w in dm.forget] == ["Chapter one.", "Chapter two."]
    assert len(dm.retain) == 1


def test_windows_shard_over_processes_and_their_step_counts_are_the_labelled_tokens(tiny_world: dict,
                                                                                   muse_world: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    dm = text_module(muse_world, tokenizer, retain="retain1", max_length=32)
    dataset = PairedDataset(dm.forget, dm.retain, dm.formatter, ("forget", "retain"))
    single = [(i.forget_index, i.draw) for i in StepSampler(dataset, batch_size=4, seed=3)]
    shards = [list(StepSampler(dataset, num_replicas=2, rank=r, batch_size=2, seed=3)) for r in (0, 1)]
    both = [(i.forget_index, i.draw) for s in shards for i in s]
    assert set(both) == set(single) and len(both) == len(single) + len(single) % 2, "padded by one repeat if odd"
    first = StepDataset(dataset)[shards[0][0]]["step_counts"]
    group = shards[0][0].group
    assert first["forget"][:2] == (sum(label_count(dm.forget[f]) for f, _ in group), len(group))


@pytest.mark.parametrize("parts,needs", [(("forget", "forget_idk"), "refusal"), (("forget", "forget_random"), "random")])
def test_question_answer_losses_refuse_text(parts: tuple, needs: str, tiny_world: dict, muse_world: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    dm = text_module(muse_world, tokenizer, retain="retain1")
    with pytest.raises(ValueError, match=f"{needs}.*raw text, which has no questions. On text use a method that needs none"):
        PairedDataset(dm.forget, dm.retain, dm.formatter, parts, ["I don't know."], answer_pool=["a"] * 5,
                      num_random_answers=1)


def test_an_empty_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "forget.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty: nothing to unlearn"):
        UnlearnDataModule("forget", None, dataset=str(tmp_path)).setup("fit")


def test_a_document_shorter_than_one_token_is_named(tiny_world: dict, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "forget.jsonl", [{"text": "Fine."}, {"text": ""}])
    with pytest.raises(ValueError, match=r"forget\.jsonl, line 2: the document is shorter than one token"):
        text_module(tmp_path, AutoTokenizer.from_pretrained(tiny_world["tokenizer"]), retain=None)


def test_a_split_mixing_text_and_questions_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "forget.jsonl", [{"text": "Fine."}, {"question": "Q?", "answer": "A."}])
    with pytest.raises(ValueError, match="mixes text documents"):
        UnlearnDataModule("forget", None, dataset=str(tmp_path)).setup("fit")


# --- MUSE ------------------------------------------------------------------------------------------------------


def test_the_built_world_has_muse_configs_splits_and_fields(muse_world: Path) -> None:
    for config, splits in CONFIGS.items():
        for split in splits:
            if split.startswith("retain2_qa"):
                continue  # MUSE-Books' name; the default world is News-like
            rows = read_muse(str(muse_world), f"{config}/{split}").records
            assert rows, (config, split)
    verbmem = load_split(str(muse_world), "verbmem/forget")[0]
    assert set(verbmem) == {"prompt", "gt"} and verbmem["prompt"].startswith("Question: ")
    assert len(load_split(str(muse_world), "knowmem/forget_qa_icl")) == 3


def test_muse_names_a_missing_config_and_how_to_build_one(muse_world: Path, tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "forget.jsonl", [{"text": "x y z"}])
    with pytest.raises(FileNotFoundError, match=r"has no knowmem/ configuration .*muse_world OUT builds"):
        load_split(str(tmp_path), "knowmem/forget_qa")
    with pytest.raises(ValueError, match="MUSE has no configuration 'nope'"):
        load_split(str(muse_world), "nope/forget")


def test_the_hub_path_and_a_folder_in_muse_layout_give_the_same_splits(muse_world: Path, tiny_world: dict,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline here, so the hub call is replaced by one serving the folder's files as the hub's configurations."""
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> list[dict]:
        calls.append((path, name, split))
        return load_split(str(muse_world), f"{name}/{split}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub, folder = "muse-bench/MUSE-News", str(muse_world)
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    from_hub, from_folder = (text_module(d, tokenizer, retain="retain1") for d in (hub, folder))
    assert from_hub.forget == from_folder.forget and from_hub.retain == from_folder.retain
    assert ("muse-bench/MUSE-News", "raw", "forget") in calls and ("muse-bench/MUSE-News", "raw", "retain1") in calls
    assert [s.split for s in muse_eval_specs(hub)] == [s.split for s in muse_eval_specs(folder)]
    for spec in muse_eval_specs(hub):
        a = MuseEvalDataset.load(spec, hub, tokenizer, 64)
        b = MuseEvalDataset.load(spec, folder, tokenizer, 64)
        assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))], spec.name
    assert ("muse-bench/MUSE-News", "knowmem", "retain_qa_icl") in calls


def test_muse_books_names_its_knowmem_retain_split_retain2(tmp_path: Path) -> None:
    world = build_muse_world(tmp_path / "books", books=True)
    assert [s.split for s in muse_eval_specs(str(world))][2] == "knowmem/retain2_qa"
    assert [s.icl_split for s in muse_eval_specs("muse-bench/MUSE-Books")][2] == "knowmem/retain2_qa_icl"
    assert [s.split for s in muse_eval_specs("muse-bench/MUSE-News")][2] == "knowmem/retain_qa"


def test_verbmem_items_label_the_true_continuation_only(tiny_world: dict, muse_world: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    spec = muse_eval_specs(str(muse_world))[0]
    item = MuseEvalDataset.load(spec, str(muse_world), tokenizer, 512)[0]
    labelled = [t for t in item["sequence"].labels if t != I]
    assert item["sequence"].input_ids[: len(item["prompt"])] == item["prompt"]
    assert tokenizer.decode(labelled).strip() == item["reference"]


def test_question_answer_rows_still_train_as_before(tiny_world: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    dm = UnlearnDataModule("forget01", "retain99", evaluation="loss")
    dm.setup("fit")
    dm.connect(tokenizer, ("forget", "retain"))
    assert isinstance(dm.forget[0], dict)
    expected = PromptFormatter(tokenizer, 512).encode(dm.forget[0]["question"], dm.forget[0]["answer"])
    assert PairedDataset(dm.forget, dm.retain, dm.formatter, ("forget",))[0]["forget"] == expected


def test_a_verbmem_continuation_is_joined_to_its_prompt_with_one_space() -> None:
    # The ground truth is tokenised as it follows the prompt in the document: after a space unless either side
    # already has one at the boundary (so a BPE tokeniser sees " word", not "word", and no double space).
    from lightning_unlearn.data.muse_eval import _joined

    assert _joined("He said", "hello") == " hello"
    assert _joined("He said ", "hello") == "hello" and _joined("He said", " hello") == " hello"
    assert _joined("", "hello") == "hello" and _joined("He said", "") == ""


def test_the_command_names_the_methods_that_run_on_text(tiny_world: dict, muse_world: Path, tmp_cwd: Path) -> None:
    """The data layer refuses IdkDPO on text; the command line adds the methods that would run (from the registry)."""
    from lightning_unlearn.cli import main
    from lightning_unlearn.data.datasets import QuestionsNeeded

    fast = str(Path(__file__).resolve().parents[3] / "configs" / "tests" / "fast.yaml")
    with pytest.raises(QuestionsNeeded, match="raw text, which has no questions.*Methods that run on text: .*GA, GD, "
                                              "KL, NPO"):
        main(["fit", "--config", fast, "--model", "IdkDPO", "--model.small_model", tiny_world["small"],
              "--model.large_model", "null", "--data.dataset", str(muse_world), "--data.forget_split", "forget",
              "--data.retain_split", "retain1"])
