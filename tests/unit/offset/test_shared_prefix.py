"""Scoring rows that share a prompt by running the prompt once (``offset/prefix.py``, ``score_rows``'s
continuation path) gives the values of running every row whole, in direct and offset mode, on every family."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor

from lightning_unlearn.data.formatting import IGNORE_INDEX, Encoded, pad_batch
from lightning_unlearn.evaluation.passes import score_rows
from lightning_unlearn.metrics import functional as F
from lightning_unlearn.models.families import FAMILIES, build_family_model, build_family_tokenizer
from lightning_unlearn.offset.generation import LogitsComponent, OffsetCausalLM, offset_components
from lightning_unlearn.offset.prefix import continuation_logits, supports_continuation
from lightning_unlearn.offset.sources import ServedLargeModel
from tests.unit.offset.test_generation import PAD, VOCAB


def shared_prompt_rows(prompts: list[int], answers: list[list[int]], seed: int) -> list[Encoded]:
    """For each prompt length, one row per answer length, all rows of a prompt starting with the same tokens."""
    torch.manual_seed(seed)
    prompt_ids = [torch.randint(3, VOCAB, (n,)).tolist() for n in prompts]
    rows = []
    for n, prompt, lengths in zip(prompts, prompt_ids, answers):
        for m in lengths:
            answer = torch.randint(3, VOCAB, (m,)).tolist()
            rows.append(Encoded(prompt + answer, [IGNORE_INDEX] * n + answer))
    return rows


def scorer(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    trimmed = F.drop_last_answer_token(labels)
    return {"nll": F.answer_token_stats(logits, labels).mean_nll, "em": F.exact_memorization(logits, trimmed),
            "es": F.extraction_strength(logits, trimmed), "mkpp": F.min_k_plus_plus_score(logits, trimmed, 0.4)}


class Counting(LogitsComponent):
    """A component over a causal LM that counts the real (unpadded) tokens it runs, prefill and continuation."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        from lightning_unlearn.offset.generation import CausalLMComponent
        self.inner, self.tokens = CausalLMComponent(model), 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        self.tokens += int(attention_mask[:, -input_ids.shape[1]:].sum())
        return self.inner(input_ids, attention_mask, position_ids, past_key_values)

    def next_logits(self, input_ids, attention_mask, position_ids, cache):
        self.tokens += int(attention_mask.sum())
        return self.inner.next_logits(input_ids, attention_mask, position_ids, cache)

    def new_cache(self):
        return self.inner.new_cache()

    def continues_cache(self) -> bool:
        return True


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("budget", [40, 10_000])
def test_shared_prompts_run_once_and_score_as_whole_rows(offset_models, offset: bool, budget: int) -> None:
    """Two groups (answers; perturbed answers) over the same prompts, one row without a prompt to share (its
    answer starts at position 1), a small budget (several chunks and passes) and one pass for everything."""
    large, small, reference = offset_models
    counted = Counting(large)
    components = (offset_components(counted, reference, [(small, 0.7)]) if offset else [(counted, 1.0)])
    whole = OffsetCausalLM(offset_components(large, reference, [(small, 0.7)]) if offset else [(large, 1.0)])
    answers = shared_prompt_rows([6, 11, 3], [[5], [9], [4]], seed=1)
    answers.append(Encoded([7, 8, 9, 10], [IGNORE_INDEX, 8, 9, 10]))
    perturbed = shared_prompt_rows([6, 11, 3], [[7, 2, 12], [3, 8, 5], [6, 6, 1]], seed=1)  # the same prompts
    groups = [(pad_batch(answers, PAD), scorer), (pad_batch(perturbed, PAD), scorer)]
    with torch.no_grad():
        plain = score_rows(whole, groups, budget)
        shared = score_rows(whole, groups, budget, functools.partial(continuation_logits, components))
    for g in range(2):
        for key in plain[g]:
            atol = 1e-3 if key == "mkpp" else 1e-5  # see test_eval_speed_paths: near-uniform spreads
            torch.testing.assert_close(shared[g][key], plain[g][key], rtol=0, atol=atol, equal_nan=True)
    # each prompt but its last token ran once, in one chunk; every row ran from that token on (the row without a
    # prompt to share ran whole through the plain path, not through the component)
    cuts = [n - 1 for n in (6, 11, 3)]
    rows_of = [0, 1, 2] + [0, 0, 0, 1, 1, 1, 2, 2, 2]
    continued = sum(len(r.input_ids) - cuts[p] for r, p in zip(answers[:3] + perturbed, rows_of))
    if budget == 10_000:
        assert counted.tokens == sum(cuts) + continued
    assert counted.tokens >= sum(cuts) + continued


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_continues_a_left_padded_prefix_exactly(family: str) -> None:
    """Continuation logits equal the whole rows' logits at the same positions, for prefixes of unequal length
    (left padding, explicit positions) on every architecture of the matrix (sliding windows, ALiBi-free learned
    positions, partial rotary...)."""
    texts = ["Who wrote the book? The author of the book, born in 1952, wrote it in Kuwait City."] * 4
    model = build_family_model(family, build_family_tokenizer(family, texts, vocab_size=300), seed=0).eval()
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    prefixes = [torch.randint(5, vocab, (n,)) for n in (4, 9)]
    rows = [(0, torch.randint(5, vocab, (6,))), (1, torch.randint(5, vocab, (3,))), (0, torch.randint(5, vocab, (5,)))]
    prefix_ids = torch.zeros(2, 9, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    for j, p in enumerate(prefixes):
        prefix_ids[j, 9 - len(p):], prefix_mask[j, 9 - len(p):] = p, 1
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, (_, c) in enumerate(rows):
        ids[k, :len(c)], mask[k, :len(c)] = c, 1
    which = torch.tensor([j for j, _ in rows])
    with torch.no_grad():
        got = next(continuation_logits([(model, 1.0)], prefix_ids, prefix_mask, [(which, ids, mask)]))
        for k, (j, c) in enumerate(rows):
            full = torch.cat([prefixes[j], c])[None]
            expected = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, len(prefixes[j]):].float()
            torch.testing.assert_close(got[k, :len(c)], expected, rtol=1e-4, atol=1e-4, msg=f"{family} row {k}")


