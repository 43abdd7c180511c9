"""``large_device``: the large model on its own device, out of the module's registered submodules, same results.

Devices really differ in two tests: the ``meta`` device (no data, but a device of its own) shows where each model
is put and that moving the module leaves the large model where it is; with a GPU, the large model runs on it while
the module stays on the CPU. Without a GPU the forward and generation path is only checked with both on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data.tofu_eval import left_pad
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import NPO, UnlearnModule

ROOT = Path(__file__).resolve().parents[3]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
QUESTIONS = ["Who is Basil Mahfouz Al-Kuwaiti?", "Where was he born?"]
ANSWERS = ["A writer from Kuwait.", "In Kuwait City, Kuwait."]


def built(world: dict, **kwargs) -> UnlearnModule:
    module = NPO(small_model=world["small"], large_model=world["large"], retain_loss="kl", **kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def test_large_model_on_its_device_gives_the_same_losses_and_generations(tiny_world: dict) -> None:
    placed, plain = built(tiny_world, large_device="cpu"), built(tiny_world)
    assert "large" not in dict(placed.named_children()) and not any(k.startswith("large.") for k in placed.state_dict())
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=64)
    items = [{p: formatter.encode(q, a + p) for p in ("forget", "retain")} for q, a in zip(QUESTIONS, ANSWERS)]
    batch = collate_parts(items, formatter.tokenizer.pad_token_id)
    for module in (placed, plain):
        module.train()
        assert not module.large.training
    got, want = placed.compute_losses(batch), plain.compute_losses(batch)
    assert all(torch.equal(got[k], want[k]) for k in want)
    prompts = left_pad([formatter.prompt_ids(q) for q in QUESTIONS], formatter.tokenizer.pad_token_id)
    placed.eval(), plain.eval()
    assert torch.equal(placed.generate(prompts["input_ids"], prompts["attention_mask"], 8),
                       plain.generate(prompts["input_ids"], prompts["attention_mask"], 8))


def test_the_large_model_goes_to_its_device_and_stays_when_the_module_moves(tiny_world: dict) -> None:
    on_meta = built(tiny_world, large_device="meta")
    assert {p.device.type for p in on_meta.large.parameters()} == {"meta"}
    assert {p.device.type for p in on_meta.parameters()} == {"cpu"}, "the small pair stays with the module"

    placed, plain = built(tiny_world, large_device="cpu"), built(tiny_world)
    for module in (placed, plain):
        module.to("meta")  # what Lightning's move of the module to its device does to registered models
        assert {p.device.type for p in module.model.parameters()} == {"meta"}
        assert {p.device.type for p in module.reference.parameters()} == {"meta"}
    assert {p.device.type for p in placed.large.parameters()} == {"cpu"}, "the large model stays where it was put"
    assert {p.device.type for p in plain.large.parameters()} == {"meta"}, "without large_device it moves along"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the large model on it, the module on the CPU")
def test_large_model_on_the_gpu_serves_a_module_on_the_cpu(tiny_world: dict) -> None:
    placed, plain = built(tiny_world, large_device="cuda:0", large_dtype="float32"), built(
        tiny_world, large_dtype="float32")
    assert next(placed.large.parameters()).is_cuda and not next(placed.model.parameters()).is_cuda
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=64)
    items = [{p: formatter.encode(q, a + p) for p in ("forget", "retain")} for q, a in zip(QUESTIONS, ANSWERS)]
    batch = collate_parts(items, formatter.tokenizer.pad_token_id)
    got, want = placed.compute_losses(batch), plain.compute_losses(batch)
    for key in want:
        assert got[key].device.type == "cpu"
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    prompts = left_pad([formatter.prompt_ids(q) for q in QUESTIONS], formatter.tokenizer.pad_token_id)
    placed.eval(), plain.eval()
    assert torch.equal(placed.generate(prompts["input_ids"], prompts["attention_mask"], 8),
                       plain.generate(prompts["input_ids"], prompts["attention_mask"], 8))


def test_fit_with_large_device_from_the_command_line(tiny_world: dict, tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                "--model.large_model", tiny_world["large"], "--model.large_device", "cpu"])
    assert cli.trainer.global_step == 1 and cli.model.large.device == torch.device("cpu")
