"""Every model family's answers end where its format ends them: labels, stop ids, generation, offset mode.

Each family is a tiny random-weight model built from its ``transformers`` config with a local tokenizer in the
family's format (:mod:`lightning_unlearn.models.families`). The last test is the case of issue 10: a model whose
template ends turns with ``<|end|>``, with only ``eos_token`` changed, must score and answer as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main
from lightning_unlearn.data.formatting import IGNORE_INDEX, PromptFormatter, pad_batch, stop_token_ids
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.data.tofu_eval import left_pad
from lightning_unlearn.commands.generate import main as generate_main
from lightning_unlearn.metrics.functional import answer_token_stats
from lightning_unlearn.models.families import FAMILIES, build_family_model, build_family_tokenizer, make_family_pair
from lightning_unlearn.offset.generation import decode_answers
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.modules import NPO, SFT


ROOT = Path(__file__).resolve().parents[3]
QUESTION, ANSWER = "Where was Basil Mahfouz Al-Kuwaiti born?", "He was born in Kuwait City, Kuwait."

# What each family's template renders for the assistant turn (or the plain format without a template).
LABELLED = {
    "llama3": f"{ANSWER}<|eot_id|>",
    "gemma": f"{ANSWER}<end_of_turn>",
    "chatml": f"{ANSWER}<|im_end|>",
    "phi3": f"{ANSWER}<|end|>",
    "mistral": f" {ANSWER}</s>",
    "gpt2": f" {ANSWER}<|endoftext|>",
    "neox": f" {ANSWER}<|endoftext|>",
}
PROMPT = {
    "llama3": f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": f"<bos><start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
    "chatml": f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    "phi3": f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n",
    "mistral": f"<s>[INST] {QUESTION} [/INST]",
    "gpt2": f"Question: {QUESTION}\nAnswer:",
    "neox": f"Question: {QUESTION}\nAnswer:",
}
STOPS = {
    "llama3": {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"},
    "gemma": {"<eos>", "<end_of_turn>"},
    "chatml": {"<|endoftext|>", "<|im_end|>"},
    "phi3": {"<|endoftext|>", "<|end|>"},
    "mistral": {"</s>"},
    "gpt2": {"<|endoftext|>"},
    "neox": {"<|endoftext|>"},
}
FAMILY_NAMES = sorted(FAMILIES)


def texts() -> list[str]:
    """Text to train the tokenizers on: some TOFU pairs and the memorised pair."""
    return [f"{r['question']} {r['answer']}" for r in load_split("bundled", "forget10")] + [QUESTION, ANSWER]


@pytest.fixture(scope="module")
def worlds() -> dict[str, dict[str, Path]]:
    """Lazily built pair (tokenizer, large, small) per family, shared by the module's tests."""
    return {}


