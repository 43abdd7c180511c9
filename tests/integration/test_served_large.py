"""Offset unlearning against a real vLLM server (CPU build, ``make vllm``) serving a tiny Llama.

The server is started once for the session, by process id, on a free port; every claim about what a served
large model gives (log-probabilities, losses, generations, the tokenizer check, the cache's reuse) is checked
against it and against the same model in-process, never against a stand-in. Without the vLLM environment the
tests are skipped, with the reason; ``make test`` installs it first.

Bounds: 1e-4 on log-probabilities and losses (vLLM's float32 CPU kernels against PyTorch's: seen within 1e-5).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lightning_unlearn.commands import generate as generate_cli
from lightning_unlearn.cli import main
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data.tofu_eval import left_pad
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.offset.logit_cache import FrozenLogitCache
from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer
from lightning_unlearn.modules import NPO, UnlearnModule
from lightning_unlearn.offset.sources import ServedLargeModel, check_served_context, check_served_tokenizer
from lightning_unlearn.offset.vllm_client import ServerUnavailable, VLLMClient
from lightning_unlearn.offset.vllm_server import VLLMServer, free_port, vllm_missing

from conftest import tofu_texts

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
MISSING = vllm_missing()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=f"vLLM server tests: {MISSING}"),
    pytest.mark.timeout(900),
]
PAIRS = [("Who is Basil Mahfouz Al-Kuwaiti?", "A writer born in Kuwait City."),
         ("What genre does he write?", "French literature, mostly novels."),
         ("Where was he born?", "Kuwait City.")]


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A tokenizer, a large model (2 layers, 2 heads of 32: a head size vLLM's CPU attention takes) served by
    vLLM, and a small model, all sharing the tokenizer."""
    root = tmp_path_factory.mktemp("served_world")
    tokenizer = train_tokenizer(tofu_texts(), vocab_size=400, out_dir=root / "tokenizer")
    build_tiny_llama(tokenizer, root / "large", seed=1, hidden_size=64, num_layers=2, num_heads=2)
    build_tiny_llama(tokenizer, root / "small", seed=2, hidden_size=16, num_layers=1, num_heads=2)
    shutil.copytree(root / "large", root / "served")  # the served name's folder, whose weights a test replaces
    server = VLLMServer(root / "served", max_logprobs=len(tokenizer), log=root / "server.log").start()
    try:
        yield {"url": server.url, "large": str(root / "large"), "small": str(root / "small"),
               "served": str(root / "served"), "tokenizer": str(root / "tokenizer"), "vocab": len(tokenizer),
               "root": root}
    finally:
        server.stop()


def batch_of(world: dict, parts: tuple[str, ...] = ("forget", "retain")) -> dict:
    formatter = PromptFormatter(load_tokenizer(world["tokenizer"]), max_length=64)
    items = [{p: formatter.encode(q, a + p) for p in parts} for q, a in PAIRS]
    return collate_parts(items, formatter.tokenizer.pad_token_id)


