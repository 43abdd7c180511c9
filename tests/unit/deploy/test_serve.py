"""``lightning-unlearn serve`` without starting vLLM: the serving folder it writes, what it refuses before the server
starts, the command line it runs (vLLM's options passed through, this project's defaults otherwise), and the plugin's
entry point. The server itself is tested in test_served_unlearned.py."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lightning_unlearn.commands import serve as serve_cli
from lightning_unlearn.deploy.served import ARCHITECTURE, PLUGIN_DIR, SPEC_KEY, write_serving_folder
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.models.tiny import build_tiny_llama, train_tokenizer
from lightning_unlearn.modules import NPO

from conftest import tofu_texts


def offset_export(world: dict, out: Path, alpha: float, seed: int) -> Path:
    module = NPO(small_model=world["small"], large_model=world["large"], alpha=alpha)
    module.setup("fit")
    module.configure_model()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval().export(out)


@pytest.fixture(scope="module")
def exports(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_exports")
    return {"a": offset_export(tiny_world, root / "a", 1.5, 0), "b": offset_export(tiny_world, root / "b", 0.5, 1)}


def test_serving_folder_names_every_model_and_strength_and_the_stop_ids(exports: dict, tiny_world: dict,
                                                                      tmp_path: Path) -> None:
    folder, composition = write_serving_folder([exports["a"], exports["b"]], tmp_path / "serving", [2.0, -1.0])
    config = json.loads((folder / "config.json").read_text())
    large = json.loads((Path(tiny_world["large"]) / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert {k: v for k, v in config.items() if k not in ("architectures", SPEC_KEY)} == \
        {k: v for k, v in large.items() if k != "architectures"}, "vLLM sizes the engine from the large model's config"
    spec = config[SPEC_KEY]
    assert spec["large_model"] == str(Path(tiny_world["large"]).resolve())
    assert spec["reference_model"] == str(Path(tiny_world["small"]).resolve())
    assert [(o["path"], o["alpha"]) for o in spec["offsets"]] == [(str(exports["a"]), 2.0), (str(exports["b"]), -1.0)]
    assert spec["relative_top"] == 0.0 and composition.alphas == [2.0, -1.0]
    model = UnlearnedModel.from_export([exports["a"], exports["b"]])
    assert spec["vocab_size"] == len(model.tokenizer)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == model.stop_ids
    weights = folder / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (Path(tiny_world["large"]) / "model.safetensors").resolve()
    assert (folder / "tokenizer.json").read_bytes() == (exports["a"] / "tokenizer.json").read_bytes()
    again, _ = write_serving_folder([exports["a"]], folder)
    assert len(json.loads((again / "config.json").read_text())[SPEC_KEY]["offsets"]) == 1, "replaced whole"


def test_a_tokenizer_that_differs_is_refused_before_the_server_starts(exports: dict, tiny_world: dict,
                                                                      tmp_path: Path) -> None:
    other = train_tokenizer(tofu_texts(200), vocab_size=300)
    build_tiny_llama(other, tmp_path / "other_large", seed=5, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="tokenizers of .* differ"):
        write_serving_folder([exports["a"]], tmp_path / "serving", large_model=str(tmp_path / "other_large"))
    assert not (tmp_path / "serving").exists()


def test_direct_and_lora_exports_are_refused_with_the_reason(exports: dict, tiny_world: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="directly unlearned model.*make serve MODEL=EXPORT"):
        write_serving_folder([tiny_world["small"]], tmp_path / "serving")
    lora = tmp_path / "lora"
    shutil.copytree(exports["a"], lora)
    manifest = json.loads((lora / "offset.json").read_text())
    (lora / "offset.json").write_text(json.dumps({**manifest, "adapter": "lora"}))
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_world["small"]}))
    (lora / "model.safetensors").rename(lora / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="is a LoRA offset.*merge_and_unload"):
        write_serving_folder([lora], tmp_path / "serving")


def test_command_passes_vllm_options_through_and_sets_its_defaults_otherwise(exports: dict, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_PYTHON", sys.executable)  # trusted as the vLLM environment; nothing is started
    assert serve_cli.main([str(exports["a"]), str(exports["b"]), "--port", "8011", "--serving-dir", str(tmp_path),
                           "--alphas", "1", "-0.5", "--max-logprobs", "5", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "serving 'a+b': z_L + 1 * (z[a] - z_S0) - 0.5 * (z[b] - z_S0)" in out
    command = out.strip().splitlines()[-1]
    assert command.startswith(f"PYTHONPATH={PLUGIN_DIR} {sys.executable} -m vllm.entrypoints.openai.api_server")
    for option in (f"--model {tmp_path / 'model'}", "--port 8011", "--served-model-name a+b", "--dtype float32",
                   "--no-enable-prefix-caching", "--max-logprobs 5"):
        assert option in command
    assert json.loads((tmp_path / "model" / "config.json").read_text())[SPEC_KEY]["offsets"][1]["alpha"] == -0.5
    serve_cli.main([str(exports["a"]), "--serving-dir", str(tmp_path), "--dtype", "bfloat16",
                    "--enable-prefix-caching", "--served-model-name", "mine", "--print-command"])
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--dtype bfloat16" in command and "float32" not in command
    assert "--enable-prefix-caching" in command and "--no-enable-prefix-caching" not in command
    assert command.count("--served-model-name") == 1 and "--served-model-name mine" in command


def test_the_plugin_folder_declares_vllms_entry_point() -> None:
    """vLLM loads ``vllm.general_plugins`` entry points of every distribution on its path: the plugin folder is one."""
    found = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins")
             if e.name == "lightning_unlearn_offset"]
    assert not found, "the plugin is not installed into this environment"
    distributions = importlib.metadata.distributions(path=[str(PLUGIN_DIR)])
    (entry,) = [e for d in distributions for e in d.entry_points if e.group == "vllm.general_plugins"]
    assert (entry.name, entry.value) == ("lightning_unlearn_offset", "lightning_unlearn_vllm:register")
    assert (PLUGIN_DIR / "lightning_unlearn_vllm" / "model.py").is_file()


def test_without_a_vllm_environment_the_command_says_how_to_get_one(exports: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(FileNotFoundError, match="Cannot serve: no vLLM environment.*make vllm"):
        serve_cli.main([str(exports["a"]), "--port", "8011"])


def test_ulds_reference_free_filtered_offset_is_served_with_its_filter(exports: dict, tmp_path: Path) -> None:
    """ULD's export (no reference, a relative-top filter) fits the same model class: the spec carries the filter
    and no reference, and no reference tokenizer is asked for."""
    uld = tmp_path / "uld"
    shutil.copytree(exports["a"], uld)
    manifest = json.loads((uld / "offset.json").read_text())
    (uld / "offset.json").write_text(json.dumps({**manifest, "reference_model": None, "relative_top": 0.1,
                                                 "alpha": -0.8}))
    folder, _ = write_serving_folder([uld], tmp_path / "serving")
    spec = json.loads((folder / "config.json").read_text())[SPEC_KEY]
    assert spec["reference_model"] is None and spec["relative_top"] == 0.1
    assert [o["alpha"] for o in spec["offsets"]] == [-0.8]
