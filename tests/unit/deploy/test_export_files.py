"""Exports that are broken or misused: a missing file is named before any loader runs, an offset export is refused
where a plain model is expected, and an export reloads in the dtypes it was trained and evaluated in.

Before: a missing ``tokenizer.json`` asked to install sentencepiece or tiktoken, a missing
``adapter_model.safetensors`` said "Repo id must be in the form...", ``test --model SFT --model.small_model EXPORT``
evaluated the bare small model, and an export trained with a float32 large model reloaded it in bfloat16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main as cli_main
from lightning_unlearn.deploy.manifest import OFFSET_MANIFEST, compose, read_export
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.modules import NPO, UnlearnModule

ROOT = Path(__file__).resolve().parents[3]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")


def _module(world: dict, **options: object) -> UnlearnModule:
    module = NPO(small_model=world["small"], **options)
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():  # moved off the reference, as training would
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return module.eval()


@pytest.fixture(scope="module")
def exports(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[UnlearnModule, Path]]:
    """An offset export trained with a float32 large model, a LoRA offset export, and a bfloat16 direct export."""
    root = tmp_path_factory.mktemp("export_files")
    specs = {"offset": {"large_model": tiny_world["large"], "large_dtype": "float32"},
             "lora": {"large_model": tiny_world["large"], "lora_rank": 2},
             "direct_bf16": {"small_dtype": "bfloat16"}}
    out = {}
    for name, options in specs.items():
        module = _module(tiny_world, **options)
        out[name] = (module, module.export(root / name))
    return out


def _without(export: Path, target: Path, name: str) -> Path:
    shutil.copytree(export, target)
    (target / name).unlink()
    return target


@pytest.mark.parametrize("kind,missing,message", [
    ("offset", "tokenizer.json", r"has no tokenizer file \(tokenizer.json"),
    ("offset", "model.safetensors", r"has a config.json but no weights \(model.safetensors"),
    ("offset", "config.json", r"has no config.json"),
    ("lora", "adapter_model.safetensors", r"has an adapter_config.json but no adapter weights \(adapter_model"),
    ("lora", "adapter_config.json", r"has no adapter_config.json"),
])
def test_a_missing_export_file_is_named(kind: str, missing: str, message: str, exports: dict, tmp_path: Path) -> None:
    broken = _without(exports[kind][1], tmp_path / "broken", missing)
    with pytest.raises(FileNotFoundError, match=rf"{broken} {message}"):
        UnlearnedModel.from_export(broken)


def test_a_missing_weight_shard_is_named(exports: dict, tmp_path: Path) -> None:
    sharded = _without(exports["offset"][1], tmp_path / "sharded", "model.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of the 2 weight shards .*'model-00002-of-00002"):
        UnlearnedModel.from_export(sharded)


def test_composition_naming_a_moved_export_is_refused(exports: dict, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(exports["offset"][1], moved)
    manifest = compose(moved).save(tmp_path / "composed")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match=rf"{manifest} lists the offset export '{moved}', which is not a dir"):
        read_export(manifest)


def test_an_offset_export_as_a_plain_model_is_refused(tiny_world: dict, exports: dict, tmp_cwd: Path) -> None:
    """``test --model SFT --model.small_model EXPORT`` used to evaluate the export's small model alone."""
    export = str(exports["offset"][1])
    with pytest.raises(ValueError, match=rf"--model.small_model is '{export}', an offset export \(offset.json\).*"
                                         r"UnlearnedModel.from_export"):
        cli_main(["test", "--config", FAST, "--model", "SFT", "--model.small_model", export])
    with pytest.raises(ValueError, match=r"--model.large_model is .*an offset export"):
        NPO(small_model=tiny_world["small"], large_model=export)
    with pytest.raises(ValueError, match=r"the large model is .*an offset export"):
        UnlearnedModel.from_export(exports["lora"][1], large_model=export)
    with pytest.raises(ValueError, match=r"--my.option is .*composition.json"):
        load_causal_lm(str(compose(export).save(tmp_cwd / "composed")), role="--my.option")
    load_causal_lm(export)  # loading the export's own small model on purpose stays possible


def test_exports_reload_in_the_dtypes_they_were_trained_in(exports: dict, tmp_path: Path) -> None:
    module, path = exports["offset"]
    manifest = json.loads((path / OFFSET_MANIFEST).read_text())
    assert (manifest["large_dtype"], manifest["small_dtype"]) == ("float32", "float32")
    model = UnlearnedModel.from_export(path)
    assert model.large.dtype == torch.float32 and model.offsets[0].dtype == torch.float32
    batch = model.encode(["Who is Basil Mahfouz Al-Kuwaiti?"], ["A writer from Kuwait."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        trained = module(ids, mask)
    torch.testing.assert_close(model.logits(ids, mask), trained, rtol=0, atol=1e-6)
    as_bf16 = UnlearnedModel.from_export(path, large_dtype="bfloat16")  # a dtype given wins over the manifest's
    assert as_bf16.large.dtype == torch.bfloat16
    assert (as_bf16.logits(ids, mask) - trained).abs().max() > 1e-3  # what reloading in bfloat16 used to change
    composed = UnlearnedModel.from_export([path, path])
    assert composed.large.dtype == torch.float32
    reloaded = read_export(composed.save_manifest(tmp_path / "composed"))
    assert (reloaded.large_dtype, reloaded.small_dtype) == ("float32", "float32")
    direct = UnlearnedModel.from_export(exports["direct_bf16"][1])
    assert direct.offsets[0].dtype == torch.bfloat16


def test_exports_recording_different_dtypes_compose_only_with_a_dtype_given(exports: dict, tmp_path: Path) -> None:
    first = exports["offset"][1]
    other = tmp_path / "bf16_large"
    shutil.copytree(first, other)
    manifest = json.loads((other / OFFSET_MANIFEST).read_text())
    (other / OFFSET_MANIFEST).write_text(json.dumps({**manifest, "large_dtype": "bfloat16"}))
    with pytest.raises(ValueError, match=r"different large_dtypes .*pass the one to use"):
        compose([first, other])
    assert compose([first, other], large_dtype="bfloat16").large_dtype == "bfloat16"