def in_process_logprobs(world: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    large = load_causal_lm(world["large"], "float32").eval()
    with torch.no_grad():
        return torch.log_softmax(large(input_ids=ids, attention_mask=mask).logits.float(), -1)


def test_full_vocabulary_prompt_logprobs_equal_in_process_log_softmax(served: dict) -> None:
    batch = batch_of(served)["forget"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool(mask.all()), "the batch must have right padding, which is not sent"
    got = ServedLargeModel(served["url"], served["vocab"])(ids, mask)
    expected = in_process_logprobs(served, ids, mask)
    attended = mask.bool()
    torch.testing.assert_close(got[attended], expected[attended], atol=1e-4, rtol=0)
    assert bool((got[~attended] == 0).all())


def test_top_k_keeps_the_head_exact_and_spreads_the_rest_evenly(served: dict) -> None:
    batch = batch_of(served, ("forget",))["forget"]
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    got = ServedLargeModel(served["url"], served["vocab"], top_k=5)(ids, mask)[0, mask[0].bool()]
    expected = in_process_logprobs(served, ids, mask)[0, mask[0].bool()]
    head = expected.topk(5, dim=-1).indices
    torch.testing.assert_close(got.gather(1, head), expected.gather(1, head), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(len(got)), atol=1e-4, rtol=0)
    tail = torch.ones_like(got, dtype=torch.bool).scatter(1, head, False)
    tail[:-1].scatter_(1, ids[0, mask[0].bool()][1:, None], False)  # the actual next token is answered too
    values = got.masked_fill(~tail, float("nan"))
    spread = values.nan_to_num(-1e9).amax(-1) - values.nan_to_num(1e9).amin(-1)
    assert float(spread.max()) < 1e-6


def _module(world: dict, large: str, **kwargs: object) -> UnlearnModule:
    module = NPO(small_model=world["small"], large_model=large, large_dtype="float32", retain_loss="kl", alpha=1.5,
                 **kwargs)
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():  # the same trained offset in both modules
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return module


def test_offset_training_step_with_the_served_model_equals_in_process(served: dict) -> None:
    batch = batch_of(served)
    losses, grads = [], []
    for large in (served["url"], served["large"]):
        module = _module(served, large)
        module.train()
        out = module.compute_losses(batch)
        out["loss"].backward()
        losses.append({k: float(v.detach()) for k, v in out.items()})
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters()]))
    for key in ("loss", "forget_loss", "retain_loss"):
        assert losses[0][key] == pytest.approx(losses[1][key], abs=1e-4), key
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_offset_generation_with_the_served_model_equals_in_process(served: dict) -> None:
    formatter = PromptFormatter(load_tokenizer(served["tokenizer"]), max_length=64)
    batch = left_pad([formatter.prompt_ids(q) for q, _ in PAIRS], formatter.tokenizer.pad_token_id)
    tokens = []
    for large in (served["url"], served["large"]):
        module = _module(served, large).eval()
        tokens.append(module.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=24))
    assert tokens[0].shape[1] > 5 and torch.equal(tokens[0], tokens[1])


def test_a_server_with_another_tokenizer_is_refused_naming_both(served: dict, tmp_path: Path) -> None:
    other = train_tokenizer(tofu_texts(200), vocab_size=300, out_dir=tmp_path / "other")
    build_tiny_llama(other, tmp_path / "other_small", seed=3, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=rf"served large model .*{served['served']}.* and of .*other_small"):
        NPO(small_model=str(tmp_path / "other_small"), large_model=served["url"]).setup("fit")
    check_served_tokenizer(VLLMClient(served["url"]), load_tokenizer(served["tokenizer"]), "same")  # no error


