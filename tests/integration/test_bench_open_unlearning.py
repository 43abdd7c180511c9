"""The side-by-side benchmark's shims and agreement check (benchmarks/eval_vs_open_unlearning.py).

The speed comparison is only meaningful if open-unlearning scores the very token sequences this framework
scores: the tokenizer shim's chat template must render, the way open-unlearning tokenizes it, exactly
:class:`PromptFormatter`'s prompt and prompt-plus-answer ids.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_unlearn.data.formatting import PromptFormatter
from lightning_unlearn.data.sources import load_split

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    if "eval_vs_open_unlearning" in sys.modules:
        return sys.modules["eval_vs_open_unlearning"]
    path = ROOT / "benchmarks" / "eval_vs_open_unlearning.py"
    spec = importlib.util.spec_from_file_location("eval_vs_open_unlearning", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tokenizer_shim_renders_the_framework_prompt_and_answer(tiny_world: dict[str, str], tmp_path: Path) -> None:
    bench = _bench()
    config = bench.write_tokenizer_shim(Path(tiny_world["tokenizer"]), tmp_path / "tok")
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "{{ bos_token }}" in config["chat_template"]
    ours = PromptFormatter(AutoTokenizer.from_pretrained(tiny_world["tokenizer"]))
    shim = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    rows = load_split("bundled", "forget01_perturbed")[:5] + load_split("bundled", "world_facts_perturbed")[:5]
    for row in rows:
        q, a = row["question"], row["answer"]
        user = [{"role": "user", "content": q}]
        # open-unlearning (transformers 4.45) tokenizes the rendered chat without adding special tokens.
        prompt = shim(shim.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
        full = shim(shim.apply_chat_template(user + [{"role": "assistant", "content": a}], tokenize=False),
                    add_special_tokens=False)["input_ids"]
        assert prompt == ours.prompt_ids(q)
        assert full == ours.encode(q, a).input_ids


def test_plain_template_escapes_jinja_in_the_literal_text() -> None:
    from jinja2 import Template

    text = _bench().plain_chat_template("{{Q}}: {question} {% A %}", " ", bos=False)
    rendered = Template(text).render(messages=[{"role": "user", "content": "x"}], eos_token="E")
    assert rendered == "{{Q}}: x {% A %}"


def test_model_shim_writes_the_config_transformers_4_reads(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"dtype": "bfloat16", "rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "default"}}))
    (src / "model.safetensors").write_bytes(b"w")
    _bench().write_model_shim(src, tmp_path / "shim")
    config = json.loads((tmp_path / "shim" / "config.json").read_text())
    assert config == {"torch_dtype": "float32", "rope_theta": 500000.0}
    assert (tmp_path / "shim" / "model.safetensors").resolve() == (src / "model.safetensors").resolve()


def test_config_shim_points_tofu_datasets_at_local_files(tmp_path: Path) -> None:
    ou = tmp_path / "ou"
    (ou / "configs" / "data" / "datasets").mkdir(parents=True)
    (ou / "configs" / "model").mkdir()
    (ou / "configs" / "data" / "datasets" / "TOFU_QA_forget.yaml").write_text(
        'TOFU_QA_forget:\n  args:\n    hf_args:\n      name: "forget10"\n      path: "locuslab/TOFU"\n')
    configs = _bench().write_config_shim(ou, tmp_path / "c", Path("/d"), Path("/m"), Path("/t"))
    text = (configs / "data" / "datasets" / "TOFU_QA_forget.yaml").read_text()
    assert "      path: json\n      data_files: /d/${.name}.jsonl\n" in text and "locuslab" not in text
    assert "pretrained_model_name_or_path: /m" in (configs / "model" / "bench_model.yaml").read_text()
    (ou / "configs" / "data" / "datasets" / "TOFU_QA_x.yaml").write_text("x:\n  path: elsewhere\n")
    with pytest.raises(ValueError, match="TOFU_QA_x.yaml"):
        _bench().write_config_shim(ou, tmp_path / "c", Path("/d"), Path("/m"), Path("/t"))


def test_agreement_finds_a_changed_value_and_a_changed_generation() -> None:
    def report(prob: float, text: str) -> dict:
        return {"forget_Q_A_Prob": {"agg_value": prob, "value_by_index": {"0": {"prob": 0.5}, "1": {"prob": prob}}},
                "forget_Q_A_ROUGE": {"agg_value": 1.0, "value_by_index": {
                    "0": {"rougeL_recall": 1.0, "generation": "a"}, "1": {"rougeL_recall": 1.0, "generation": text}}}}

    bench = _bench()
    same = {r["metric"]: r for r in bench.agreement(report(0.25, "b"), report(0.25, "b"))}
    assert same["forget_Q_A_Prob"]["max_abs_diff"] == 0.0 and same["forget_Q_A_ROUGE"]["generations"] == "0/2"
    rows = {r["metric"]: r for r in bench.agreement(report(0.25, "b"), report(0.75, "c"))}
    assert rows["forget_Q_A_Prob"]["max_abs_diff"] == pytest.approx(0.5)
    assert rows["forget_Q_A_ROUGE"]["generations"] == "1/2"
    assert not bench.print_agreement(list(rows.values()), [], [], 1e-5)
    assert bench.print_agreement(list(same.values()), [], [], 1e-5)


def test_agreement_scales_the_tolerance_above_one() -> None:
    def report(score: float) -> dict:
        return {"ra_Truth_Ratio": {"agg_value": 0.5, "value_by_index": {"0": {"score": score}}}}

    bench = _bench()
    close = bench.agreement(report(2000.0), report(2000.01))
    assert close[0]["max_abs_diff"] == pytest.approx(0.01) and close[0]["max_scaled_diff"] == pytest.approx(0.01 / 2000.01)
    assert bench.print_agreement(close, [], [], 1e-5)
    assert not bench.print_agreement(bench.agreement(report(2000.0), report(2000.1)), [], [], 1e-5)
    assert not bench.print_agreement(bench.agreement(report(0.5), report(0.50002)), [], [], 1e-5)
