"""The combined model alone, without Lightning: ``z_L + sum_i alpha_i (z_S_i - z_S0)`` by hand, decoding, scoring.

Each test builds :class:`~lightning_unlearn.offset.combined.CombinedModel` (or ULD's :class:`~lightning_unlearn.offset.
filtered.FilteredCombined`) from random tiny Llamas and checks it against plain Hugging Face forward calls: the
teacher-forced logits, the KV-cached greedy decoding (each token the argmax of the teacher-forced logits of the
sequence so far), several offsets, a LoRA reference, the large model on its own device, the frozen-logit cache
(a hit gives what a miss gave), and shared-prefix scoring.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_unlearn.losses.logit_arithmetic import filtered_offset
from lightning_unlearn.models.lora import AdapterComponent, add_lora
from lightning_unlearn.offset.combined import CombinedModel
from lightning_unlearn.offset.filtered import FilteredCombined
from lightning_unlearn.offset.generation import position_ids_from_mask
from lightning_unlearn.offset.logit_cache import FrozenLogitCache
from tests.unit.offset.test_generation import VOCAB, perturbed_copy, tiny_llama

NO_EOS = 999  # outside the vocabulary: decoding runs to max_new_tokens


@pytest.fixture(scope="module")
def parts() -> dict[str, torch.nn.Module]:
    reference = tiny_llama(1)
    return {"large": tiny_llama(0, hidden=48, layers=3), "reference": reference,
            "first": perturbed_copy(reference, seed=2, scale=0.3), "second": perturbed_copy(reference, seed=3, scale=0.3)}


@pytest.fixture(scope="module")
def batch() -> tuple[Tensor, Tensor]:
    """Two rows, the second right-padded (as training batches are)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


