"""The offline builders: a BPE tokenizer trained on TOFU text and tiny Llama models from config."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_unlearn.models.loading import check_same_tokenizer, load_causal_lm

from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.models.tiny import build_tiny_llama, make_tiny_pair, train_tokenizer

TEXTS = ["Question: Who is Basil Mahfouz Al-Kuwaiti?\nAnswer: A writer born in Kuwait City."] * 20 + [
    "The author's father was a florist and his mother a game developer.", "Zürich, 1956 — naïve café"]


def test_tokenizer_round_trips_any_text_and_marks_sequences(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, vocab_size=300, out_dir=tmp_path)
    text = "Zürich, 1956 — naïve café; an unseen word: xylophone!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text, "byte-level BPE never loses a character"
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert len(tok) <= 300
    loaded = load_tokenizer(str(tmp_path))
    assert loaded(text)["input_ids"] == ids


def test_tokenizer_merges_frequent_words(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, vocab_size=400)
    assert len(tok("Kuwait", add_special_tokens=False)["input_ids"]) < len("Kuwait")


def test_tiny_llama_is_reproducible_and_matches_the_tokenizer(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, vocab_size=300)
    a = build_tiny_llama(tok, tmp_path / "a", seed=3, hidden_size=32, num_layers=2, num_heads=2)
    b = build_tiny_llama(tok, seed=3, hidden_size=32, num_layers=2, num_heads=2)
    c = build_tiny_llama(tok, seed=4, hidden_size=32, num_layers=2, num_heads=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 32
    loaded = load_causal_lm(str(tmp_path / "a"))
    ids = torch.tensor([tok("Who is Basil?")["input_ids"]])
    assert torch.equal(loaded(ids).logits, a.eval()(ids).logits)


def test_building_does_not_touch_the_global_rng() -> None:
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_llama(tok, hidden_size=16, num_layers=1, num_heads=2)
    assert torch.equal(torch.rand(3), expected)


def test_make_tiny_pair_shares_one_tokenizer(tmp_path: Path) -> None:
    paths = make_tiny_pair(tmp_path, vocab_size=512, large=(64, 2), small=(32, 1))
    large, small = load_causal_lm(str(paths["large"])), load_causal_lm(str(paths["small"]))
    assert sum(p.numel() for p in large.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    check_same_tokenizer(load_tokenizer(str(paths["large"])), load_tokenizer(str(paths["small"])), "large", "small")


def test_the_suite_runs_offline(tmp_path: Path) -> None:
    """conftest puts the hub offline before anything imports it: a download fails at once from an empty cache."""
    import os

    import pytest
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert constants.HF_HUB_OFFLINE
    assert os.environ["TRANSFORMERS_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["WANDB_MODE"] in ("offline", "disabled")
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("gpt2", "config.json", cache_dir=tmp_path)
