"""One SGD step of a plain Hugging Face causal LM sharded with FSDP2 over 2 gloo processes, or unsharded in one.

Run as a script by ``test_fsdp2_sharding.py`` (``python fsdp2_sharding_cases.py MODEL_DIR OUT LORA``) once per rank
with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set; :func:`step` with ``world == 1`` is the unsharded
reference. The loss is the summed token NLL over the whole step's tokens (each rank's share divided by the step's
token count, times the world size, since FSDP2 averages the gradients over the ranks), so the update equals one
process's exactly up to float32 rounding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

LR = 0.5
ROWS, LENGTH = 4, 12


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of random ids with different amounts of left padding (0, 3, 5, 8 masked positions)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (ROWS, LENGTH), generator=generator)
    mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    for row, pad in enumerate((0, 3, 5, 8)):
        mask[row, :pad] = 0
    return ids, mask


def token_nll_sum(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return nll, logits


def step(model_dir: str, lora: bool, rank: int, world: int
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Load the model, take one SGD step over this rank's rows, return the full updated trainable weights (rank 0,
    ``{}`` elsewhere), the weights before the step and this rank's logits of a frozen copy's forward (sharded when
    ``world > 1``)."""
    from transformers import AutoModelForCausalLM

    from lightning_unlearn.distributed.sharding import ShardingPolicy, full_state_dict, shard_causal_lm
    from lightning_unlearn.models.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    frozen = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False).eval()
    if lora:
        torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same draw in every process
        model = add_lora(model, 4)
        with torch.no_grad():  # B = 0 at the start would leave A without a gradient: make both move
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    for module in model.modules():  # GPT-2's dropout would draw other masks on other row splits
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, mask = batch(model.config.vocab_size if not lora else model.get_base_model().config.vocab_size)
    tokens = (mask[:, 1:] != 0).sum()  # every label after the shift is a real token where the mask is 1
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        policy = ShardingPolicy(param_dtype=None, reduce_dtype="float32")
        shard_causal_lm(model, mesh, policy, trainable=True)
        shard_causal_lm(frozen, mesh, policy, trainable=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    nll, _ = token_nll_sum(model, ids[rows], mask[rows])
    (nll / tokens * world).backward()
    optimizer.step()
    with torch.no_grad():
        _, frozen_logits = token_nll_sum(frozen, ids[rows], mask[rows])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if world > 1:
        state = full_state_dict(model, trainable_only=True)
    else:
        state = {n: p.detach().clone() for n, p in model.state_dict().items() if n in trainable}
    return (state if rank == 0 else {}), start, frozen_logits


if __name__ == "__main__":
    model_path, out, use_lora = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    weights, _, logits = step(model_path, use_lora, r, w)
    torch.save({"weights": weights, "logits": logits}, out / f"rank{r}.pt")
    torch.distributed.destroy_process_group()