def hf(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def test_teacher_forced_logits_are_the_weighted_sum_by_hand(parts: dict, batch: tuple) -> None:
    ids, mask = batch
    combined = CombinedModel([parts["first"]], [0.8], large=parts["large"], reference=parts["reference"],
                             vocab_size=VOCAB).eval()
    expected = hf(parts["large"], ids, mask) + 0.8 * (hf(parts["first"], ids, mask) - hf(parts["reference"], ids, mask))
    with torch.no_grad():
        got, ref = combined.logits_and_reference(ids, mask, with_reference=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(ref, hf(parts["large"], ids, mask)), "the reference a loss reads in offset mode is z_L"
    direct = CombinedModel([parts["first"]], vocab_size=VOCAB, reference=parts["reference"]).eval()
    with torch.no_grad():
        z, ref = direct.logits_and_reference(ids, mask, with_reference=True)
    assert torch.equal(z, hf(parts["first"], ids, mask)) and torch.equal(ref, hf(parts["reference"], ids, mask))
    assert direct.components() == [(direct.components()[0][0], 1.0)] and direct.is_direct


def test_several_offsets_compose_by_hand_and_in_decoding(parts: dict, batch: tuple) -> None:
    ids, mask = batch
    alphas = [0.7, -0.4]
    combined = CombinedModel([parts["first"], parts["second"]], alphas, large=parts["large"],
                             reference=parts["reference"], vocab_size=VOCAB).eval()
    z_ref = hf(parts["reference"], ids, mask)
    expected = hf(parts["large"], ids, mask) + sum(a * (hf(parts[n], ids, mask) - z_ref)
                                                   for a, n in zip(alphas, ("first", "second")))
    with torch.no_grad():
        torch.testing.assert_close(combined(ids, mask), expected, rtol=0, atol=1e-5)
    weights = [w for _, w in combined.components()]
    assert weights == [1.0, 0.7, -0.4, pytest.approx(-0.3)], "the reference runs once, weighted -sum(alpha)"
    assert_greedy_is_teacher_forced_argmax(combined)
    combined.alphas = [0.0, 0.0]
    with torch.no_grad():
        torch.testing.assert_close(combined(ids, mask), hf(parts["large"], ids, mask), rtol=0, atol=1e-6)


def assert_greedy_is_teacher_forced_argmax(combined: CombinedModel, steps: int = 6) -> None:
    """Each KV-cached greedy token is the argmax of the teacher-forced logits of the left-padded sequence so far."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=generator)
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0  # left padding
    new = combined.generate(prompt, mask, max_new_tokens=steps, eos_token_id=NO_EOS, pad_token_id=0)
    assert new.shape == (2, steps)
    ids, seen = prompt, mask
    for t in range(steps):
        with torch.no_grad():
            logits = combined(ids, seen, position_ids_from_mask(seen))[:, -1]
        assert torch.equal(new[:, t], logits.argmax(-1)), f"step {t}"
        ids, seen = torch.cat([ids, new[:, t:t + 1]], 1), torch.cat([seen, torch.ones_like(seen[:, :1])], 1)


def test_kv_cached_greedy_equals_the_teacher_forced_argmax(parts: dict) -> None:
    combined = CombinedModel([parts["first"]], [1.5], large=parts["large"], reference=parts["reference"],
                             vocab_size=VOCAB).eval()
    assert_greedy_is_teacher_forced_argmax(combined)
    assert_greedy_is_teacher_forced_argmax(CombinedModel([parts["first"]], vocab_size=VOCAB).eval())


def test_a_lora_reference_is_the_adapter_off_and_is_registered_once(parts: dict, batch: tuple) -> None:
    ids, mask = batch
    small = add_lora(perturbed_copy(parts["reference"], seed=1, scale=0.0), rank=4)
    combined = CombinedModel([small], [1.0], large=parts["large"], reference=AdapterComponent(small, None),
                             vocab_size=VOCAB).eval()
    with torch.no_grad():
        assert torch.equal(combined(ids, mask), hf(parts["large"], ids, mask)), "B = 0: exactly the large model"
        for name, p in small.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        with small.disable_adapter():
            base = hf(small, ids, mask)
        expected = hf(parts["large"], ids, mask) + (hf(small, ids, mask) - base)
        torch.testing.assert_close(combined(ids, mask), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(combined.reference_logits(ids, mask), base, rtol=0, atol=0)
    keys = list(combined.state_dict())
    assert not any(k.startswith("reference.") for k in keys), "the reference is the offset's base: no second copy"
    assert combined.frozen_models() == [parts["large"]]
    assert_greedy_is_teacher_forced_argmax(combined)


def test_large_model_on_its_device_is_not_moved_and_gives_the_same_logits(parts: dict, batch: tuple) -> None:
    ids, mask = batch
    kwargs = {"reference": parts["reference"], "vocab_size": VOCAB}
    placed = CombinedModel([parts["first"]], [0.5], large=tiny_llama(0, hidden=48, layers=3), large_device="cpu",
                           **kwargs).eval()
    plain = CombinedModel([parts["first"]], [0.5], large=parts["large"], **kwargs).eval()
    assert not any(k.startswith("large.") for k in placed.state_dict())
    with torch.no_grad():
        assert torch.equal(placed(ids, mask), plain(ids, mask))


def test_a_cache_hit_gives_what_the_miss_gave_without_running_the_frozen_models(parts: dict, batch: tuple) -> None:
    ids, mask = batch
    combined = CombinedModel([parts["first"]], [1.3], large=parts["large"], reference=parts["reference"],
                             vocab_size=VOCAB)
    combined.attach_cache(FrozenLogitCache(combined.cache_names(), VOCAB, "memory", dtype=torch.float32))
    exact = (hf(parts["large"], ids, mask), hf(parts["reference"], ids, mask))
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (parts["large"], parts["reference"])]
    try:
        combined.train()
        first = combined.logits_and_reference(ids, mask)[0].detach()
        assert len(calls) == 2 and combined.cache.misses == 2
        second = combined.logits_and_reference(ids, mask)[0].detach()
        assert len(calls) == 2 and combined.cache.hits == 2, "the hit runs only the trainable model"
        stored = combined.frozen_parts(ids, mask)  # what a loss that also reads z_L gets: the stored rows
        assert len(calls) == 2 and combined.cache.hits == 4
        for got, want in zip(stored, exact):
            assert torch.equal(got[mask.bool()], want[mask.bool()])
        combined.eval()  # evaluation computes the frozen logits
        uncached = combined.logits_and_reference(ids, mask)[0].detach()
        assert len(calls) == 4
    finally:
        for hook in hooks:
            hook.remove()
    real = mask.bool()
    assert torch.equal(first[real], second[real]) and torch.equal(first[real], uncached[real])
    combined.close_cache()
    assert combined.cache is None


def test_uld_filtered_combination_by_hand_and_in_decoding(parts: dict, batch: tuple) -> None:
    ids, mask = batch
    combined = FilteredCombined([parts["first"]], [-0.8], large=parts["large"], vocab_size=VOCAB,
                                relative_top=0.1).eval()
    expected = filtered_offset(hf(parts["large"], ids, mask), -0.8 * hf(parts["first"], ids, mask), 0.1)
    with torch.no_grad():
        torch.testing.assert_close(combined(ids, mask), expected, rtol=0, atol=1e-5)
    assert combined.continuation_fn is None
    assert_greedy_is_teacher_forced_argmax(combined)


def test_shared_prefix_scoring_equals_the_whole_rows(parts: dict) -> None:
    combined = CombinedModel([parts["first"]], [0.9], large=parts["large"], reference=parts["reference"],
                             vocab_size=VOCAB).eval()
    generator = torch.Generator().manual_seed(3)
    prefixes = torch.randint(3, VOCAB, (2, 4), generator=generator)
    continuation = torch.randint(3, VOCAB, (3, 5), generator=generator)
    rows = torch.tensor([0, 1, 0])
    scored = next(combined.continuation_fn(prefixes, torch.ones_like(prefixes),
                                           [(rows, continuation, torch.ones_like(continuation))]))
    whole = torch.cat([prefixes[rows], continuation], 1)
    with torch.no_grad():
        expected = combined(whole, torch.ones_like(whole))[:, 4:]
    torch.testing.assert_close(scored, expected, rtol=0, atol=1e-4)
    combined.train()
    assert combined.continuation_fn is None, "dropout would make it differ from forward"


def test_bad_strengths_and_shapes_are_refused(parts: dict) -> None:
    combined = CombinedModel([parts["first"]], [1.0], large=parts["large"], reference=parts["reference"],
                             vocab_size=VOCAB)
    with pytest.raises(ValueError, match="alpha"):
        combined.alphas = [math.nan]
    with pytest.raises(ValueError, match="one alpha per offset"):
        combined.alphas = [1.0, 2.0]
    with pytest.raises(ValueError, match="large model"):
        CombinedModel([parts["first"], parts["second"]], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="at least one"):
        CombinedModel([], vocab_size=VOCAB)
