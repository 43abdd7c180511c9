"""The frozen-logit cache: same losses and gradients as without it (within its precision), later epochs run only
the trainable model, keys independent of batching, size, invalidation, crash safety."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts, pad_batch
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.models.tiny import build_tiny_llama
from lightning_unlearn.offset.logit_cache import DATA_FILE, FrozenLogitCache, sequence_keys
from lightning_unlearn.modules import DPO, GA, NPO, UnlearnModule

QUESTIONS = ["Who is Basil Mahfouz Al-Kuwaiti?", "Where was he born?", "What genre?"]
ANSWERS = ["A writer from Kuwait.", "In Kuwait City, Kuwait.", "French literature, mostly novels."]
FP16_UNIT_ROUNDOFF = 2.0**-11


def built(cls: type[UnlearnModule], world: dict, large: str | None = "large", **kwargs) -> UnlearnModule:
    module = cls(small_model=world["small"], large_model=world[large] if large else None, **kwargs)
    module.setup("fit")
    module.configure_model()
    return module.train()


def make_batch(world: dict, parts: tuple[str, ...] = ("forget", "retain", "forget_idk")) -> dict:
    formatter = PromptFormatter(load_tokenizer(world["tokenizer"]), max_length=64)
    items = [{p: formatter.encode(q, a + ("" if p == "forget" else p)) for p in parts} for q, a in zip(QUESTIONS, ANSWERS)]
    return collate_parts(items, formatter.tokenizer.pad_token_id)


def loss_and_grads(module: UnlearnModule, batch: dict) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    module.model.zero_grad()
    losses = module.compute_losses(batch)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}, [p.grad.clone() for p in module.model.parameters()]


def count_frozen_calls(module: UnlearnModule) -> Counter:
    calls: Counter = Counter()
    for name in ("large", "reference"):
        model = getattr(module, name)
        model.register_forward_hook(lambda m, args, kwargs, out, name=name: calls.update({name: 1}), with_kwargs=True)
    return calls


def test_keys_identify_the_sequence_whatever_the_batch_and_padding(tiny_world: dict) -> None:
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=64)
    examples = [formatter.encode(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    pad = formatter.tokenizer.pad_token_id
    batch = pad_batch(examples, pad)
    wider = pad_batch(examples[::-1], pad, length=batch["input_ids"].shape[1] + 7)
    keys, wider_keys = sequence_keys(batch["input_ids"], batch["attention_mask"]), sequence_keys(
        wider["input_ids"], wider["attention_mask"])
    assert len(set(keys)) == 3 and keys == wider_keys[::-1]
    left = torch.cat([torch.full((3, 2), pad), batch["input_ids"]], 1), torch.cat(
        [torch.zeros(3, 2, dtype=torch.long), batch["attention_mask"]], 1)
    assert not set(sequence_keys(*left)) & set(keys), "left padding shifts positions: another key"


@pytest.mark.parametrize("mode", ["memory", "disk"])
@pytest.mark.parametrize("cls", [NPO, DPO, GA], ids=["NPO", "DPO", "GA"])
def test_losses_and_gradients_match_the_uncached_module(cls: type, mode: str, tiny_world: dict, tmp_path: Path) -> None:
    kwargs = {"retain_loss": "kl"} if cls is not GA else {}
    plain = built(cls, tiny_world, large_dtype="float32", alpha=1.5, **kwargs)
    cached = built(cls, tiny_world, large_dtype="float32", alpha=1.5, logit_cache=mode,
                   logit_cache_dir=str(tmp_path / "cache"), **kwargs)
    for module in (plain, cached):  # away from initialisation, where the NPO/DPO ratios are exactly zero
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    batch = make_batch(tiny_world, cached.parts)
    expected, expected_grads = loss_and_grads(plain, batch)
    calls = count_frozen_calls(cached)
    first, first_grads = loss_and_grads(cached, batch)
    assert calls == {"large": 1, "reference": 1}
    second, second_grads = loss_and_grads(cached, batch)
    assert calls == {"large": 1, "reference": 1}, "the second pass reads the cache only"
    assert cached.logit_cache.hits == len(batch) * 3 and cached.logit_cache.misses == len(batch) * 3
    for key in expected:  # float16 storage: relative error 2**-11 on each logit
        torch.testing.assert_close(first[key], expected[key], rtol=5e-3, atol=5e-3)
        assert torch.equal(first[key], second[key]), "every pass uses the same rounded values"
    for got, want, again in zip(first_grads, expected_grads, second_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3 * want.abs().max().item())
        assert torch.equal(got, again)


def test_stored_precision_and_size(tiny_world: dict, tmp_path: Path) -> None:
    module = built(NPO, tiny_world, large_dtype="float32", logit_cache="disk", logit_cache_dir=str(tmp_path))
    batch = make_batch(tiny_world, ("forget",))["forget"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    exact = [module.combined.large_logits(ids, mask), module.combined.reference_logits(ids, mask)]
    cached = module.combined.frozen_parts(ids, mask)
    real = mask.bool()
    for got, want in zip(cached, exact):
        assert torch.equal(got[real], want[real].half().float()), "float16 rounding, no more"
        error = (got[real] - want[real]).abs()  # relative 2**-11, absolute 2**-25 below float16's normal range
        assert (error <= FP16_UNIT_ROUNDOFF * want[real].abs() + 2.0**-25).all()
        assert error.max() > 0, "the approximation is real: float16 is not float32"
        assert (got[~real] == 0).all(), "padded positions are not stored"
    tokens, vocab = int(real.sum()), module.vocab_size
    assert module.logit_cache.nbytes() == tokens * 2 * vocab * 2  # tokens x (z_L, z_S0) x vocab x float16
    assert (tmp_path / "rank0" / DATA_FILE).stat().st_size == tokens * 2 * vocab * 2

    exact32 = built(NPO, tiny_world, large_dtype="float32", logit_cache="memory", logit_cache_dtype="float32")
    for got, want in zip(exact32.combined.frozen_parts(ids, mask), exact):
        assert torch.equal(got[real], want[real])


def test_duplicate_rows_are_computed_once_and_eval_mode_bypasses_the_cache(tiny_world: dict) -> None:
    module = built(GA, tiny_world, logit_cache="memory")
    batch = make_batch(tiny_world, ("forget",))["forget"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    calls = count_frozen_calls(module)
    rows = []
    module.large.register_forward_hook(lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    module.combined.frozen_parts(torch.cat([ids, ids]), torch.cat([mask, mask]))
    assert rows == [3] and len(module.logit_cache) == 3
    module.eval()
    module.combined.frozen_parts(ids, mask)
    assert calls == {"large": 2, "reference": 2} and len(module.logit_cache) == 3


class CallsPerEpoch(L.Callback):
    """Counts the frozen models' forward calls and rows per training epoch."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.rows: Counter = Counter()
        self.cached = 0

    def on_train_end(self, trainer: L.Trainer, module: UnlearnModule) -> None:
        self.cached = len(module.logit_cache)

    def on_fit_start(self, trainer: L.Trainer, module: UnlearnModule) -> None:
        for name in ("large", "reference"):
            def hook(m, args, kwargs, out, name=name) -> None:
                self.calls[(trainer.current_epoch, name)] += 1
                self.rows[(trainer.current_epoch, name)] += kwargs["input_ids"].shape[0]
            getattr(module, name).register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("retain", [False, True], ids=["forget-only", "with-retain"])