def test_a_served_model_is_scored_whole() -> None:
    served = ServedLargeModel("http://127.0.0.1:9/v1", vocab_size=VOCAB)
    assert not supports_continuation(served)
    assert not supports_continuation(lambda ids, mask, pos, cache: ids)
    with pytest.raises(ValueError, match="served large model"):
        next(continuation_logits([(served, 1.0)], torch.ones(1, 2, dtype=torch.long),
                                 torch.ones(1, 2, dtype=torch.long), []))


@pytest.mark.parametrize("kind", ["direct", "offset", "lora", "large_device", "eul", "training"])
def test_the_modules_shared_prefix_scoring_equals_its_forward(tiny_world: dict, kind: str) -> None:
    """What the evaluation calls (``score_rows`` with the module's ``continuation_fn``) equals scoring the rows
    whole through the module's forward, for each way the module builds its logits; where it cannot be equal
    (EUL computes its own logits, a module in training mode) the module offers none."""
    from lightning_unlearn.data.formatting import PromptFormatter
    from lightning_unlearn.data.tokenizer import load_tokenizer
    from lightning_unlearn.modules import EUL
    from tests.unit.models.test_lora import ANSWERS, QUESTIONS, built, perturb_adapter

    if kind == "eul":
        module = EUL(small_model=tiny_world["small"])
        module.setup("fit")
        module.configure_model()
    else:
        extra = {"lora_rank": 4} if kind == "lora" else {"large_device": "cpu"} if kind == "large_device" else {}
        module = built(tiny_world, offset=kind != "direct", alpha=1.5, **extra)
    if kind == "lora":
        perturb_adapter(module, scale=0.3)
    elif kind != "eul":
        with torch.no_grad():  # a trained offset: the small model away from its reference
            for p in module.model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    module.train(kind == "training")
    if kind in ("eul", "training"):
        assert module.continuation_fn is None
        return
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=64)
    answers = [formatter.encode(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    perturbed = [formatter.encode(q, a[::-1]) for q, a in zip(QUESTIONS, ANSWERS) for _ in range(2)]
    groups = [(pad_batch(answers, formatter.tokenizer.pad_token_id), scorer),
              (pad_batch(perturbed, formatter.tokenizer.pad_token_id), scorer)]
    with torch.no_grad():
        whole = score_rows(module, groups, 10_000)
        shared = score_rows(module, groups, 10_000, module.continuation_fn)
    assert module.continuation_fn is not None
    for g in range(2):
        for key in whole[g]:
            atol = 1e-3 if key == "mkpp" else 1e-5
            torch.testing.assert_close(shared[g][key], whole[g][key], rtol=0, atol=atol, equal_nan=True)
