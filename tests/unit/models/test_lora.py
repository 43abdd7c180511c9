"""LoRA for the trainable small model: exact identity at init, the reference is the same model with the adapter
off, gradients reach the adapter only, generation, checkpoints and adapter exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data.tofu_eval import left_pad
from lightning_unlearn.offset.generation import position_ids_from_mask
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.deploy.manifest import OFFSET_MANIFEST
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.modules import EUL, NPO, UnlearnModule

ROOT = Path(__file__).resolve().parents[3]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
QUESTIONS = ["Who is Basil Mahfouz Al-Kuwaiti?", "Where was he born?", "What genre?"]
ANSWERS = ["A writer from Kuwait.", "In Kuwait City, Kuwait.", "French literature, mostly novels."]


def built(world: dict, offset: bool = True, **kwargs) -> UnlearnModule:
    module = NPO(small_model=world["small"], large_model=world["large"] if offset else None, large_dtype="float32",
                 **kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def lora_weights(module: UnlearnModule) -> list[torch.nn.Parameter]:
    return [p for n, p in module.model.named_parameters() if "lora_" in n]


def perturb_adapter(module: UnlearnModule, seed: int = 0, scale: float = 0.05) -> None:
    """Move the adapter off zero, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_weights(module):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def make_batch(tokenizer_dir: str) -> dict:
    formatter = PromptFormatter(load_tokenizer(tokenizer_dir), max_length=64)
    items = [{p: formatter.encode(q, a + p) for p in ("forget", "retain")} for q, a in zip(QUESTIONS, ANSWERS)]
    return collate_parts(items, formatter.tokenizer.pad_token_id)