def test_later_epochs_run_only_the_trainable_model(retain: bool, tiny_world: dict, tmp_path: Path) -> None:
    module = NPO(small_model=tiny_world["small"], large_model=tiny_world["large"], retain_loss="nll" if retain else "none",
                 logit_cache="memory")
    data = UnlearnDataModule(forget_split="forget01[:12]", retain_split="retain99", batch_size=4, max_length=96,
                             evaluation="loss")
    spy = CallsPerEpoch()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[spy],
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert spy.calls[(0, "large")] == spy.calls[(0, "reference")] == 3
    assert spy.rows[(0, "large")] == (24 if retain else 12)
    if not retain:
        assert not any(spy.calls[(epoch, name)] for epoch in (1, 2) for name in ("large", "reference"))
        assert spy.cached == 12
        return
    # the retain partners are drawn anew each epoch: only those never seen before run through the frozen models
    for epoch in (1, 2):
        assert 0 < spy.rows[(epoch, "large")] <= 12 and spy.rows[(epoch, "large")] == spy.rows[(epoch, "reference")]
    assert sum(spy.rows[(epoch, "large")] for epoch in range(3)) == spy.cached, "each sequence computed once"


def fingerprinted(world: dict, cache_dir: Path, **kwargs) -> UnlearnModule:
    module = built(GA, world, logit_cache="disk", logit_cache_dir=str(cache_dir), **kwargs)
    batch = make_batch(world, ("forget",))["forget"]
    module.combined.frozen_parts(batch["input_ids"], batch["attention_mask"])
    return module


