"""Greedy decoding over weighted model sums: cached decoding must match full recomputation."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lightning_unlearn.offset.generation import (
    OffsetCausalLM,
    cache_keyword,
    greedy_generate,
    offset_components,
    position_ids_from_mask,
)

VOCAB = 61
PAD = 0


def tiny_llama(seed: int, hidden: int = 32, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def perturbed_copy(model: LlamaForCausalLM, seed: int, scale: float = 0.05) -> LlamaForCausalLM:
    copy = LlamaForCausalLM(model.config).eval()
    copy.load_state_dict(model.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(scale * torch.randn_like(p))
    return copy


@pytest.fixture(scope="module")
def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM, LlamaForCausalLM]:
    large = tiny_llama(0, hidden=48, layers=3)
    reference = tiny_llama(1)
    small = perturbed_copy(reference, seed=2, scale=0.5)
    return large, small, reference


def left_padded(lengths: list[int], seed: int = 3) -> tuple[Tensor, Tensor]:
    """Random prompts of the given lengths, left-padded with PAD: ``(input_ids, attention_mask)``, [B, max]."""
    torch.manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,))
        mask[row, width - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    return left_padded([7, 3, 5])


def naive_generate(
    components: Sequence[tuple[nn.Module, float]],
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos: int | None = None,
    vocab_size: int = VOCAB,
) -> Tensor:
    """Recompute every model on the whole sequence each step: no cache to get wrong."""
    ids, mask = input_ids, attention_mask
    out: list[Tensor] = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            pos = position_ids_from_mask(mask)
            total = sum(
                w * m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :vocab_size].float()
                for m, w in components
            )
            token = total.argmax(-1).masked_fill(done, PAD)
            out.append(token)
            if eos is not None:
                done |= token == eos
                if done.all():
                    break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(out, dim=1)


def test_offset_matches_naive_recompute(models, batch) -> None:
    large, small, reference = models
    ids, mask = batch
    components = [(large, 1.0), (small, 0.8), (reference, -0.8)]
    expected = naive_generate(components, ids, mask, max_new_tokens=12)
    got = greedy_generate(components, ids, mask, max_new_tokens=12, eos_token_id=999, pad_token_id=PAD)
    assert got.shape == (3, 12)
    assert torch.equal(got, expected)
    assert not torch.equal(got, naive_generate([(large, 1.0)], ids, mask, max_new_tokens=12)), "offset is a no-op"


def test_composed_offsets_call_reference_once(models, batch) -> None:
    large, small, reference = models
    other = perturbed_copy(reference, seed=4, scale=0.5)
    components = offset_components(large, reference, [(small, 0.5), (other, 0.25)])
    assert [w for _, w in components] == [1.0, 0.5, 0.25, -0.75]
    ids, mask = batch
    expected = naive_generate(components, ids, mask, max_new_tokens=6)
    got = greedy_generate(components, ids, mask, max_new_tokens=6, eos_token_id=999, pad_token_id=PAD)
    assert torch.equal(got, expected)


def test_single_component_matches_hf_generate(models, batch) -> None:
    large, _, _ = models
    ids, mask = batch
    for eos in (999, int(naive_generate([(large, 1.0)], ids, mask, 4)[1, 3])):
        hf = large.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=eos,
            pad_token_id=PAD,
        )[:, ids.shape[1] :]
        got = greedy_generate([(large, 1.0)], ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(got, hf)


def test_eos_is_kept_and_followed_by_padding(models, batch) -> None:
    large, small, reference = models
    ids, mask = batch
    components = [(large, 1.0), (small, 1.0), (reference, -1.0)]
    free = naive_generate(components, ids, mask, max_new_tokens=8)
    eos = int(free[0, 2])
    got = greedy_generate(components, ids, mask, max_new_tokens=8, eos_token_id=[eos, 998], pad_token_id=PAD)
    assert torch.equal(got, naive_generate(components, ids, mask, max_new_tokens=8, eos=eos))
    assert any((row != eos).all() for row in free), "want a row that never stops"
    for row, reference_row in zip(got, free):
        hits = (reference_row == eos).nonzero()
        if len(hits) == 0:
            assert got.shape[1] == 8 and torch.equal(row, reference_row)
            continue
        stop = int(hits[0])
        assert torch.equal(row[: stop + 1], reference_row[: stop + 1])
        assert (row[stop + 1 :] == PAD).all()


def always(token: int):
    """A plain-callable component whose logits make ``token`` win whatever the other models say."""

    def fn(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache | None) -> Tensor:
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., token] = 1e4
        return logits

    return fn


def test_stops_once_all_finished_and_runs_to_limit_without_eos(models, batch) -> None:
    large, _, _ = models
    ids, mask = batch
    args = dict(pad_token_id=PAD, max_new_tokens=9)
    stopped = greedy_generate([(large, 1.0), (always(5), 1.0)], ids, mask, eos_token_id=5, **args)
    assert torch.equal(stopped, torch.full((3, 1), 5))
    never = greedy_generate([(large, 1.0)], ids, mask, eos_token_id=999, **args)
    assert never.shape == (3, 9)
    never = greedy_generate([(large, 1.0), (always(5), 1.0)], ids, mask, eos_token_id=6, **args)
    assert torch.equal(never, torch.full((3, 9), 5))
    empty = greedy_generate([(large, 1.0)], ids, mask, eos_token_id=2, pad_token_id=PAD, max_new_tokens=0)
    assert empty.shape == (3, 0)


def test_padded_vocab_is_sliced(models, batch) -> None:
    _, small, reference = models
    ids, mask = batch
    extra = 7
    padded = tiny_llama(9, vocab=VOCAB + extra)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], 50.0 * torch.ones(extra, state[key].shape[1])])
    padded.load_state_dict(state)
    args = dict(max_new_tokens=8, eos_token_id=999, pad_token_id=PAD)
    expected = greedy_generate([(small, 1.0), (reference, -0.5)], ids, mask, **args)
    got = greedy_generate([(padded, 1.0), (reference, -0.5)], ids, mask, vocab_size=VOCAB, **args)
    assert torch.equal(got, expected)
    assert (greedy_generate([(padded, 1.0)], ids, mask, **args) >= VOCAB).any(), "padding rows never win"
    with pytest.raises(ValueError, match="vocab_size"):
        greedy_generate([(padded, 1.0), (reference, -0.5)], ids, mask, **args)


def test_each_component_gets_its_own_persistent_cache(models, batch) -> None:
    large, small, reference = models
    ids, mask = batch
    seen: dict[str, list[int]] = {}
    lengths: dict[str, list[int]] = {}

    def spy(name: str, model: nn.Module):
        def fn(input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache | None) -> Tensor:
            assert cache is not None
            seen.setdefault(name, []).append(id(cache))
            lengths.setdefault(name, []).append(cache.get_seq_length())
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **{cache_keyword(model): cache},
                use_cache=True,
            ).logits

        return fn

    components = [(spy("L", large), 1.0), (spy("S", small), 0.8), (spy("S0", reference), -0.8)]
    got = greedy_generate(components, ids, mask, max_new_tokens=5, eos_token_id=999, pad_token_id=PAD)
    assert torch.equal(got, naive_generate([(large, 1.0), (small, 0.8), (reference, -0.8)], ids, mask, 5))
    assert all(len(set(v)) == 1 for v in seen.values())
    assert len({v[0] for v in seen.values()}) == 3
    assert all(v == [0, 7, 8, 9, 10] for v in lengths.values())


def test_shared_cache_corrupts_offset(models, batch) -> None:
    """Why one cache per model: S and S0 share an architecture, so a shared cache fails silently."""
    _, small, reference = models
    ids, mask = batch
    pos = position_ids_from_mask(mask)
    step = torch.full((3, 1), 7)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    step_pos = pos[:, -1:] + 1
    KV = cache_keyword(reference)
    with torch.no_grad():
        own = DynamicCache(config=reference.config)
        reference(input_ids=ids, attention_mask=mask, position_ids=pos, **{KV: own}, use_cache=True)
        good = reference(
            input_ids=step, attention_mask=step_mask, position_ids=step_pos, **{KV: own}, use_cache=True
        ).logits
        shared = DynamicCache(config=small.config)
        small(input_ids=ids, attention_mask=mask, position_ids=pos, **{KV: shared}, use_cache=True)
        reference(input_ids=ids, attention_mask=mask, position_ids=pos, **{KV: shared}, use_cache=True)
        bad = reference(
            input_ids=step,
            attention_mask=torch.cat([mask, step_mask], dim=1),
            position_ids=step_pos,
            **{KV: shared},
            use_cache=True,
        ).logits
    assert shared.get_seq_length() == 2 * ids.shape[1] + 1, "S0 silently attends to S's keys too"
    assert not torch.allclose(good, bad, atol=1e-3)


def test_offset_module_forward_and_generate(models, batch) -> None:
    large, small, reference = models
    ids, mask = batch
    model = OffsetCausalLM.offset(large, small, reference, alpha=0.8)
    logits = model(ids, mask)
    assert logits.shape == (3, ids.shape[1], VOCAB) and logits.dtype == torch.float32
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        expected = sum(
            w * m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            for m, w in [(large, 1.0), (small, 0.8), (reference, -0.8)]
        )
    torch.testing.assert_close(logits.detach(), expected)
    got = model.generate(ids, mask, max_new_tokens=6, eos_token_id=999, pad_token_id=PAD)
    assert torch.equal(got, naive_generate([(large, 1.0), (small, 0.8), (reference, -0.8)], ids, mask, 6))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for m in (large, small, reference) for p in m.parameters()
    )


def test_bf16_component_sums_in_float32(models, batch) -> None:
    large, small, reference = models
    ids, mask = batch
    half = perturbed_copy(small, seed=0, scale=0.0).to(torch.bfloat16)
    logits = OffsetCausalLM([(large, 1.0), (half, 0.5), (reference, -0.5)])(ids, mask)
    assert logits.dtype == torch.float32


def test_right_padding_is_rejected(models, batch) -> None:
    large, _, _ = models
    ids, mask = batch
    with pytest.raises(ValueError, match="LEFT"):
        greedy_generate([(large, 1.0)], ids.flip(1), mask.flip(1), max_new_tokens=2, eos_token_id=2, pad_token_id=PAD)


def test_offset_generation_passes_the_cache_under_the_models_own_keyword(models, batch) -> None:
    """transformers 5.x renamed ``past_key_values`` to ``cache`` and warns at every call with the old name: the
    KV cache goes under the name the model's forward takes, so generation prints no deprecation per step."""
    import inspect
    import warnings

    large, small, reference = models
    for model in models:
        assert cache_keyword(model) in inspect.signature(type(model).forward).parameters
    ids, mask = batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        greedy_generate(offset_components(large, reference, [(small, 1.0)]), ids, mask, max_new_tokens=3,
                        eos_token_id=999, pad_token_id=PAD)
