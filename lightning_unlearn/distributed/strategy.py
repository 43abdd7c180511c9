"""``--trainer.strategy fsdp2``: Lightning's ``ModelParallelStrategy`` as fully sharded data parallelism (FSDP2).

Lightning's ``ModelParallelStrategy`` makes a 2-D device mesh (data parallel x tensor parallel) and leaves the
parallelisation to the module's ``configure_model``; its defaults put every device of a node in the tensor-parallel
dimension. Unlearning a Hugging Face model wants the other corner: every device data parallel, each model sharded
over all of them (ZeRO-3), tensor parallel size 1. :class:`FSDP2Strategy` is that, registered in Lightning's
``StrategyRegistry`` as ``fsdp2`` (importing this module registers it), carrying the sharding settings
(:class:`~lightning_unlearn.distributed.sharding.ShardingPolicy`) the module's ``configure_model`` applies
(:func:`shard_unlearn_models`).

Checkpoints are distributed (a folder: one shard file per rank and ``meta.pt`` with the loops', callbacks' and RNG
states), holding only the trained weights and their optimizer state: the frozen models are reloaded from their ids,
as in single-process checkpoints. :func:`check_checkpoint_strategy` refuses, before any model is built, a folder
checkpoint resumed under another strategy (which would fail reading a directory as a file), naming the strategy to use.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch.distributed.constants import default_pg_timeout

from .sharding import ParamDType, ShardingPolicy, full_state_dict, is_sharded, shard_causal_lm

NAME = "fsdp2"
METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint

__all__ = ["FSDP2Strategy", "NAME", "check_checkpoint_strategy", "gather_for_export", "is_distributed_checkpoint",
           "shard_unlearn_models"]


class FSDP2Strategy(ModelParallelStrategy):
    """Every device data parallel, each model sharded over all of them with FSDP2 (``--trainer.strategy fsdp2``).

    Args:
        data_parallel_size: devices each model is sharded over; ``auto``: the world size divided by
            ``tensor_parallel_size`` (all devices of all nodes).
        tensor_parallel_size: 1 (tensor parallelism is not implemented for these models; larger values are refused).
        param_dtype: dtype the gathered layers compute in; ``auto``: ``bfloat16`` on CUDA, the weights' own dtype on
            CPU (where bf16 matmuls are slow and the equality tests want float32); ``null``: the weights' dtype.
        reduce_dtype: dtype of the gradients' reduce-scatter (``float32``).
        activation_checkpointing: recompute the trained model's decoder layers in the backward pass.
        offload_frozen: keep the frozen models' shards in host memory between their layers' forwards.
        reshard_after_forward: free the trained model's gathered layers after their forward (ZeRO-3).
        save_distributed_checkpoint: one shard file per rank (``True``) or the full weights gathered in one file.
        process_group_backend: ``gloo`` on CPU, ``nccl`` on CUDA by default.
        timeout: collective timeout.

    Raises:
        ValueError: ``tensor_parallel_size`` other than 1.
    """

    strategy_name = NAME

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        param_dtype: Literal["auto"] | ParamDType = "auto",
        reduce_dtype: ParamDType = "float32",
        activation_checkpointing: bool = False,
        offload_frozen: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size}: the fsdp2 strategy shards each model over "
                             "all devices (data parallel) and has no tensor-parallel plan for these models; set "
                             "--trainer.strategy.tensor_parallel_size 1.")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self._param_dtype = param_dtype
        self._policy_settings = {"reduce_dtype": reduce_dtype, "activation_checkpointing": activation_checkpointing,
                                 "offload_frozen": offload_frozen, "reshard_after_forward": reshard_after_forward}

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the number of nodes (tensor parallel within a node); here it is
        # every process, so that one model is sharded over all devices.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def policy(self) -> ShardingPolicy:
        """The sharding settings, ``param_dtype`` resolved for the device (``auto``: bf16 on CUDA only)."""
        dtype = self._param_dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.root_device.type == "cuda" else None
        return ShardingPolicy(param_dtype=dtype, **self._policy_settings)

    @property
    def data_parallel_mesh(self) -> "torch.distributed.device_mesh.DeviceMesh":
        return self.device_mesh["data_parallel"]

    # Evaluation runs generation, which stops when a rank's rows have all ended: ranks run different numbers of
    # forwards, and a sharded forward all-gathers, so the ranks would wait on each other forever. During validation
    # and test every model is gathered whole once (one collective per model, same on every rank) and kept gathered,
    # so the evaluation's forwards run without collectives; the shards come back at the end. The cost is the full
    # weights on every device while evaluating (no gradients, no optimizer state then).
    def on_validation_start(self) -> None:
        gather_whole(self.lightning_module)

    def on_validation_end(self) -> None:
        reshard_all(self.lightning_module)

    def on_test_start(self) -> None:
        gather_whole(self.lightning_module)

    def on_test_end(self) -> None:
        reshard_all(self.lightning_module)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a distributed checkpoint that holds only the trained weights (the frozen models are not in it).

        Lightning's loader reads every key of the module's state from the checkpoint and fails on the frozen
        models' keys; here only the keys the checkpoint holds are read (then set non-strictly), with the optimizer
        states, and the returned metadata carries them as ``state_dict`` for the module's own check. A full
        (single-file) checkpoint goes to Lightning's loader, which broadcasts it from rank 0."""
        path = Path(self.broadcast(checkpoint_path))
        if not is_distributed_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        stored = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        model_state = {k: v for k, v in get_model_state_dict(self.model).items() if f"state_dict.{k}" in stored}
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state[f"optimizer_{index}"],
                                     options=StateDictOptions(cpu_offload=True))
        metadata = torch.load(path / METADATA, weights_only=weights_only)
        metadata["state_dict"] = model_state
        return metadata