def test_the_cache_clears_itself_when_what_it_depends_on_changes(tiny_world: dict, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = fingerprinted(tiny_world, cache_dir)
    assert len(first.logit_cache) == 3 and not first.logit_cache.cleared
    first.teardown("fit")
    again = fingerprinted(tiny_world, cache_dir, alpha=0.5)
    assert not again.logit_cache.cleared and again.logit_cache.hits == 3, "same models: reused (alpha is not stored)"
    again.teardown("fit")

    other_large = fingerprinted({**tiny_world, "large": tiny_world["small"]}, cache_dir)
    assert other_large.logit_cache.cleared and other_large.logit_cache.misses == 3
    other_large.teardown("fit")
    assert fingerprinted(tiny_world, cache_dir).logit_cache.cleared, "and back"

    copied = tmp_path / "large"
    shutil.copytree(tiny_world["large"], copied)
    fingerprinted({**tiny_world, "large": str(copied)}, cache_dir).teardown("fit")
    weights = next(copied.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    touched = fingerprinted({**tiny_world, "large": str(copied)}, cache_dir)
    assert not touched.logit_cache.cleared and touched.logit_cache.hits == 3, "weights touched, same content: kept"
    touched.teardown("fit")
    assert fingerprinted({**tiny_world, "large": str(copied)}, cache_dir, large_dtype="float32").logit_cache.cleared
    assert fingerprinted({**tiny_world, "large": str(copied)}, cache_dir,
                         logit_cache_dtype="bfloat16").logit_cache.cleared

    names = ["large", "reference"]
    FrozenLogitCache(names, 8, "disk", tmp_path / "direct", fingerprint={"vocab": "a"}).close()
    assert not FrozenLogitCache(names, 8, "disk", tmp_path / "direct", fingerprint={"vocab": "a"}).cleared
    assert FrozenLogitCache(names, 8, "disk", tmp_path / "direct", fingerprint={"vocab": "b"}).cleared
    assert FrozenLogitCache(names, 8, "disk", tmp_path / "direct", fingerprint={"vocab": "b", "data": 1}).cleared


def test_weights_replaced_with_the_same_size_and_time_rebuild_the_cache(tiny_world: dict, tmp_path: Path) -> None:
    """Before: files were fingerprinted by name, size and modification time, so other weights of the same size
    written with the old time were read back as the old model's logits."""
    large = tmp_path / "large"
    shutil.copytree(tiny_world["large"], large)
    cache_dir = tmp_path / "cache"
    first = fingerprinted({**tiny_world, "large": str(large)}, cache_dir)
    batch = make_batch(tiny_world, ("forget",))["forget"]
    old = first.combined.frozen_parts(batch["input_ids"], batch["attention_mask"])[0]
    first.teardown("fit")
    weights = next(large.glob("*.safetensors"))
    stat = weights.stat()
    other = tmp_path / "other"  # the same architecture and size, other values (seed 7)
    build_tiny_llama(load_tokenizer(tiny_world["tokenizer"]), other, seed=7, hidden_size=32, num_layers=2,
                     num_heads=2)
    replacement = next(other.glob("*.safetensors")).read_bytes()
    assert len(replacement) == stat.st_size and replacement != weights.read_bytes()
    weights.write_bytes(replacement)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    again = fingerprinted({**tiny_world, "large": str(large)}, cache_dir)
    assert again.logit_cache.cleared and again.logit_cache.hits == 0
    new = again.combined.frozen_parts(batch["input_ids"], batch["attention_mask"])[0]
    expected = again.combined.frozen_logits(batch["input_ids"], batch["attention_mask"])[0]
    attended = batch["attention_mask"].bool()
    assert (new - old)[attended].abs().max() > 0.01, "the old model's logits are not read back"
    torch.testing.assert_close(new[attended].float(), expected[attended].float(), atol=0.01, rtol=0)


def test_a_memoised_digest_is_reused_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    from lightning_unlearn.offset.logit_cache import file_digest

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    memo: dict = {}
    first = file_digest(path, memo)
    memo[str(path.resolve())]["hashed"] += 10  # as if hashed long after its last change: trusted
    memo[str(path.resolve())]["sha256"] = "memoised"
    assert file_digest(path, memo) == "memoised"
    stat = path.stat()
    path.write_bytes(b"b" * 100)  # same size; the old modification time restored: ctime still moves
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(path, memo) not in ("memoised", first)


def test_an_interrupted_write_is_trimmed(tmp_path: Path) -> None:
    cache = FrozenLogitCache(["large", "reference"], 5, "disk", tmp_path)
    ids, mask = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 1, 1, 0]])
    values = [torch.randn(1, 4, 5), torch.randn(1, 4, 5)]
    first = cache.get(ids, mask, lambda i, m: [v[:, :3] for v in values])
    cache.close()
    with open(tmp_path / DATA_FILE, "ab") as f:  # rows written, index line never written
        f.write(b"\0" * 37)
    reopened = FrozenLogitCache(["large", "reference"], 5, "disk", tmp_path)
    again = reopened.get(ids, mask, lambda i, m: pytest.fail("the indexed rows are still there"))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert (tmp_path / DATA_FILE).stat().st_size == 3 * 2 * 5 * 2


