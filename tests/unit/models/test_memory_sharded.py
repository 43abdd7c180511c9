"""The memory plan under ``--trainer.strategy fsdp2``: each device's share of the sharded weights, gradients and
AdamW state, what it gathers while layers run, and the device counts that fit (hand-computed figures, then the
real settings of the issue: the paper's 13B + 7B pair and a direct Llama-3.1-8B on 80 GiB GPUs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lightning_unlearn.commands.memory import main as memory_command
from lightning_unlearn.models import memory
from lightning_unlearn.models.memory import GIB, RunSpec, load_config, model_shape, plan, sharded

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "model_configs"
FREE_80GB = int(79.1 * GIB)  # what an 80 GB H100 reports free (torch.cuda.mem_get_info) before a run


def shape(parameters: int, layer: int, h: int = 8, layers: int = 2, heads: int = 2, vocab: int = 50
          ) -> memory.ModelShape:
    return memory.ModelShape(parameters, h, layers, heads, vocab, {1: 0}, layer_parameters=layer)


def items(spec: RunSpec) -> dict[str, tuple[str, int]]:
    return {i.what: (i.device, i.bytes) for i in plan(spec, free={"cpu": None, "cuda:0": None}).items}


def test_layer_and_root_parameters_of_llama_2_7b() -> None:
    s = model_shape(load_config(FIXTURES / "Llama-2-7b-chat-hf.json"))
    # a layer: q, k, v, o (4 x 4096^2), gate, up, down (3 x 4096 x 11008), two RMSNorm weights (2 x 4096)
    assert s.layer == 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096 == 202_383_360
    assert s.root == 2 * 32000 * 4096 + 4096  # embeddings, head, final norm


def test_sharded_plan_adds_hand_computed_bytes() -> None:
    # small: 1000 parameters (2 layers of 300, root 400), float32; large: 5000 (2 of 2000, root 1000), bfloat16
    spec = RunSpec(small=shape(1000, 300), large=shape(5000, 2000), small_dtype="float32", large_dtype="bfloat16",
                   batch_size=2, max_length=4, parts=2, shard_devices=4)
    got = items(spec)
    assert got["small model weights"] == ("cpu", 4000 // 4)
    assert got["small reference copy (frozen)"] == ("cpu", 4000 // 4)
    assert got["large model weights (frozen)"] == ("cpu", 10_000 // 4)
    assert got["gradients"] == ("cpu", 1000) and got["AdamW state (2 moments)"] == ("cpu", 2000)
    # trained root 400 x 4 B + largest frozen root max(400 x 4, 1000 x 2) + 2 layers x max(300 x 4, 2000 x 2)
    assert got["gathered units (fsdp2)"] == ("cpu", 1600 + 2000 + 2 * 4000)
    # per-device rows: activations and logits as on one device
    assert got["activations (trainable model)"] == ("cpu", 2 * 9984)
    assert got["float32 logits"] == ("cpu", 5 * 4 * 4 * 50 * 4)
    # gathered in bfloat16: trained root 800, frozen roots max(800, 2000), layers max(600, 4000)
    assert items(dataclasses.replace(spec, gather_dtype="bfloat16"))["gathered units (fsdp2)"][1] == 800 + 2000 + 8000
    # the frozen shards offloaded to host memory; a logit cache keeps the frozen models whole on every rank
    offloaded = items(dataclasses.replace(spec, offload_frozen=True))
    assert offloaded["large model weights (frozen)"] == ("cpu", 2500) and offloaded["small model weights"][0] == "cpu"
    cuda = items(dataclasses.replace(spec, device="cuda:0", offload_frozen=True))
    assert cuda["large model weights (frozen)"][0] == "cpu" and cuda["small model weights"][0] == "cuda:0"
    whole = items(dataclasses.replace(spec, shard_frozen=False))
    assert whole["large model weights (frozen)"][1] == 10_000 and whole["small model weights"][1] == 1000


def test_the_fewest_devices_that_fit_are_offered() -> None:
    spec = RunSpec(small=shape(10**6, 4 * 10**5), batch_size=1, max_length=4, parts=1, device="cuda:0")
    one = max(plan(spec, free={"cuda:0": None}).per_device().values())
    four = max(plan(sharded(spec, 4), free={"cuda:0": None}).per_device().values())
    two = max(plan(sharded(spec, 2), free={"cuda:0": None}).per_device().values())
    assert one > two > four
    refused = plan(spec, free={"cuda:0": (two + four) // 2})  # between 2 and 4 devices' shares: 4 is the fewest
    assert refused.over()
    assert refused.options[0].startswith("shard every model over 4 devices (--trainer.strategy fsdp2 "
                                         "--trainer.devices 4")
    hopeless = plan(spec, free={"cuda:0": 10})
    assert "--trainer.strategy fsdp2 --trainer.devices N" in hopeless.options[0]


def paper_spec(**changes: object) -> RunSpec:
    """The paper's setting: frozen Llama-2-13b-chat, a Llama-2-7b-chat pair trained in full, bf16, batch 8 x 2 parts
    x 512 tokens."""
    return RunSpec(small=model_shape(load_config(FIXTURES / "Llama-2-7b-chat-hf.json")),
                   large=model_shape(load_config(FIXTURES / "Llama-2-13b-chat-hf.json")),
                   small_dtype="bfloat16", large_dtype="bfloat16", batch_size=8, max_length=512, parts=2,
                   device="cuda:0", **changes)


def direct_8b_spec(**changes: object) -> RunSpec:
    """A direct baseline on Llama-3.1-8B (NPO: the frozen reference copy loaded), bf16, gradient checkpointing."""
    return RunSpec(small=model_shape(load_config(FIXTURES / "Llama-3.1-8B-Instruct.json")), small_dtype="bfloat16",
                   batch_size=8, max_length=512, parts=2, gradient_checkpointing=True, device="cuda:0", **changes)


def per_device_gib(spec: RunSpec) -> float:
    return plan(spec, free={"cuda:0": None}).per_device()["cuda:0"] / GIB


def test_the_papers_pair_and_a_direct_8b_fit_8_gpus_of_80_gb() -> None:
    assert per_device_gib(paper_spec()) == pytest.approx(145.88, abs=0.01)  # the 145.9 on one device
    assert per_device_gib(direct_8b_spec()) == pytest.approx(94.13, abs=0.01)  # and 94.1
    # 8 devices: (12.55 + 12.55 + 24.24 + 12.55 + 25.10) / 8 sharded + 2.28 gathered + 54.0 activations + 4.88 logits
    assert per_device_gib(sharded(paper_spec(), 8)) == pytest.approx(72.04, abs=0.01)
    # (3 x 14.96 + 29.92) / 8 sharded + 4.73 gathered (two 1.96 GiB roots: a 128256-token vocabulary) + 3.69 + 15.66
    assert per_device_gib(sharded(direct_8b_spec(), 8)) == pytest.approx(33.42, abs=0.01)
    for spec, fewest in ((paper_spec(), 8), (direct_8b_spec(), 2)):
        refused = plan(spec, free={"cuda:0": FREE_80GB})
        assert refused.over() and f"over {fewest} devices (--trainer.strategy fsdp2 --trainer.devices {fewest}" \
            in refused.options[0]
        assert not plan(sharded(spec, 8), free={"cuda:0": FREE_80GB}).over()
    assert plan(sharded(paper_spec(), 4), free={"cuda:0": FREE_80GB}).over()  # 82.9 GiB: 4 GPUs are not enough


def test_memory_command_prints_each_devices_share_and_the_counts_that_fit(capsys: pytest.CaptureFixture) -> None:
    memory_command(["--small", str(FIXTURES / "Llama-2-7b-chat-hf.json"), "--large",
                    str(FIXTURES / "Llama-2-13b-chat-hf.json"), "--small-dtype", "bfloat16", "--free-gib", "79.1",
                    "--strategy", "fsdp2", "--devices", "8"])
    out = capsys.readouterr().out
    assert "fsdp2 over 8 devices, each device's share" in out and "/ 8 devices" in out
    assert "\nfits\n" in out
    table = out[out.index("per device by device count"):]
    assert "one device       145.9 GiB  does not fit" in table and "fsdp2 x 4         82.9 GiB  does not fit" in table
    assert "fsdp2 x 8         72.0 GiB  fits" in table
    with pytest.raises(SystemExit):
        memory_command(["--small", str(FIXTURES / "Llama-2-7b-chat-hf.json"), "--strategy", "fsdp2"])