def test_combined_model_equals_large_model_exactly_at_initialisation(tiny_world: dict) -> None:
    module = built(tiny_world, lora_rank=4)
    assert module.reference is None, "the reference is the LoRA model with its adapter off, not a copy"
    batch = make_batch(tiny_world["tokenizer"])["forget"]
    large = load_causal_lm(tiny_world["large"]).eval()
    with torch.no_grad():
        expected = large(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        combined = module(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(combined, expected)


def test_reference_is_the_base_model_with_the_adapter_off(tiny_world: dict) -> None:
    module = built(tiny_world, lora_rank=4, lora_dropout=0.1)
    perturb_adapter(module)
    module.train()
    flags = {n: p.requires_grad for n, p in module.model.named_parameters()}
    batch = make_batch(tiny_world["tokenizer"])["forget"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = load_causal_lm(tiny_world["small"]).eval()
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    reference = module.combined.reference_logits(ids, mask)
    assert torch.equal(reference, expected)
    assert reference.grad_fn is None
    assert module.model.training, "the trainable model is back in training mode"
    assert {n: p.requires_grad for n, p in module.model.named_parameters()} == flags
    module.eval()
    with torch.no_grad():
        assert not torch.allclose(module.combined.offset_logits(ids, mask)[0], expected), "the adapter is back on"
    out = module.run_parts(make_batch(tiny_world["tokenizer"]), with_reference=True)
    z_l = module.combined.large_logits(ids, mask)
    torch.testing.assert_close(out["forget"].logits, z_l + (module.combined.offset_logits(ids, mask)[0] - expected))


def test_gradients_reach_only_the_adapter(tiny_world: dict) -> None:
    module = built(tiny_world, lora_rank=4, retain_loss="kl")
    perturb_adapter(module)  # B = 0 at init gives A no gradient; moved, both get one
    module.train()
    module.compute_losses(make_batch(tiny_world["tokenizer"]))["loss"].backward()
    adapter = {id(p) for p in lora_weights(module)}
    assert adapter and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_weights(module))
    others = [p for p in module.parameters() if id(p) not in adapter]
    assert others and all(p.grad is None and not p.requires_grad for p in others)
    optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == adapter


def test_gradient_checkpointing_keeps_the_adapter_gradients(tiny_world: dict) -> None:
    """Reentrant checkpointing behind frozen layers would cut the adapter's gradient: it must stay as without."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random A at initialisation in both
        module = built(tiny_world, lora_rank=4, gradient_checkpointing=checkpointing)
        perturb_adapter(module)
        module.train()
        module.compute_losses(make_batch(tiny_world["tokenizer"]))["loss"].backward()
        grads.append([p.grad for p in lora_weights(module)])
    plain, checkpointed = grads
    assert checkpointed and all(g is not None and g.abs().sum() > 0 for g in checkpointed)
    for g_ckpt, g in zip(checkpointed, plain):
        torch.testing.assert_close(g_ckpt, g)


def test_one_small_model_in_memory(tiny_world: dict) -> None:
    full, lora = built(tiny_world), built(tiny_world, lora_rank=4)
    small = sum(p.numel() for p in load_causal_lm(tiny_world["small"]).parameters())
    large = sum(p.numel() for p in full.large.parameters())
    adapter = sum(p.numel() for p in lora_weights(lora))
    assert sum(p.numel() for p in full.parameters()) == large + 2 * small
    assert sum(p.numel() for p in lora.parameters()) == large + small + adapter


def naive_offset_generate(module: UnlearnModule, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Recompute ``z_L + alpha (z_S - z_S0)`` over the whole sequence at every step: no cache, no component."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            pos = position_ids_from_mask(mask)
            z = {}
            for name, run in (("large", lambda: module.large), ("small", lambda: module.model)):
                z[name] = run()(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            with module.model.disable_adapter():
                z_ref = module.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            token = (z["large"] + module.alpha * (z["small"] - z_ref))[:, : module.vocab_size].argmax(-1)
            out.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(out, dim=1)


def test_offset_generation_with_lora(tiny_world: dict) -> None:
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=64)
    prompts = left_pad([formatter.prompt_ids(q) for q in QUESTIONS], formatter.tokenizer.pad_token_id)
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    assert (mask == 0).any(), "want left padding"
    full, lora = built(tiny_world).eval(), built(tiny_world, lora_rank=4, alpha=1.5).eval()
    assert torch.equal(lora.generate(ids, mask, 10), full.generate(ids, mask, 10)), "equal at init"
    perturb_adapter(lora, scale=0.3)
    generated = lora.generate(ids, mask, 10)
    assert torch.equal(generated, naive_offset_generate(lora, ids, mask, generated.shape[1]))
    assert not torch.equal(generated, full.generate(ids, mask, 10)), "the adapter changes the generations"


def test_fit_from_the_command_line_checkpoints_and_exports_the_adapter_only(tiny_world: dict, tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                "--model.large_model", tiny_world["large"], "--model.lora_rank", "4",
                "--model.export_dir", str(tmp_cwd / "export")])
    module = cli.model
    assert cli.trainer.global_step == 1 and module.reference is None
    adapter = {id(p) for p in lora_weights(module)}
    optimizer = cli.trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == adapter

    cli.trainer.save_checkpoint(tmp_cwd / "lora.ckpt")
    checkpoint = torch.load(tmp_cwd / "lora.ckpt", weights_only=True)
    names = {f"model.{n}" for n, p in module.model.named_parameters() if "lora_" in n}
    assert set(checkpoint["state_dict"]) == names
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(names)
    fresh = built(tiny_world, lora_rank=4)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    for (name, p), q in zip(module.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), name
    del checkpoint["state_dict"][sorted(names)[0]]
    with pytest.raises(KeyError, match="lacks 1 trainable"):
        fresh.on_load_checkpoint(checkpoint)

    export = tmp_cwd / "export"
    assert (export / "adapter_config.json").is_file() and not (export / "config.json").exists()
    assert json.loads((export / OFFSET_MANIFEST).read_text())["adapter"] == "lora"
    small_bytes = sum(f.stat().st_size for f in Path(tiny_world["small"]).glob("*.safetensors"))
    assert sum(f.stat().st_size for f in export.glob("*.safetensors")) < small_bytes / 2


@pytest.fixture(scope="module")
def lora_exports(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two LoRA offset exports (alphas 1.5 and 0.5), one full offset export, one direct LoRA export."""
    root = tmp_path_factory.mktemp("lora_exports")
    out = {}
    for name, offset, rank, alpha, seed in (("first", True, 4, 1.5, 0), ("second", True, 2, 0.5, 1),
                                            ("full", True, None, 1.0, 2), ("direct", False, 4, 1.0, 3)):
        module = built(tiny_world, offset, lora_rank=rank, alpha=alpha)
        if rank is None:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in module.model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        else:
            perturb_adapter(module, seed)
        module.eval()
        out[name] = (module, module.export(root / name))
    return out


@pytest.mark.parametrize("kind", ["first", "direct"], ids=["offset", "direct"])
def test_adapter_export_loads_back_as_the_training_module(kind: str, lora_exports: dict) -> None:
    module, path = lora_exports[kind]
    model = UnlearnedModel.from_export(path, large_dtype="float32")
    assert model.composition.offsets[0].adapter == "lora"
    batch = model.encode(QUESTIONS, ANSWERS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    with torch.no_grad():
        expected = module(ids, mask)
    torch.testing.assert_close(model.logits(ids, mask)[real], expected[real], rtol=0, atol=1e-6)
    prompt_ids, prompt_mask = model.prompt_batch(QUESTIONS)
    assert torch.equal(model.generate_ids(prompt_ids, prompt_mask, 12), module.generate(prompt_ids, prompt_mask, 12))
    assert not any(p.requires_grad for p in model.parameters())


def test_composed_adapters_share_one_small_model(tiny_world: dict, lora_exports: dict, tmp_path: Path) -> None:
    paths = [lora_exports[n][1] for n in ("first", "second", "full")]
    model = UnlearnedModel.from_export(paths, large_dtype="float32")
    batch = model.encode(QUESTIONS, ANSWERS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    with torch.no_grad():
        z_l = lora_exports["first"][0].combined.large_logits(ids, mask)
        z_s0 = lora_exports["first"][0].combined.reference_logits(ids, mask)
        offsets = [(m.alpha, m.combined.offset_logits(ids, mask)[0] - z_s0) for m, _ in (lora_exports[n] for n in
                                                                                 ("first", "second", "full"))]
    manual = z_l + sum(alpha * d for alpha, d in offsets)
    torch.testing.assert_close(model.logits(ids, mask)[real], manual[real], rtol=0, atol=1e-5)
    small = sum(p.numel() for p in load_causal_lm(tiny_world["small"]).parameters())
    large = sum(p.numel() for p in model.large.parameters())
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # large + one base shared by the reference and both adapters + the full offset
    assert sum(p.numel() for p in model.parameters()) == large + 2 * small + adapters
    reloaded = UnlearnedModel.from_export(model.save_manifest(tmp_path / "composed").parent, large_dtype="float32")
    assert [o.adapter for o in reloaded.composition.offsets] == ["lora", "lora", None]
    assert torch.equal(reloaded.logits(ids, mask), model.logits(ids, mask))
    prompt_ids, prompt_mask = model.prompt_batch(QUESTIONS)
    model.set_alphas([0.0, 0.0, 0.0])
    large_only = UnlearnedModel.from_export(paths[2], alphas=[0.0], large_dtype="float32")
    assert torch.equal(model.generate_ids(prompt_ids, prompt_mask, 8), large_only.generate_ids(prompt_ids, prompt_mask, 8))


def test_eul_refuses_lora(tiny_world: dict) -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        EUL(small_model=tiny_world["small"], lora_rank=4)