def test_a_resumed_run_reads_the_cache_and_asks_the_server_nothing(served: dict, tmp_path: Path) -> None:
    """Sequences answered once are read back from the disk cache: a source whose server is gone still serves them."""
    batch = batch_of(served, ("forget",))["forget"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    live = ServedLargeModel(served["url"], served["vocab"])
    first = FrozenLogitCache(["large"], served["vocab"], "disk", tmp_path / "cache", torch.float32)
    stored = first.get(ids, mask, lambda i, m: [live(i, m)])[0]
    first.close()
    gone = ServedLargeModel(f"http://127.0.0.1:{free_port()}/v1", served["vocab"],
                            client=VLLMClient(f"http://127.0.0.1:{free_port()}/v1", retries=0))
    with pytest.raises(ServerUnavailable):
        gone(ids, mask)
    again = FrozenLogitCache(["large"], served["vocab"], "disk", tmp_path / "cache", torch.float32)
    assert torch.equal(again.get(ids, mask, lambda i, m: [gone(i, m)])[0], stored) and again.misses == 0


def test_fit_test_and_generate_commands_against_the_server(served: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented user path (docs/guides/served-large-model.md): fit with the served large model (logit
    cache on), test, answer prompts; test metrics and answers equal those with the large model in-process."""
    monkeypatch.chdir(tmp_path)
    export = tmp_path / "export"
    fit = main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", served["small"],
                "--model.large_model", served["url"], "--model.logit_cache", "memory",
                "--model.export_dir", str(export)])
    assert fit.trainer.global_step == 1 and (export / "offset.json").exists()
    fit.trainer.save_checkpoint(tmp_path / "run.ckpt")
    metrics = []
    for large in (served["url"], served["large"]):
        cli = main(["test", "--config", FAST, "--model", "NPO", "--model.small_model", served["small"],
                    "--model.large_model", large, "--model.large_dtype", "float32",
                    "--ckpt_path", str(tmp_path / "run.ckpt")])
        metrics.append({k: float(v) for k, v in cli.trainer.callback_metrics.items()})
    assert {"test/forget_nll", "test/retain_nll"} <= set(metrics[0])
    for key in metrics[1]:
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-4), key
    question = ["--prompt", PAIRS[0][0], "--max-new-tokens", "16"]
    served_answers = generate_cli.main([str(export), *question])
    local_answers = generate_cli.main([str(export), *question, "--large-model", served["large"],
                                       "--large-dtype", "float32"])
    assert served_answers == local_answers and served_answers[0]


def test_a_server_context_below_max_length_is_refused_before_training(served: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The server takes 512 tokens (max_model_len); data.max_length 600 is refused at setup, naming both."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"takes at most 512 tokens .* data.max_length is 600 .*--max-model-len 601"):
        main(["fit", "--config", FAST, "--model", "NPO", "--model.small_model", served["small"],
              "--model.large_model", served["url"], "--data.max_length", "600"])
    check_served_context(ServedLargeModel(served["url"], served["vocab"]), 511, "data.max_length")  # fits


def test_other_weights_behind_the_same_name_rebuild_the_disk_cache(served: dict, tmp_path: Path) -> None:
    """Issue 23, item 4, against vLLM: the served folder's weights are replaced by others of the same size and
    modification time and served again under the same name and context length (a second server, with prefix
    caching on). The disk cache filled from the first server must not be read back: the loss is the new
    weights' (before: the old weights' loss, from the cache). With prefix caching on, repeated requests sharing
    prefixes still give the in-process log-probabilities (no answer refused)."""
    batch = batch_of(served)

    def loss(large: str, **kwargs: object) -> tuple[float, FrozenLogitCache | None]:
        module = _module(served, large, **kwargs).train()
        value = float(module.compute_losses(batch)["loss"].detach())
        cache = module.logit_cache
        module.teardown("fit")
        return value, cache

    cache = {"logit_cache": "disk", "logit_cache_dir": str(tmp_path / "cache"), "logit_cache_dtype": "float32"}
    old, first = loss(served["url"], **cache)
    assert first.misses > 0 and old == pytest.approx(loss(served["large"])[0], abs=1e-4)
    tokenizer = load_tokenizer(served["tokenizer"])
    build_tiny_llama(tokenizer, tmp_path / "other", seed=7, hidden_size=64, num_layers=2, num_heads=2)
    weights = next(Path(served["served"]).glob("*.safetensors"))
    stat, original = weights.stat(), weights.read_bytes()
    replacement = next((tmp_path / "other").glob("*.safetensors")).read_bytes()
    assert len(replacement) == len(original) and replacement != original
    weights.write_bytes(replacement)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        with VLLMServer(served["served"], max_logprobs=served["vocab"], prefix_caching=True,
                        log=tmp_path / "server.log") as other:
            assert VLLMClient(other.url).models()[0]["root"] == VLLMClient(served["url"]).models()[0]["root"]
            new, second = loss(other.url, **cache)
            assert second.cleared and second.hits == 0
            expected = loss(str(tmp_path / "other"))[0]
            print(f"loss: old weights {old:.4f}, new weights served {new:.4f}, in-process {expected:.4f}")
            assert new == pytest.approx(expected, abs=1e-4) and abs(new - old) > 1e-3
            rows = batch["forget"]
            ids, mask = rows["input_ids"], rows["attention_mask"]
            local = in_process_logprobs({**served, "large": str(tmp_path / "other")}, ids, mask)
            for _ in range(2):  # the second time every prefix is in vLLM's prefix cache
                got = ServedLargeModel(other.url, served["vocab"])(ids, mask)
                torch.testing.assert_close(got[mask.bool()], local[mask.bool()], atol=1e-4, rtol=0)
    finally:
        weights.write_bytes(original)
