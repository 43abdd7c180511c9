"""Shared fixtures: a tokenizer trained on TOFU text and tiny Llama models, all built locally.

The suite never needs the network: the hub, transformers, datasets and W&B are put offline here, before any of
them is imported, so that a test that would reach out fails at once instead of downloading or hanging (DDP
subprocesses inherit the environment). W&B runs are written offline (``disabled`` is kept if set).
"""

from __future__ import annotations

import os

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
os.environ.update(OFFLINE)
if os.environ.get("WANDB_MODE") != "disabled":
    os.environ["WANDB_MODE"] = "offline"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(scope="session")
def quick_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's ``--quick`` world (seed 0) up to its fine-tuned pair: ``<root>/models/large_ft`` and ``small_ft``.

    Built once per session and shared by the slow tests of the newer methods, which each unlearn it their own way
    (the demo's own end-to-end test builds its world through the demo command, as a user would).
    """
    from lightning_unlearn.demo import run_stage, stages

    root = tmp_path_factory.mktemp("quick_pair") / "demo"
    upstream: dict[str, str] = {}
    for stage in stages(root, "NPO", (128, 4), (64, 2), None, quick=True, seed=0):
        if stage.name in ("init", "finetune_large", "finetune_small"):
            run_stage(stage, upstream, force=False)
    return root


@pytest.fixture(scope="module")
def offset_models() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """Random tiny Llamas ``(large, small, reference)``: the small one a strong perturbation of the reference, so
    the offset is far from zero (for tests of the scoring and decoding paths, not of learning)."""
    from tests.unit.offset.test_generation import perturbed_copy, tiny_llama

    large = tiny_llama(0, hidden=48, layers=3)
    reference = tiny_llama(1)
    return large, perturbed_copy(reference, seed=2, scale=0.5), reference


@pytest.fixture(scope="module")
def reinforced(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A stand-in for WHP's reinforced model: the small model with its weights moved (what matters is
    z_R != z_S0)."""
    from lightning_unlearn.data.tokenizer import load_tokenizer
    from lightning_unlearn.models.loading import load_causal_lm

    model = load_causal_lm(tiny_world["small"], "float32")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    out = tmp_path_factory.mktemp("reinforced")
    model.save_pretrained(out)
    load_tokenizer(tiny_world["tokenizer"]).save_pretrained(out)
    return str(out)
