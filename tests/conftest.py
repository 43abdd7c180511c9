"""Shared fixtures: a tokenizer trained on TOFU text and tiny Llama models, all built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

from lightning_unlearn.data.sources import load_split  # noqa: E402
from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer  # noqa: E402


def tofu_texts(limit: int = 800) -> list[str]:
    rows = load_split("bundled", "forget10") + load_split("bundled", "retain90")[:limit]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tokenizer and two tiny models sharing it: ``large`` (2 x 32) and ``small`` (1 x 16)."""
    root = tmp_path_factory.mktemp("tiny_world")
    tokenizer = train_tokenizer(tofu_texts(), vocab_size=400, out_dir=root / "tokenizer")
    build_tiny_llama(tokenizer, root / "large", seed=1, hidden_size=32, num_layers=2, num_heads=2)
    build_tiny_llama(tokenizer, root / "small", seed=2, hidden_size=16, num_layers=1, num_heads=2)
    return {"root": str(root), "tokenizer": str(root / "tokenizer"), "large": str(root / "large"),
            "small": str(root / "small")}


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temporary directory so logs and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