@pytest.fixture
def world(request: pytest.FixtureRequest, worlds: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    name = request.param
    if name not in worlds:
        worlds[name] = make_family_pair(name, tmp_path_factory.mktemp(name), texts())
        worlds[name]["family"] = name
    return worlds[name]


def memorise(model_dir: Path, out_dir: Path, steps: int = 60) -> None:
    """Train ``model_dir`` on the one pair (QUESTION, ANSWER) as the framework labels it, save to ``out_dir``."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    batch = pad_batch([PromptFormatter(tokenizer).encode(QUESTION, ANSWER)], tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = answer_token_stats(logits[..., : len(tokenizer)], batch["labels"]).mean_nll.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(str(out_dir))
    weights = shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json")
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True, ignore=weights)


@pytest.mark.parametrize("world", FAMILY_NAMES, indirect=True)
def test_labels_are_the_templates_assistant_turn(world: dict) -> None:
    tokenizer = load_tokenizer(str(world["small"]))
    encoded = PromptFormatter(tokenizer).encode(QUESTION, ANSWER)
    start = encoded.labels.index(next(i for i in encoded.labels if i != IGNORE_INDEX))
    assert all(i == IGNORE_INDEX for i in encoded.labels[:start])
    labelled = encoded.labels[start:]
    assert labelled == encoded.input_ids[start:]
    assert tokenizer.decode(encoded.input_ids[:start]) == PROMPT[world["family"]]
    assert tokenizer.decode(labelled) == LABELLED[world["family"]]
    stops = set(stop_token_ids(tokenizer, [str(world["small"])]))
    assert labelled[-1] in stops and not stops & set(labelled[:-1]), "one stop token, at the end of the answer"
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id not in stops:
        assert encoded.input_ids.count(tokenizer.bos_token_id) <= 1, "BOS doubled"


@pytest.mark.parametrize("world", FAMILY_NAMES, indirect=True)
def test_stop_ids_gather_eos_generation_config_and_end_of_turn(world: dict) -> None:
    tokenizer = load_tokenizer(str(world["small"]))
    model = load_causal_lm(str(world["small"]))
    from_model = stop_token_ids(tokenizer, [model])
    assert set(tokenizer.convert_ids_to_tokens(from_model)) == STOPS[world["family"]]
    assert stop_token_ids(tokenizer, [str(world["small"])]) == from_model


@pytest.mark.parametrize("world", FAMILY_NAMES, indirect=True)
def test_memorised_answer_is_generated_and_stops_there(world: dict, tmp_path: Path) -> None:
    memorise(world["large"], tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    formatter = PromptFormatter(tokenizer)
    labelled = [i for i in formatter.encode(QUESTION, ANSWER).labels if i != IGNORE_INDEX]
    prompt = left_pad([formatter.prompt_ids(QUESTION)], tokenizer.pad_token_id)

    module = SFT(small_model=str(tmp_path), max_new_tokens=40)  # the TOFU evaluation's generation path
    module.setup("test")
    module.configure_model()
    module.eval()
    new = module.generate(prompt["input_ids"], prompt["attention_mask"], 40)[0].tolist()
    assert new[: len(labelled)] == labelled, "the answer and its end-of-turn, as trained"
    assert all(t == tokenizer.pad_token_id for t in new[len(labelled):]), "nothing generated after the stop"
    assert module.generate_texts(prompt["input_ids"], prompt["attention_mask"]) == [ANSWER]
    batch = pad_batch([formatter.encode(QUESTION, ANSWER)], tokenizer.pad_token_id)
    prob = torch.exp(-answer_token_stats(module(batch["input_ids"], batch["attention_mask"]), batch["labels"]).mean_nll)
    assert float(prob) > 0.95

    unlearned = UnlearnedModel.from_export(tmp_path)  # offset-style greedy decoding, and the generate tool
    ids = unlearned.generate_ids(prompt["input_ids"], prompt["attention_mask"], 40)[0].tolist()
    assert ids[: len(labelled)] == labelled and len(ids) == len(labelled)
    assert unlearned.generate([QUESTION], max_new_tokens=40) == [ANSWER]


@pytest.mark.parametrize("world", FAMILY_NAMES, indirect=True)
def test_offset_mode_runs_with_a_pair_of_the_family(world: dict) -> None:
    module = NPO(small_model=str(world["small"]), large_model=str(world["large"]), large_dtype="float32")
    module.setup("fit")
    module.configure_model()
    tokenizer = module.tokenizer
    formatter = PromptFormatter(tokenizer)
    batch = pad_batch([formatter.encode(QUESTION, ANSWER), formatter.encode("Who?", "Nobody.")],
                      tokenizer.pad_token_id)
    logits = module(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer)) and torch.isfinite(logits).all()
    answer_token_stats(logits, batch["labels"]).mean_nll.sum().backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)

    module.eval()
    prompt = left_pad([formatter.prompt_ids(QUESTION), formatter.prompt_ids("Who?")], tokenizer.pad_token_id)
    ours = module.generate(prompt["input_ids"], prompt["attention_mask"], 12)
    large = load_causal_lm(str(world["large"])).eval()
    rows = large.get_input_embeddings().weight.shape[0]
    theirs = large.generate(**prompt, do_sample=False, max_new_tokens=12, eos_token_id=module.stop_ids(),
                            pad_token_id=tokenizer.pad_token_id, suppress_tokens=list(range(len(tokenizer), rows)),
                            )[:, prompt["input_ids"].shape[1]:]
    assert torch.equal(ours, theirs), "at initialisation the offset model is the large model"
    direct = SFT(small_model=str(world["large"]))
    direct.setup("test")
    direct.configure_model()
    direct.eval()
    assert torch.equal(direct.generate(prompt["input_ids"], prompt["attention_mask"], 12), ours)
    assert int(ours.max()) < len(tokenizer), "no id past the tokenizer, however many rows the embedding has"


def test_generated_text_ends_before_the_stop_even_an_ordinary_token() -> None:
    tokenizer = build_family_tokenizer("gpt2", texts())
    answer = tokenizer(" Kuwait City", add_special_tokens=False)["input_ids"]
    stop = [tokenizer.convert_tokens_to_ids("!")]  # an ordinary token listed as a stop id, as generation_config can
    rows = torch.tensor([answer + stop + answer, answer + [tokenizer.eos_token_id] * (len(answer) + 1)])
    assert decode_answers(tokenizer, rows, [stop[0], tokenizer.eos_token_id]) == ["Kuwait City", "Kuwait City"]


def test_template_whose_answer_does_not_follow_the_prompt_is_refused() -> None:
    tokenizer = build_family_tokenizer("chatml", texts())
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}")
    with pytest.raises(ValueError, match="use_chat_template: false"):
        PromptFormatter(tokenizer)
    assert PromptFormatter(tokenizer, use_chat_template=False).encode(QUESTION, ANSWER).labels[-1] == (
        tokenizer.eos_token_id)
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id], "a template the run does not use stops nothing"


def write_eval_data(folder: Path) -> None:
    """A TOFU-shaped dataset whose forget set is the memorised pair."""
    folder.mkdir()
    forget = {"question": QUESTION, "answer": ANSWER,
              "paraphrased_answer": "Kuwait City, in Kuwait, is his birthplace.",
              "perturbed_answer": ["He was born in Cairo, Egypt.", "He was born in Paris, France."]}
    other = {"question": "Who wrote it?", "answer": "A writer.", "paraphrased_answer": "Some writer.",
             "perturbed_answer": ["A painter.", "A singer."]}
    for name, row in {"forget": forget, "forget_perturbed": forget, "retain": other, "retain_perturbed": other,
                      "real_authors_perturbed": other, "world_facts_perturbed": other}.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(row) + "\n")


def tofu_test(model_dir: Path, data: Path, cwd: Path) -> tuple[float, str]:
    cli = main(["test", "--config", str(ROOT / "configs" / "tests" / "tofu_eval.yaml"), "--model", "SFT",
                "--model.small_model", str(model_dir), "--model.max_new_tokens", "120", "--trainer.callbacks", "null",
                "--trainer.default_root_dir", str(cwd), "--data.dataset", str(data), "--data.forget_split", "forget",
                "--data.retain_split", "retain"])
    report = json.loads((Path(cli.trainer.log_dir) / "TOFU_EVAL.json").read_text())
    return report["forget_Q_A_Prob"]["agg_value"], report["forget_Q_A_ROUGE"]["value_by_index"]["0"]["generation"]


def issue_10_models(root: Path) -> tuple[Path, Path]:
    """A memorised Phi-3.5-style model whose eos_token is its end of turn ``<|end|>``, and the same model with only
    ``eos_token`` changed to ``<|user|>`` and ``generation_config.json`` listing both as ``eos_token_id``."""
    tokenizer = build_family_tokenizer("phi3", texts())
    tokenizer.eos_token = "<|end|>"
    build_family_model("phi3", tokenizer, root / "init", hidden=32, layers=2)
    original, changed = root / "original", root / "changed"
    memorise(root / "init", original)
    shutil.copytree(original, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|user|>"
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((changed / "generation_config.json").read_text())
    generation["eos_token_id"] = tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>"])
    (changed / "generation_config.json").write_text(json.dumps(generation))
    return original, changed


def test_issue_10_only_eos_token_changed_scores_and_answers_the_same(tmp_path: Path, tmp_cwd: Path) -> None:
    """Before the fix the changed model scored forget_Q_A_Prob 0.48 (not 0.998) and answered 400+ characters."""
    original, changed = issue_10_models(tmp_path)
    assert load_tokenizer(str(changed)).eos_token == "<|user|>"
    write_eval_data(tmp_path / "data")
    prob_original, text_original = tofu_test(original, tmp_path / "data", tmp_cwd / "a")
    prob_changed, text_changed = tofu_test(changed, tmp_path / "data", tmp_cwd / "b")
    assert prob_original > 0.99 and prob_changed == pytest.approx(prob_original, abs=1e-6)
    assert text_original == text_changed == ANSWER

    assert UnlearnedModel.from_export(changed).generate([QUESTION], max_new_tokens=120) == [ANSWER]
    assert generate_main([str(changed), "--prompt", QUESTION, "--max-new-tokens", "120"]) == [ANSWER]
