"""FSDP2 (``torch.distributed.fsdp.fully_shard``) applied to Hugging Face causal LMs, layer by layer.

Fully sharded data parallelism keeps on each of ``N`` devices ``1/N`` of every parameter (and of its gradient and
optimizer state) and all-gathers one decoder layer's full weights just before that layer runs, freeing them after
(Zhao et al. 2023, "PyTorch FSDP"; FSDP2 is the per-parameter ``DTensor`` rewrite of torch >= 2.4). Sharding each
decoder layer as its own unit, then the root (embeddings, final norm, head), bounds the gathered weights alive at
once to about one layer plus the root, which is what makes a model larger than one device trainable.

The frozen models of offset unlearning (the large model ``L`` and the reference ``S0``) are sharded the same way:
they are the larger part of the weights (a 13B ``L`` is 24 GiB in bf16 next to the 7B pair's 2 x 12.6 GiB), and
FSDP2 handles parameters without gradients (they are gathered for the forward and never reduced).

Every rank must run every sharded module's forward the same number of times (each forward all-gathers): code that
skips a forward on one rank only (a cache hit on one rank, a generation that stops earlier on one rank) hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ParamDType = Literal["float32", "bfloat16", "float16"] | None
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["ShardingPolicy", "decoder_layers", "shard_causal_lm", "is_sharded", "full_state_dict"]


@dataclass(frozen=True)
class ShardingPolicy:
    """How the models are sharded (the ``fsdp2`` strategy's settings).

    Args:
        param_dtype: dtype each gathered layer computes in (FSDP2's ``MixedPrecisionPolicy.param_dtype``); the
            sharded parameters and the optimizer stay in the model's own dtype. ``bfloat16`` halves the traffic
            and the gathered layer's memory on a GPU; ``None`` (or ``float32`` on float32 weights) computes in the
            weights' dtype, as a single-process run does: the CPU equality tests use it.
        reduce_dtype: dtype gradients are reduce-scattered in (``float32``: sums of ``N`` bf16 shares lose bits).
        activation_checkpointing: recompute each decoder layer of the trained model in the backward pass instead
            of keeping its activations (non-reentrant ``torch.utils.checkpoint``, which works with adapters behind
            frozen layers and with FSDP2's hooks).
        offload_frozen: keep the frozen models' shards in host memory (``CPUOffloadPolicy``), copied to the device
            layer by layer for the forward; the trained model is never offloaded (its optimizer would run on CPU).
        reshard_after_forward: free each gathered layer after its forward (ZeRO-3); ``False`` keeps the trained
            model's layers gathered until the backward (ZeRO-2-like: less traffic, more memory). Frozen models
            always reshard, since no backward comes to free them.
    """

    param_dtype: ParamDType = "bfloat16"
    reduce_dtype: ParamDType = "float32"
    activation_checkpointing: bool = False
    offload_frozen: bool = False
    reshard_after_forward: bool = True

    def mixed_precision(self) -> "torch.distributed.fsdp.MixedPrecisionPolicy":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=_DTYPES.get(self.param_dtype or ""),
                                    reduce_dtype=_DTYPES.get(self.reduce_dtype or ""), cast_forward_inputs=True)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (``PeftModel.get_base_model``), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (peft-wrapped or not), in order.

    They are the modules whose class the model lists in ``_no_split_modules`` (transformers' own "never split this
    across devices" units: ``LlamaDecoderLayer``, ``GPT2Block``, ``GPTNeoXLayer``...), outermost only; without that
    list, the longest ``nn.ModuleList`` of the model.

    Raises:
        ValueError: no decoder layer is found (the model is not a transformers decoder).
    """
    base = _base(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers: list[nn.Module] = []
    if names:
        inside: set[int] = set()
        for module in base.modules():
            if id(module) in inside:
                continue
            if type(module).__name__ in names:
                layers.append(module)
                inside.update(id(m) for m in module.modules())
    if not layers:
        lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    if not layers:
        raise ValueError(f"{type(base).__name__} has no decoder layers to shard (neither _no_split_modules nor a "
                         "ModuleList of layers): FSDP2 sharding needs a transformers decoder.")
    return layers


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` (or a module inside it) was sharded by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def shard_causal_lm(model: nn.Module, mesh: "torch.distributed.device_mesh.DeviceMesh", policy: ShardingPolicy,
                    trainable: bool) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (1-D, data parallel): each decoder layer, then the root.

    ``trainable``: the model is trained (activation checkpointing applies, never offloaded); otherwise it is a
    frozen model (offloaded if asked, always resharded after its forward). Returns ``model`` (now an
    ``FSDPModule``; its parameters are ``DTensor`` shards, ``model.parameters()`` is what the optimizer takes).

    Raises:
        ValueError: no decoder layer is found.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    layers = decoder_layers(model)
    if trainable and policy.activation_checkpointing:
        base = _base(model)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if (policy.offload_frozen and not trainable) \
        else OffloadPolicy()
    reshard = policy.reshard_after_forward or not trainable
    options = {"mesh": mesh, "mp_policy": policy.mixed_precision(), "offload_policy": offload}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard, **options)
        layer.reshard_after_forward_setting = reshard  # read back by the evaluation's gather (strategy.reshard_all)
    # The root holds the embeddings and the head; it is used last in the backward, so keeping it gathered after the
    # forward costs nothing extra (FSDP2's own advice for the root).
    fully_shard(model, reshard_after_forward=not trainable, **options)
    model.reshard_after_forward_setting = not trainable
    return model


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of a sharded ``model`` on CPU, on every rank (a collective: every rank calls it).

    ``trainable_only``: only the parameters that require a gradient (a LoRA adapter), keys as in
    ``model.state_dict()``.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    for name, tensor in model.state_dict().items():
        if names is not None and name not in names:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        out[name] = full.detach().to("cpu", copy=True)
    return out