StrategyRegistry.register(NAME, FSDP2Strategy, description="FSDP2 (fully_shard) over all devices, through "
                          "Lightning's ModelParallelStrategy (lightning_unlearn.distributed.strategy)", override=True)


def _fsdp_modules(module: Any) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)] if module is not None else []


def gather_whole(module: Any) -> None:
    """Gather every sharded model of ``module`` whole and keep it gathered through forwards (a collective)."""
    for fsdp in _fsdp_modules(module):
        fsdp.set_reshard_after_forward(False, recurse=False)
    for fsdp in _fsdp_modules(module):
        fsdp.unshard()


def reshard_all(module: Any) -> None:
    """Back to shards after :func:`gather_whole`: every unit frees its gathered weights and reshards after forwards
    as :func:`~lightning_unlearn.distributed.sharding.shard_causal_lm` set it."""
    for fsdp in _fsdp_modules(module):
        fsdp.reshard()
        fsdp.set_reshard_after_forward(getattr(fsdp, "reshard_after_forward_setting", True), recurse=False)


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed (sharded) checkpoint: a folder with ``.metadata`` (torch DCP) inside."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def check_checkpoint_strategy(ckpt_path: str | Path | None, strategy: Any) -> None:
    """Refuse to resume a checkpoint with a strategy that cannot read it, before any model is loaded.

    A distributed checkpoint (a folder of shards) is read only by the ``fsdp2`` strategy; a single-file
    checkpoint (``ddp``, one device, or ``fsdp2`` with ``save_distributed_checkpoint: false``) is read by all.

    Raises:
        ValueError: a folder checkpoint with a strategy other than ``fsdp2``, or a ``ckpt_path`` folder that is not
            a checkpoint.
    """
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return
    path = Path(ckpt_path)
    if not path.is_dir():
        return
    if not is_distributed_checkpoint(path):
        raise ValueError(f"--ckpt_path {path} is a folder without a distributed checkpoint in it (no .metadata): "
                         "give a .ckpt file or a folder written by --trainer.strategy fsdp2.")
    name = strategy if isinstance(strategy, str) else getattr(strategy, "strategy_name", type(strategy).__name__)
    if not isinstance(strategy, FSDP2Strategy) and name != NAME:
        raise ValueError(f"--ckpt_path {path} is a distributed (sharded) checkpoint written by --trainer.strategy "
                         f"fsdp2; the strategy {name!r} cannot read it. Resume with --trainer.strategy fsdp2 (any "
                         "number of devices), or convert it to one file with torch.distributed.checkpoint.format_utils."
                         "dcp_to_torch_save.")


def shard_unlearn_models(module: Any) -> bool:
    """Shard an unlearning module's models when its trainer runs :class:`FSDP2Strategy`; returns whether it did.

    Called at the end of the module's ``configure_model`` (all ranks). ``module.model`` (trained) is sharded with
    the policy's mixed precision and checkpointing; the frozen ``module.large`` (when local) and
    ``module.reference`` are sharded too, unless a logit cache is on: a cache hit on one rank and a miss on another
    would make only one rank run the frozen models' forward, whose all-gathers would then wait forever, so with a
    cache the frozen models are kept whole on every rank (each rank computes its own misses). A LoRA adapter's
    random initialisation is copied from rank 0 first, as DDP does when it wraps a model.

    Raises:
        ValueError: ``large_device`` is set (FSDP2 places every shard on the rank's own device).
    """
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDP2Strategy) or module.model is None or is_sharded(module.model):
        return False
    hparams = module.hparams
    if hparams.get("large_device") is not None:
        raise ValueError(f"large_device={hparams.large_device!r} with --trainer.strategy fsdp2: the large model is "
                         "sharded over all devices; set --model.large_device null.")
    mesh, policy = strategy.data_parallel_mesh, strategy.policy
    if hparams.get("gradient_checkpointing") and not policy.activation_checkpointing:  # non-reentrant under FSDP2
        policy = dataclasses.replace(policy, activation_checkpointing=True)
    device = strategy.root_device
    if hparams.get("lora_rank") is not None and torch.distributed.is_initialized():
        with torch.no_grad():
            for parameter in module.model.parameters():
                if parameter.requires_grad:
                    torch.distributed.broadcast(parameter.data, src=0)
    shard_causal_lm(module.model.to(device), mesh, policy, trainable=True)
    if hparams.get("logit_cache") is None:
        for frozen in (getattr(module, "large", None), getattr(module, "reference", None)):
            if isinstance(frozen, torch.nn.Module) and hasattr(frozen, "config"):  # local HF model, not a served one
                shard_causal_lm(frozen if policy.offload_frozen else frozen.to(device), mesh, policy, trainable=False)
    return True


def gather_for_export(module: Any) -> dict[str, torch.Tensor] | None:
    """The trained model's full weights gathered on every rank (``None`` when it is not sharded): what the export
    saves in place of the model's own (sharded) state dict. A collective: every rank calls it. With LoRA only the
    adapter's weights are gathered (peft saves only those)."""
    if not is_sharded(module.model):
        return None
    return full_state_dict(module.model, trainable_only=module.hparams.get("lora_rank") is not None)


def plan_sharding(trainer: Any) -> dict[str, Any] | None:
    """The fsdp2 settings the memory plan needs (:func:`lightning_unlearn.models.memory.run_spec`'s ``sharding``),
    or ``None`` when the trainer does not shard."""
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDP2Strategy):
        return None
    policy = strategy.policy
    return {"devices": strategy.num_nodes * strategy.num_processes, "gather_dtype": policy.param_dtype,
            "offload_frozen": policy.offload_frozen, "activation_checkpointing": policy.activation_checkpointing}