def test_left_padded_rows_are_placed_at_their_positions() -> None:
    cache = FrozenLogitCache(["large"], 5, "memory", dtype=torch.float32)
    ids, mask = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    values = torch.randn(2, 4, 5)
    (got,) = cache.get(ids, mask, lambda i, m: [values])
    assert torch.equal(got[0, 2:], values[0, 2:]) and (got[0, :2] == 0).all() and torch.equal(got[1], values[1])
    (again,) = cache.get(ids, mask, lambda i, m: pytest.fail("all rows are cached"))
    assert torch.equal(again, got)


def test_direct_mode_caches_the_reference_only(tiny_world: dict) -> None:
    module = built(NPO, tiny_world, large=None, retain_loss="none", logit_cache="memory")
    assert module.logit_cache.names == ("reference",)
    assert built(GA, tiny_world, large=None, logit_cache="memory").logit_cache is None, "nothing frozen to cache"
    batch = make_batch(tiny_world, ("forget",))
    assert module.compute_losses(batch)["forget_loss"].item() == pytest.approx(
        2 / 0.1 * torch.log(torch.tensor(2.0)).item(), rel=1e-3)


def test_lora_reference_is_cached_too(tiny_world: dict) -> None:
    module = built(NPO, tiny_world, lora_rank=4, logit_cache="memory", retain_loss="none")
    batch = make_batch(tiny_world, ("forget",))
    calls = []
    original = module.combined.reference_logits
    module.combined.reference_logits = lambda *a: calls.append(1) or original(*a)
    module.compute_losses(batch)
    module.compute_losses(batch)
    assert calls == [1]


def test_disk_cache_needs_a_folder(tiny_world: dict) -> None:
    with pytest.raises(ValueError, match="logit_cache_dir"):
        NPO(small_model=tiny_world["small"], large_model=tiny_world["large"], logit_cache="disk")


def test_fit_from_the_command_line_with_lora_and_a_disk_cache(tiny_world: dict, tmp_cwd: Path) -> None:
    from lightning_unlearn.cli import main

    config = str(Path(__file__).resolve().parents[3] / "configs" / "tests" / "fast.yaml")
    cli = main(["fit", "--config", config, "--model", "KL", "--model.small_model", tiny_world["small"],
                "--model.large_model", tiny_world["large"], "--model.lora_rank", "4", "--model.logit_cache", "disk",
                "--model.logit_cache_dir", str(tmp_cwd / "cache")])
    assert cli.trainer.global_step == 1
    assert (tmp_cwd / "cache" / "rank0" / DATA_FILE).stat().st_size > 0
