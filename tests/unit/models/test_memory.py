"""The memory plan: exact parameter counts from config alone, the plan's arithmetic, and its refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_unlearn.cli import main
from lightning_unlearn.models import memory
from lightning_unlearn.models.adapters import insert_adapters
from lightning_unlearn.models.lora import add_lora
from lightning_unlearn.models.memory import (GIB, MemoryPlanError, RunSpec, check, eul_parameters, load_config,
                                             lora_parameters, model_shape, plan)
from lightning_unlearn.models.tiny import build_tiny_llama, tiny_llama_config
from lightning_unlearn.models import build

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "model_configs"
PUBLISHED = {"Llama-3.2-1B-Instruct": 1_235_814_400, "Llama-3.2-3B-Instruct": 3_212_749_824,
             "Llama-3.1-8B-Instruct": 8_030_261_248, "Llama-2-7b-chat-hf": 6_738_415_616}
"""Parameter counts of the published checkpoints (their safetensors index / model cards); the fixtures are
their config.json files, so the counts come from shapes alone."""


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_from_config_equals_the_instantiated_model(tiny_world: dict, tied: bool) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    config = tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=2, num_heads=2)
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config)
    assert model_shape(config).parameters == sum(p.numel() for p in model.parameters())
    saved = build_tiny_llama(tokenizer, seed=0, hidden_size=32, num_layers=2, num_heads=2)
    assert model_shape(load_config(tiny_world["large"])).parameters == sum(p.numel() for p in saved.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_of_published_configs(name: str) -> None:
    assert model_shape(load_config(FIXTURES / f"{name}.json")).parameters == PUBLISHED[name]


def test_lora_and_eul_counts_equal_the_adapters_built(tiny_world: dict) -> None:
    from transformers import AutoModelForCausalLM

    shape = model_shape(load_config(tiny_world["large"]))
    lora = add_lora(AutoModelForCausalLM.from_pretrained(tiny_world["large"]), rank=4)
    assert lora_parameters(shape, 4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    model = AutoModelForCausalLM.from_pretrained(tiny_world["large"])
    layers = insert_adapters(model, bottleneck=None, fraction=0.1)
    assert eul_parameters(shape, None, 0.1) == sum(p.numel() for p in layers.parameters())


def shape(parameters: int = 1000, h: int = 8, layers: int = 2, heads: int = 2, vocab: int = 50) -> memory.ModelShape:
    return memory.ModelShape(parameters, h, layers, heads, vocab, {1: 0})


def test_plan_adds_hand_computed_bytes() -> None:
    spec = RunSpec(small=shape(), large=shape(parameters=5000), small_dtype="float32", large_dtype="bfloat16",
                   batch_size=2, max_length=4, parts=2)
    items = {item.what: item.bytes for item in plan(spec, free={"cpu": None}).items}
    assert items["small model weights"] == 4000 and items["small reference copy (frozen)"] == 4000
    assert items["large model weights (frozen)"] == 10_000
    assert items["gradients"] == 4000 and items["AdamW state (2 moments)"] == 8000
    # B = 2 x 2 parts, T = 4, h = 8, a = 2: per layer 4*4*8*(34 + 5*2*4/8) * 4/2 = 9984, 2 layers
    assert items["activations (trainable model)"] == 2 * 9984
    # trained + its gradient, large + reference, combined: 5 x B x T x V x 4
    assert items["float32 logits"] == 5 * 4 * 4 * 50 * 4
    lora = plan(RunSpec(small=shape(), trainable="lora", lora_rank=2, reference_copy=False), free={"cpu": None})
    assert "small reference copy (frozen)" not in {i.what for i in lora.items}


def test_a_plan_that_cannot_fit_is_refused_with_numbers_and_options() -> None:
    spec = RunSpec(small=shape(parameters=10**6), large=shape(parameters=10**7))
    fits = plan(spec, free={"cpu": 10 * GIB})
    check(fits)
    refused = plan(spec, free={"cpu": 10**6})
    with pytest.raises(MemoryPlanError) as err:
        check(refused)
    text = str(err.value)
    assert "needs" in text and "0.00 GiB free" in text
    for option in ("--model.small_dtype bfloat16", "--model.lora_rank", "--model.large_device", "served large model"):
        assert option in text


def test_fit_refuses_before_loading_when_free_memory_is_too_small(tiny_world: dict, tmp_cwd: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    loaded = []
    measured, load = memory.free_memory, build.load_causal_lm
    monkeypatch.setattr(memory, "free_memory", lambda device: 1000)
    monkeypatch.setattr(build, "load_causal_lm", lambda *a, **k: loaded.append(a))
    args = ["fit", "--model", "NPO", "--model.large_model", tiny_world["large"], "--model.small_model",
            tiny_world["small"], "--data.forget_split", "forget01", "--data.retain_split", "retain99",
            "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--data.evaluation", "loss"]
    with pytest.raises(MemoryPlanError, match="does not fit"):
        main(args)
    assert loaded == [], "the plan is checked before any weight is loaded"
    monkeypatch.setattr(memory, "free_memory", measured)
    monkeypatch.setattr(build, "load_causal_lm", load)
    capsys.readouterr()
    main(args)  # with the machine's free memory the same run goes through, its plan printed first
    assert "memory plan (before loading" in capsys.readouterr().out
