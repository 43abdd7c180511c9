"""Exported unlearned models loaded back as one object: same logits, scores and generations as in training,
composed offsets, refused compositions, the command-line tool, and composition forgetting both requests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lightning_unlearn.data.sources import load_split
from lightning_unlearn.commands.generate import main as generate_main
from lightning_unlearn.losses.functional import sequence_logp
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.deploy.manifest import COMPOSITION_MANIFEST, OFFSET_MANIFEST, compose
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.modules import NPO, UnlearnModule

ROOT = Path(__file__).resolve().parents[3]
QUESTIONS = ["Who is Basil Mahfouz Al-Kuwaiti?", "Where was he born?", "What genre?"]
ANSWERS = ["A writer from Kuwait.", "In Kuwait City, Kuwait.", "French literature, mostly novels."]


def trained_module(world: dict, large: str | None, alpha: float = 1.0, seed: int = 0) -> UnlearnModule:
    """An NPO module whose trainable model is moved off the reference, as a few training steps would."""
    module = NPO(small_model=world["small"], large_model=large, alpha=alpha)
    module.setup("fit")
    module.configure_model()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


@pytest.fixture(scope="module")
def exports(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[UnlearnModule, Path]]:
    """Two offset exports against the same models (alphas 1.5 and 0.5), one against another large model,
    and one direct export; each with the module that wrote it."""
    root = tmp_path_factory.mktemp("exports")
    specs = {
        "first": (tiny_world["large"], 1.5, 0),
        "second": (tiny_world["large"], 0.5, 1),
        "other_large": (tiny_world["small"], 1.0, 2),
        "direct": (None, 1.0, 3),
    }
    out = {}
    for name, (large, alpha, seed) in specs.items():
        module = trained_module(tiny_world, large, alpha, seed)
        out[name] = (module, module.export(root / name))
    return out


@pytest.mark.parametrize("kind", ["first", "direct"], ids=["offset", "direct"])
def test_loaded_export_scores_and_generates_like_the_training_module(kind: str, exports: dict) -> None:
    module, path = exports[kind]
    model = UnlearnedModel.from_export(path)
    assert model.composition.is_direct == (kind == "direct")
    batch = model.encode(QUESTIONS, ANSWERS)  # right-padded with labels, as training batches are
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "want padding in the batch"
    with torch.no_grad():
        expected = module(ids, mask)
    got = model.logits(ids, mask)
    assert got.shape == expected.shape
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.log_probs(QUESTIONS, ANSWERS, batch_size=2),
                               sequence_logp(expected, batch["labels"])[0], rtol=0, atol=1e-4)
    per_token = model.token_log_probs(QUESTIONS, ANSWERS)
    assert [len(t) for t in per_token] == sequence_logp(expected, batch["labels"])[1].tolist()
    torch.testing.assert_close(torch.stack([t.sum() for t in per_token]), model.log_probs(QUESTIONS, ANSWERS))

    prompt_ids, prompt_mask = model.prompt_batch(QUESTIONS)
    assert (prompt_mask == 0).any(), "want left padding in the prompts"
    expected_new = module.generate(prompt_ids, prompt_mask, max_new_tokens=12)
    assert torch.equal(model.generate_ids(prompt_ids, prompt_mask, max_new_tokens=12), expected_new)
    texts = [t.strip() for t in module.tokenizer.batch_decode(expected_new, skip_special_tokens=True)]
    assert model.generate(QUESTIONS, max_new_tokens=12, batch_size=2) == texts


def test_prompts_match_training_formatting(exports: dict) -> None:
    module, path = exports["first"]
    model = UnlearnedModel.from_export(path)
    encoded = model.formatter.encode(QUESTIONS[0], ANSWERS[0])
    prompt = model.formatter.prompt_ids(QUESTIONS[0])
    assert encoded.input_ids[: len(prompt)] == prompt
    assert module.tokenizer.decode(prompt, skip_special_tokens=True) == f"Question: {QUESTIONS[0]}\nAnswer:"


def test_composed_offsets_are_the_sum_of_offsets(tiny_world: dict, exports: dict, tmp_path: Path) -> None:
    (_, first), (_, second) = exports["first"], exports["second"]
    model = UnlearnedModel.from_export([first, second], large_dtype="float32")
    assert model.composition.alphas == [1.5, 0.5], "the alphas recorded at training time are the default"
    batch = model.encode(QUESTIONS, ANSWERS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()

    def z(path: str | Path) -> torch.Tensor:
        with torch.no_grad():
            return load_causal_lm(str(path)).eval()(input_ids=ids, attention_mask=mask).logits[real]

    z_l, z_s0, z_1, z_2 = z(tiny_world["large"]), z(tiny_world["small"]), z(first), z(second)
    for alphas in ([1.5, 0.5], [0.3, 2.0]):
        model.set_alphas(alphas)
        manual = z_l + alphas[0] * (z_1 - z_s0) + alphas[1] * (z_2 - z_s0)
        torch.testing.assert_close(model.logits(ids, mask)[real], manual, rtol=0, atol=1e-5)
    model.set_alphas([0.0, 0.0])
    torch.testing.assert_close(model.logits(ids, mask)[real], z_l, rtol=0, atol=1e-6)

    model.set_alphas([0.3, 2.0])
    manifest = model.save_manifest(tmp_path / "composed")
    listed = json.loads(manifest.read_text())
    assert manifest.name == COMPOSITION_MANIFEST
    listed_offsets = [(Path(o["path"]), o["alpha"]) for o in listed["offsets"]]
    assert listed_offsets == [(first.resolve(), 0.3), (second.resolve(), 2.0)]
    assert Path(listed["large_model"]) == Path(tiny_world["large"]).resolve()
    reloaded = UnlearnedModel.from_export(manifest.parent, large_dtype="float32")
    assert torch.equal(reloaded.logits(ids, mask), model.logits(ids, mask))
    assert UnlearnedModel.from_export([first, second], alphas=[0.3, 2.0], large_dtype="float32").logits(
        ids, mask).equal(model.logits(ids, mask))


def test_mismatched_or_mixed_exports_are_refused(exports: dict, tmp_path: Path) -> None:
    first, second = exports["first"][1], exports["second"][1]
    with pytest.raises(ValueError, match="different large_models"):
        compose([first, exports["other_large"][1]])
    moved = tmp_path / "other_reference"
    moved.mkdir()
    for f in second.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((moved / OFFSET_MANIFEST).read_text())
    (moved / OFFSET_MANIFEST).write_text(json.dumps({**manifest, "reference_model": "someone/else"}))
    with pytest.raises(ValueError, match="different reference_models"):
        UnlearnedModel.from_export([first, moved])
    with pytest.raises(ValueError, match="only offset exports"):
        compose([first, exports["direct"][1]])
    with pytest.raises(ValueError, match="one alpha per offset"):
        compose([first, second], alphas=[1.0])
    with pytest.raises(ValueError, match="no offset to scale"):
        compose(exports["direct"][1], alphas=[1.0])
    with pytest.raises(FileNotFoundError, match="No export"):
        compose(tmp_path / "missing")


def test_command_line_answers_prompts(exports: dict, capsys: pytest.CaptureFixture) -> None:
    path = str(exports["first"][1])
    expected = UnlearnedModel.from_export(path).generate(QUESTIONS[:2], max_new_tokens=6)
    out = io.StringIO()
    answers = generate_main([path, "--prompt", QUESTIONS[0], "--prompt", QUESTIONS[1], "--max-new-tokens", "6"],
                            stdout=out)
    assert answers == expected and out.getvalue() == "".join(a + "\n" for a in expected)
    out = io.StringIO()
    generate_main([path, "--max-new-tokens", "6", "--jsonl"], stdin=io.StringIO(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n"),
                  stdout=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [{"prompt": q, "answer": a} for q, a in zip(QUESTIONS[:2], expected)]
    with pytest.raises(SystemExit, match="different large_models"):
        generate_main([path, str(exports["other_large"][1]), "--prompt", "Hi?"])


def test_composed_offsets_forget_both_requests(tiny_world: dict, tmp_cwd: Path) -> None:
    """Two deletion requests (halves of forget01), one offset each; their composition forgets both, and
    selectively: each request's answers lose more than the other request's and than control sets that no
    offset trained on (two retain authors, real authors, world facts).

    Two 10-step GA runs on the tiny models: a few seconds, so not marked slow. The bounds come from the mean
    answer NLL rises measured with 3 initialisations of the two models (the fixture's and 2 others) under OMP 1
    and 2 threads (equal to 4 digits across thread counts; the GA seed changes nothing): a request's own rise /
    the largest other rise (other half, controls) was 2.49-2.84 with offset a and 2.06-2.41 with offset b; with
    both, the smaller own rise / the largest control rise 1.63-2.10, the largest control rise 0.063-0.092
    nats, own rises 0.132-0.149. Bounds: ratios > 1.3, control rise < 0.15 nats.
    """
    from lightning_unlearn.cli import main

    halves = {"a": "forget01[:20]", "b": "forget01[20:]"}
    for name, split in halves.items():
        main(["fit", "--config", str(ROOT / "configs" / "tests" / "fast.yaml"), "--model", "GA",
              "--model.small_model", tiny_world["small"], "--model.large_model", tiny_world["large"],
              "--model.large_dtype", "float32", "--data.forget_split", split, "--trainer.fast_dev_run", "false",
              "--trainer.max_steps", "10", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
              "--trainer.enable_checkpointing", "false", "--model.optimizer", "torch.optim.AdamW",
              "--model.optimizer.lr", "1e-3", "--model.export_dir", str(tmp_cwd / name)])
    rows = {name: load_split("bundled", split) for name, split in halves.items()}
    controls = {"retain": "retain_perturbed[:40]", "ra": "real_authors[:40]", "wf": "world_facts[:40]"}
    rows.update({name: load_split("bundled", split) for name, split in controls.items()})
    model = UnlearnedModel.from_export([tmp_cwd / "a", tmp_cwd / "b"], large_dtype="float32")

    def nll(alphas: list[float]) -> dict[str, float]:
        model.set_alphas(alphas)
        out = {}
        for name, records in rows.items():
            tokens = model.token_log_probs([r["question"] for r in records], [r["answer"] for r in records])
            out[name] = -float(torch.cat(tokens).mean())
        return out

    large, only_a, only_b, both = nll([0.0, 0.0]), nll([1.0, 0.0]), nll([0.0, 1.0]), nll([1.0, 1.0])
    margin = 0.02
    assert only_a["a"] > large["a"] + margin and only_b["b"] > large["b"] + margin, (large, only_a, only_b)
    assert both["a"] > large["a"] + margin and both["b"] > large["b"] + margin, (large, both)
    # Adding the second request's offset does not undo the first's forgetting, and vice versa.
    assert both["a"] >= only_a["a"] and both["b"] >= only_b["b"], (only_a, only_b, both)

    def rise(after: dict[str, float], name: str) -> float:
        return after[name] - large[name]

    for own, other, after in (("a", "b", only_a), ("b", "a", only_b)):
        others = max(rise(after, name) for name in (other, *controls))
        assert rise(after, own) > 1.3 * others, f"request {own}'s offset is not selective: {after} vs {large}"
    worst_control = max(rise(both, name) for name in controls)
    assert min(rise(both, "a"), rise(both, "b")) > 1.3 * worst_control, (large, both)
    assert worst_control < 0.15, f"the composition damages what no request asked to forget: {both} vs {large}"
