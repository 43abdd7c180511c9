"""The three-model module: offset identity, gradient flow, reference logits, tokenizer checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer
from lightning_unlearn.modules import GA, NPO, UnlearnModule


def built(cls: type[UnlearnModule], **kwargs) -> UnlearnModule:
    module = cls(**kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def make_batch(tokenizer_dir: str, parts: tuple[str, ...] = ("forget", "retain")) -> dict:
    formatter = PromptFormatter(load_tokenizer(tokenizer_dir), max_length=64)
    pairs = [("Who is Basil?", "A writer from Kuwait."), ("Where was he born?", "In Kuwait City, Kuwait.")]
    items = [{p: formatter.encode(q, a + p) for p in parts} for q, a in pairs]
    return collate_parts(items, formatter.tokenizer.pad_token_id)


def test_combined_model_equals_large_model_exactly_at_initialisation(tiny_world: dict) -> None:
    module = built(NPO, small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="float32")
    batch = make_batch(tiny_world["tokenizer"])["forget"]
    large = load_causal_lm(tiny_world["large"]).eval()
    with torch.no_grad():
        expected = large(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        combined = module(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(combined, expected)


def test_offset_reference_is_the_large_model_and_shifts_only_by_the_offset(tiny_world: dict) -> None:
    module = built(NPO, small_model=tiny_world["small"], large_model=tiny_world["large"], alpha=2.0)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = make_batch(tiny_world["tokenizer"])
    out = module.run_parts(batch, with_reference=True)
    ids, mask = batch["forget"]["input_ids"], batch["forget"]["attention_mask"]
    with torch.no_grad():
        z_l = module.combined.large_logits(ids, mask).float()
        (z_s,) = module.combined.offset_logits(ids, mask)
        z_s0 = module.combined.reference_logits(ids, mask)
    assert torch.equal(out["forget"].ref_logits, z_l)
    torch.testing.assert_close(out["forget"].logits, z_l + 2.0 * (z_s - z_s0))
    assert not torch.equal(out["forget"].logits, z_l)


def test_gradients_reach_only_the_trainable_model(tiny_world: dict) -> None:
    module = built(NPO, small_model=tiny_world["small"], large_model=tiny_world["large"], retain_loss="kl")
    module.train()
    assert not module.large.training and not module.reference.training and module.model.training
    losses = module.compute_losses(make_batch(tiny_world["tokenizer"]))
    losses["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in module.large.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.reference.parameters())
    assert all(p.grad is not None for p in module.model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in module.model.parameters())


def test_large_logits_keep_no_autograd_graph(tiny_world: dict) -> None:
    module = built(GA, small_model=tiny_world["small"], large_model=tiny_world["large"])
    batch = make_batch(tiny_world["tokenizer"])["forget"]
    z_l = module.combined.large_logits(batch["input_ids"], batch["attention_mask"])
    assert z_l.grad_fn is None and not z_l.requires_grad


def test_direct_mode_loads_the_reference_only_when_the_loss_needs_it(tiny_world: dict) -> None:
    ga = built(GA, small_model=tiny_world["small"])
    assert ga.large is None and ga.reference is None
    npo = built(NPO, small_model=tiny_world["small"], retain_loss="none")
    assert npo.large is None and npo.reference is not None
    out = npo.run_parts(make_batch(tiny_world["tokenizer"], ("forget",)), with_reference=True)
    assert torch.equal(out["forget"].logits.detach(), out["forget"].ref_logits)
    assert npo.compute_losses(make_batch(tiny_world["tokenizer"], ("forget",)))["forget_loss"].item() == pytest.approx(
        2 / 0.1 * torch.log(torch.tensor(2.0)).item(), rel=1e-5
    )


def test_large_model_in_bfloat16_still_gives_float32_logits(tiny_world: dict) -> None:
    module = built(GA, small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="bfloat16")
    assert next(module.large.parameters()).dtype == torch.bfloat16
    batch = make_batch(tiny_world["tokenizer"])["forget"]
    large = load_causal_lm(tiny_world["large"], "bfloat16").eval()
    with torch.no_grad():
        combined = module(batch["input_ids"], batch["attention_mask"])
        z_l = large(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert combined.dtype == torch.float32 and z_l.dtype == torch.bfloat16
    assert torch.equal(combined, z_l.float()), "at initialisation: the bfloat16 logits, exactly, in float32"


def test_tokenizers_that_differ_are_refused_naming_both(tiny_world: dict, tmp_path: Path) -> None:
    other = train_tokenizer(["completely different text about cats and dogs"] * 50, vocab_size=300)
    build_tiny_llama(other, tmp_path / "other", hidden_size=16, num_layers=1, num_heads=2)
    module = GA(small_model=tiny_world["small"], large_model=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="tokenizers of .*other.* and .*small.* differ"):
        module.setup("fit")


def test_logits_are_sliced_to_the_tokenizer_vocabulary(tiny_world: dict, tmp_path: Path) -> None:
    """A large model whose embedding matrix is padded beyond the tokenizer still combines exactly."""
    padded = load_causal_lm(tiny_world["large"])
    vocab = len(load_tokenizer(tiny_world["tokenizer"]))
    padded.resize_token_embeddings(vocab + 13)
    padded.save_pretrained(tmp_path / "padded")
    load_tokenizer(tiny_world["tokenizer"]).save_pretrained(tmp_path / "padded")
    module = built(NPO, small_model=tiny_world["small"], large_model=str(tmp_path / "padded"), large_dtype="float32")
    batch = make_batch(tiny_world["tokenizer"])["forget"]
    with torch.no_grad():
        combined = module(batch["input_ids"], batch["attention_mask"])
        full = padded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert combined.shape[-1] == vocab
    assert torch.equal(combined, full[..., :vocab])


def test_checkpoints_leave_out_the_frozen_models(tiny_world: dict) -> None:
    module = built(NPO, small_model=tiny_world["small"], large_model=tiny_world["large"])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = checkpoint["state_dict"].keys()
    assert keys and all(k.startswith("model.") for k in keys)
    module.on_load_checkpoint(checkpoint)
    del checkpoint["state_dict"]["model.lm_head.weight"]
    with pytest.raises(KeyError, match="lacks 1 trainable"):
        module.on_load_checkpoint(checkpoint)


def test_optimizer_receives_only_trainable_parameters(tiny_world: dict) -> None:
    module = built(NPO, small_model=tiny_world["small"], large_model=tiny_world["large"])
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params)
    trainable = {id(p) for p in module.model.parameters()}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable
