"""FSDP2 sharding of plain Hugging Face models (``lightning_unlearn.distributed.sharding``), 2 gloo processes on CPU.

One SGD step of a sharded model over two processes, each with half the rows, updates the weights as one unsharded
process does over all the rows (to float32 rounding), for several architectures and a LoRA adapter; a frozen model
sharded the same way gives the same logits.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp2_sharding_cases import step
from lightning_unlearn.distributed.sharding import decoder_layers
from lightning_unlearn.models.families import build_family_model, build_family_tokenizer

TESTS = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, arguments: list[str], cwd: Path, world: int = 2, timeout: float = 300) -> None:
    """Start ``world`` processes of ``script`` as a gloo process group (the variables ``torchrun`` sets)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, str(script), *arguments], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    texts = [f"question {i} answer {i * 7 % 13} and more words" for i in range(200)]
    paths = {}
    for family in ("llama3", "gpt2", "neox", "chatml"):
        tokenizer = build_family_tokenizer(family, texts, 300)
        build_family_model(family, tokenizer, root / family, hidden=16, layers=2, heads=2, seed=3)
        paths[family] = str(root / family)
    return paths


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in b)
    return (diff / sum(float(b[n].double().pow(2).sum()) for n in b)) ** 0.5


def test_decoder_layers_of_each_family(family_models: dict[str, str]) -> None:
    from transformers import AutoModelForCausalLM

    names = {}
    for family, path in family_models.items():
        layers = decoder_layers(AutoModelForCausalLM.from_pretrained(path))
        names[family] = {type(layer).__name__ for layer in layers}
        assert len(layers) == 2
    assert names == {"llama3": {"LlamaDecoderLayer"}, "gpt2": {"GPT2Block"}, "neox": {"GPTNeoXLayer"},
                     "chatml": {"Qwen2DecoderLayer"}}
    with pytest.raises(ValueError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


# One architecture in the fast suite (about 20 s: two processes start); the others and LoRA are slow.
@pytest.mark.parametrize("family,lora", [("llama3", False)] + [
    pytest.param(family, lora, marks=pytest.mark.slow)
    for family, lora in (("gpt2", False), ("neox", False), ("chatml", False), ("llama3", True))])
def test_two_sharded_processes_take_the_step_one_process_takes(family_models: dict[str, str], family: str,
                                                               lora: bool, tmp_path: Path) -> None:
    launch(TESTS / "fsdp2_sharding_cases.py", [family_models[family], str(tmp_path), str(int(lora))], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single, start, logits = step(family_models[family], lora, 0, 1)
    sharded = ranks[0]["weights"]
    assert set(sharded) == set(single) and single
    assert relative(start, single) > 1e-3  # the step moved the weights far more than the tolerance below
    difference = relative(sharded, single)
    assert difference < 1e-5, difference
    # the frozen model sharded the same way: each rank's rows' logits equal the unsharded model's
    torch.testing.assert_close(torch.cat([ranks[0]["logits"], ranks[1]["logits"]]), logits, rtol=1e-5, atol=1e-5)
