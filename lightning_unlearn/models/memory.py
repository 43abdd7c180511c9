"""The memory plan of a run, made from the models' ``config.json`` before any weight is loaded.

Each model is instantiated on PyTorch's ``meta`` device (shapes without storage), which gives its exact parameter
count, tied embeddings counted once, and the trainable part (full model, LoRA adapter, EUL unlearning layers)
is counted the same way. The plan adds, per device:

* weights: ``parameters x bytes of the dtype`` of the large model, the trained small model and its frozen copy
  (none with LoRA or EUL, whose reference is the same weights with the adapter off);
* gradients and optimizer state of the trainable part: ``trainable x bytes`` for the gradients and
  ``2 x trainable x bytes`` for AdamW's two moments (``torch.optim.AdamW`` keeps ``exp_avg`` and ``exp_avg_sq``
  in the parameter's dtype);
* the logit cache (``memory`` mode): ``models x sequences x T x V x bytes`` for every training sequence of the
  whole run, ``T`` the configured ``max_length`` (an upper bound: only attended positions are stored);
* activations kept for the backward pass of the trainable model, per layer
  ``B T h (34 + 5 a T / h) x bytes / 2`` (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 2, for 16-bit activations; an upper bound with fused attention, which does not keep
  the ``a T^2`` scores), ``B T h x bytes`` per layer with gradient checkpointing plus one layer's full set; and
  ``B T V x 4 bytes`` per float32 logit tensor alive at the loss (trained, reference, large and combined
  logits, their log-softmax and its gradient). ``B`` is the batch size times the data parts (forget, retain,
  refusal) each step runs.

Under ``--trainer.strategy fsdp2`` with ``N`` devices (:mod:`lightning_unlearn.distributed`), every model's weights,
the gradients and the AdamW state are sharded: each device holds ``1/N`` of them. On top of its shards a device
gathers whole layers while they run: the trained model's root (embeddings, final norm, head; kept gathered for the
whole step), the largest frozen root while a frozen model runs, and two decoder layers (the one running and the
next, which FSDP2 prefetches), all in the gathered dtype (``param_dtype``). Activations and logits are per device
and do not shrink: each device runs its own ``batch_size`` rows. With the frozen models offloaded their shards are
in host memory instead.

The plan is compared with each device's free memory (``torch.cuda.mem_get_info``; on CPU the available
physical memory). :func:`check` refuses a plan that does not fit, with the numbers and the options that
would make it fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..offset.sources import is_served

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MemoryPlanError(RuntimeError):
    """A run's memory plan exceeds a device's free memory; the message gives the numbers and the options."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model: exact parameter count and the dimensions of its activations."""

    parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    lora_parameters: dict[int, int] = field(default_factory=dict, compare=False)
    layer_parameters: int = 0  # one decoder layer (the unit FSDP2 gathers); 0: unknown (counted as parameters / L)

    @property
    def layer(self) -> int:
        return self.layer_parameters or -(-self.parameters // max(1, self.num_layers))

    @property
    def root(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, head (FSDP2's root unit)."""
        return max(0, self.parameters - self.num_layers * self.layer)


def load_config(name_or_path: str | Path | dict[str, Any], trust_remote_code: bool = False) -> PretrainedConfig:
    """A model's config from a directory, a ``config.json`` file, a hub id or a dict of its fields.

    Raises:
        OSError: the config cannot be read (an offline hub id, a missing folder).
    """
    if isinstance(name_or_path, dict):
        fields = dict(name_or_path)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(name_or_path)
    if path.is_file():
        return load_config(json.loads(path.read_text()))
    return AutoConfig.from_pretrained(str(name_or_path), local_files_only=path.is_dir(),
                                      trust_remote_code=trust_remote_code)


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device: every shape, no storage, nothing initialised."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


def model_shape(config: PretrainedConfig) -> ModelShape:
    """Exact parameter count (each tensor once, so tied embeddings count once) and activation dimensions."""
    model = meta_model(config)
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] != "lm_head"]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    layers = max(lists, key=len) if lists else []
    return ModelShape(
        layer_parameters=sum(p.numel() for p in layers[0].parameters()) if len(layers) else 0,
        parameters=sum(p.numel() for p in model.parameters()),
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        vocab_size=text.vocab_size,
        lora_parameters={1: sum(m.in_features + m.out_features for m in linears)})


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """LoRA on every linear layer but the head (peft's ``all-linear``): ``r (d_in + d_out)`` per layer."""
    return rank * shape.lora_parameters[1]


def eul_parameters(shape: ModelShape, bottleneck: int | None, fraction: float) -> int:
    """EUL's unlearning layers: ``r (2h + 1) + h`` per decoder layer, ``r`` sized as
    :func:`~lightning_unlearn.models.adapters.default_bottleneck` does when ``bottleneck`` is None."""
    h, n = shape.hidden_size, shape.num_layers
    r = bottleneck or max(1, round((fraction * shape.parameters / n - h) / (2 * h + 1)))
    return n * (r * (2 * h + 1) + h)


@dataclass
class PlanItem:
    """One line of the plan: what, on which device, how many bytes, and how it was computed."""

    device: str
    what: str
    bytes: int
    formula: str


@dataclass
class MemoryPlan:
    """Lines of memory per device and each device's free memory in bytes (None: unknown)."""

    items: list[PlanItem]
    free: dict[str, int | None]
    options: list[str] = field(default_factory=list)
    shard_devices: int = 1

    def per_device(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for item in self.items:
            totals[item.device] = totals.get(item.device, 0) + item.bytes
        return totals

    def over(self) -> dict[str, tuple[int, int]]:
        """Devices whose total exceeds their known free memory: ``{device: (needed, free)}``."""
        return {d: (n, self.free[d]) for d, n in self.per_device().items()
                if self.free.get(d) is not None and n > self.free[d]}

    def render(self) -> str:
        lines = ["memory plan (before loading; estimates, see lightning_unlearn/models/memory.py):"]
        if self.shard_devices > 1:
            lines[0] += f" fsdp2 over {self.shard_devices} devices, each device's share:"
        for item in self.items:
            lines.append(f"  {item.device:<8} {item.what:<34} {item.bytes / GIB:9.3f} GiB  {item.formula}")
        for device, total in self.per_device().items():
            free = self.free.get(device)
            have = "free unknown" if free is None else f"free {free / GIB:.2f} GiB"
            lines.append(f"  {device:<8} {'total':<34} {total / GIB:9.3f} GiB  ({have})")
        return "\n".join(lines)


def free_memory(device: str) -> int | None:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` for CUDA, available physical memory for CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def activation_bytes(shape: ModelShape, rows: int, length: int, nbytes: int, checkpointing: bool) -> int:
    """Activations of one trainable model kept for backward (see the module docstring for the formula)."""
    h, a, n = shape.hidden_size, shape.num_heads, shape.num_layers
    per_layer = rows * length * h * (34 + 5 * a * length / h) * nbytes / 2
    if checkpointing:
        return int(n * rows * length * h * nbytes + per_layer)
    return int(n * per_layer)


@dataclass
class RunSpec:
    """The settings of a run the plan reads (module and data hyper-parameters, and where models go)."""

    small: ModelShape
    large: ModelShape | None = None
    small_dtype: str = "float32"
    large_dtype: str = "bfloat16"
    trainable: str = "full"  # "full", "lora", "eul" or "none" (test)
    lora_rank: int | None = None
    eul_bottleneck: int | None = None
    eul_fraction: float = 0.005
    reference_copy: bool = True
    reference_logits: bool = True
    batch_size: int = 8
    max_length: int = 512
    parts: int = 2
    gradient_checkpointing: bool = False
    logit_cache: str | None = None
    cache_sequences: int = 0
    cache_dtype: str = "float16"
    device: str = "cpu"
    large_device: str | None = None
    shard_devices: int = 1  # fsdp2 over this many devices (1: not sharded)
    gather_dtype: str | None = None  # dtype FSDP2 gathers layers in (its param_dtype); None: each model's own
    offload_frozen: bool = False  # fsdp2: the frozen models' shards in host memory
    shard_frozen: bool = True  # fsdp2 shards the frozen models too (not with a logit cache: each rank keeps them whole)


def sharded(spec: RunSpec, devices: int) -> RunSpec:
    """``spec`` under ``--trainer.strategy fsdp2`` with ``devices`` devices (the per-device batch unchanged)."""
    return dataclasses.replace(spec, shard_devices=devices, large_device=None)


def plan(spec: RunSpec, free: dict[str, int | None] | None = None) -> MemoryPlan:
    """The memory plan of ``spec``; ``free`` overrides the measured free memory per device (tests, dry runs).

    Under fsdp2 (``spec.shard_devices > 1``) the lines are one device's share (every device holds the same)."""
    dev, large_dev = spec.device, spec.large_device or spec.device
    n = max(1, spec.shard_devices)
    frozen_dev = "cpu" if n > 1 and spec.offload_frozen and spec.shard_frozen else dev
    if n > 1:
        large_dev = frozen_dev
    share = f" / {n} devices" if n > 1 else ""
    sb, lb = DTYPE_BYTES[spec.small_dtype], DTYPE_BYTES[spec.large_dtype]
    s = spec.small

    def part(total: int) -> int:
        return -(-total // n)

    def frozen(total: int) -> int:
        return part(total) if spec.shard_frozen else total

    fshare = share if spec.shard_frozen else ""

    items = [PlanItem(dev, "small model weights", part(s.parameters * sb), f"{s.parameters:,} x {sb} B{share}")]
    if spec.reference_copy:
        items.append(PlanItem(frozen_dev, "small reference copy (frozen)", frozen(s.parameters * sb),
                              f"{s.parameters:,} x {sb} B{fshare}"))
    if spec.large is not None:
        items.append(PlanItem(large_dev, "large model weights (frozen)", frozen(spec.large.parameters * lb),
                              f"{spec.large.parameters:,} x {lb} B{fshare}"))
    trainable = {"full": s.parameters, "none": 0,
                 "lora": lora_parameters(s, spec.lora_rank or 0),
                 "eul": eul_parameters(s, spec.eul_bottleneck, spec.eul_fraction)}[spec.trainable]
    if spec.trainable in ("lora", "eul"):
        items.append(PlanItem(dev, f"{spec.trainable} weights", part(trainable * sb), f"{trainable:,} x {sb} B{share}"))
    if trainable:
        items.append(PlanItem(dev, "gradients", part(trainable * sb), f"{trainable:,} trainable x {sb} B{share}"))
        items.append(PlanItem(dev, "AdamW state (2 moments)", part(2 * trainable * sb),
                              f"2 x {trainable:,} x {sb} B{share}"))
    if n > 1:
        items.append(gathered_item(spec, dev))
    rows, t, v = spec.batch_size * spec.parts, spec.max_length, s.vocab_size
    if trainable:
        items.append(PlanItem(dev, "activations (trainable model)",
                              activation_bytes(s, rows, t, sb, spec.gradient_checkpointing),
                              f"B={rows} T={t} h={s.hidden_size} a={s.num_heads} L={s.num_layers}"
                              + (" checkpointed" if spec.gradient_checkpointing else "")))
    tensors = (2 if trainable else 1) + (2 if spec.large is not None else int(spec.reference_logits)) + 1
    items.append(PlanItem(dev, "float32 logits", rows * t * v * 4 * tensors, f"{tensors} x B={rows} x T={t} x V={v} x 4 B"))
    if spec.logit_cache == "memory" and spec.cache_sequences:
        models = 2 if spec.large is not None else 1
        cb = DTYPE_BYTES[spec.cache_dtype]
        items.append(PlanItem("cpu", "logit cache (memory)", models * spec.cache_sequences * t * v * cb,
                              f"{models} x {spec.cache_sequences} seqs x T={t} x V={v} x {cb} B"))
    devices = {item.device for item in items}
    measured = {d: (free or {}).get(d, free_memory(d) if free is None else None) for d in devices}
    result = MemoryPlan(items, measured, shard_devices=n)
    result.options = fit_options(spec, fewest_devices(spec, measured.get(dev)) if n == 1 else None)
    return result


def gathered_item(spec: RunSpec, device: str) -> PlanItem:
    """What an fsdp2 device gathers on top of its shards (see the module docstring): the trained model's root,
    the largest frozen root and two decoder layers, in the gathered dtype."""
    models = [(spec.small, spec.small_dtype)]
    if spec.large is not None:
        models.append((spec.large, spec.large_dtype))

    def nbytes(dtype: str) -> int:
        return DTYPE_BYTES[spec.gather_dtype or dtype]

    trained_root = spec.small.root * nbytes(spec.small_dtype)
    frozen_root = max([spec.small.root * nbytes(spec.small_dtype)] * spec.reference_copy
                      + ([spec.large.root * nbytes(spec.large_dtype)] if spec.large is not None else []), default=0)
    layer = max(shape.layer * nbytes(dtype) for shape, dtype in models)
    return PlanItem(device, "gathered units (fsdp2)", trained_root + frozen_root + 2 * layer,
                    f"roots {trained_root / GIB:.2f}+{frozen_root / GIB:.2f} GiB + 2 layers x {layer / GIB:.2f} GiB")


SHARD_COUNTS = (2, 4, 8, 16, 32, 64)
"""Device counts the plan tries under fsdp2 when a run does not fit one device (8 GPUs a node, up to 8 nodes)."""


def fewest_devices(spec: RunSpec, free: int | None) -> tuple[int, int] | None:
    """The fewest devices (of :data:`SHARD_COUNTS`) over which fsdp2 makes ``spec`` fit ``free`` bytes per device,
    with that plan's per-device bytes; ``None`` if the free memory is unknown or no count fits."""
    if free is None:
        return None
    for count in SHARD_COUNTS:
        needed = max(plan(sharded(spec, count), free={d: None for d in (spec.device, "cpu")}).per_device().values())
        if needed <= free:
            return count, needed
    return None


def fit_options(spec: RunSpec, sharding: tuple[int, int] | None = None) -> list[str]:
    """What would make ``spec`` smaller, each with the setting that does it; ``sharding``: the fewest devices over
    which fsdp2 fits it and the per-device bytes then (:func:`fewest_devices`)."""
    options = []
    if spec.shard_devices <= 1:
        if sharding is not None:
            count, needed = sharding
            options.append(f"shard every model over {count} devices (--trainer.strategy fsdp2 --trainer.devices "
                           f"{count}, or several nodes with --trainer.num_nodes): {needed / GIB:.1f} GiB per device")
        else:
            options.append("shard every model over several devices (--trainer.strategy fsdp2 --trainer.devices N): "
                           "weights, gradients and AdamW state divide by N; `lightning-unlearn memory --strategy fsdp2 "
                           "--devices N` plans it")
    elif not spec.offload_frozen and (spec.large is not None or spec.reference_copy):
        options.append("keep the frozen models' shards in host memory (--trainer.strategy.offload_frozen true)")
    if spec.shard_devices > 1 and not spec.gradient_checkpointing and spec.trainable != "none":
        options.append("--trainer.strategy.activation_checkpointing true: recompute each layer in the backward pass")
    if spec.small_dtype == "float32":
        options.append("train the small model in bfloat16 (--model.small_dtype bfloat16): halves its weights, "
                       "gradients and AdamW state")
    if spec.large is not None and spec.large_dtype == "float32":
        options.append("load the large model in bfloat16 (--model.large_dtype bfloat16)")
    if spec.trainable == "full":
        options.append("train a LoRA adapter (--model.lora_rank 8): no frozen copy, gradients and AdamW state only "
                       "for the adapter")
    if spec.large is not None and spec.large_device is None and spec.shard_devices <= 1:
        options.append("put the large model on its own device (--model.large_device cuda:1)")
    if spec.large is not None:
        options.append("serve the large model from another machine (a served large model) so that only the small "
                       "pair is local")
    if not spec.gradient_checkpointing and spec.trainable != "none" and spec.shard_devices <= 1:
        options.append("--model.gradient_checkpointing true: keep one hidden state per layer instead of all "
                       "activations")
    if spec.logit_cache == "memory":
        options.append("--model.logit_cache disk --model.logit_cache_dir DIR: the cache on disk, not in memory")
    options.append("a smaller --data.batch_size (with --trainer.accumulate_grad_batches for the same effective "
                   "batch) or --data.max_length")
    return options


def check(memory_plan: MemoryPlan) -> None:
    """Raise :class:`MemoryPlanError` if a device's plan exceeds its known free memory."""
    over = memory_plan.over()
    if not over:
        return
    short = "; ".join(f"{d}: needs {n / GIB:.2f} GiB, {f / GIB:.2f} GiB free" for d, (n, f) in over.items())
    options = "\n".join(f"  - {o}" for o in memory_plan.options)
    raise MemoryPlanError(f"This run does not fit in memory ({short}).\n{memory_plan.render()}\n"
                          f"Options that make it smaller:\n{options}\n"
                          "Set LIGHTNING_UNLEARN_MEMORY_CHECK=warn to run anyway (the estimate is an upper bound).")


def run_spec(hparams: Any, stage: str, batch_size: int, max_length: int, parts: int, device: str,
             cache_sequences: int = 0, uses_reference: bool = True, sharding: dict[str, Any] | None = None) -> RunSpec:
    """The :class:`RunSpec` of an :class:`~lightning_unlearn.modules.base.UnlearnModule`'s hyper-parameters.

    ``stage`` ``fit`` trains (gradients, optimizer, activations); any other stage only runs forward passes.
    The trainable part is EUL's layers when the hyper-parameters carry ``param_fraction``, a LoRA adapter
    with ``lora_rank``, else the whole small model. ``uses_reference``: the loss reads reference logits (in
    direct mode the frozen copy is then loaded, as :meth:`UnlearnModule.configure_model` does). ``sharding``:
    the fsdp2 settings (``devices``, ``gather_dtype``, ``offload_frozen``, ``activation_checkpointing``) when the
    trainer shards the models, as :func:`lightning_unlearn.distributed.strategy.plan_sharding` gives them.
    """
    h = dict(hparams)
    sharding = sharding or {}
    small = model_shape(load_config(h.get("small_model"), h.get("trust_remote_code", False)))
    # a served large model (lightning_unlearn/offset/sources.py) takes no memory here; its logits arrive as the
    # step's reference rows
    served = bool(h.get("large_model")) and is_served(h["large_model"])
    large = (model_shape(load_config(h["large_model"], h.get("trust_remote_code", False)))
             if h.get("large_model") and not served else None)
    kind = "eul" if "param_fraction" in h else "lora" if h.get("lora_rank") else "full"
    return RunSpec(
        small=small, large=large, small_dtype=h.get("small_dtype", "float32"),
        large_dtype=h.get("large_dtype", "bfloat16"), trainable=kind if stage == "fit" else "none",
        lora_rank=h.get("lora_rank"), eul_bottleneck=h.get("bottleneck"),
        eul_fraction=h.get("param_fraction", 0.005),
        reference_copy=kind == "full" and (large is not None or served or uses_reference),
        reference_logits=large is not None or served or uses_reference,
        batch_size=batch_size, max_length=max_length, parts=parts if stage == "fit" else 1,
        gradient_checkpointing=(bool(h.get("gradient_checkpointing")) or bool(sharding.get("activation_checkpointing")))
        and stage == "fit",
        logit_cache=h.get("logit_cache") if stage == "fit" else None, cache_sequences=cache_sequences,
        cache_dtype=h.get("logit_cache_dtype", "float16"), device=device, large_device=h.get("large_device"),
        shard_devices=int(sharding.get("devices", 1)), gather_dtype=sharding.get("gather_dtype"),
        offload_frozen=bool(sharding.get("offload_frozen")), shard_frozen=h.get("logit_cache") is None)


CHECK_ENV = "LIGHTNING_UNLEARN_MEMORY_CHECK"
"""``warn``: print a plan that does not fit and go on; ``off``: no plan; otherwise (default) refuse it."""


def report(spec_args: dict[str, Any], verbose: bool = True) -> MemoryPlan | None:
    """Print the plan of a run (from :func:`run_spec`'s arguments) and refuse it if it does not fit.

    A model whose config cannot be read (an offline hub id) skips the plan with a note: loading it would fail
    next with its own message.

    Raises:
        MemoryPlanError: the plan exceeds a device's free memory (unless ``LIGHTNING_UNLEARN_MEMORY_CHECK``
            is ``warn`` or ``off``).
    """
    mode = os.environ.get(CHECK_ENV, "refuse")
    if mode == "off":
        return None
    try:
        memory_plan = plan(run_spec(**spec_args))
    except (OSError, ValueError, KeyError) as err:
        print(f"memory plan: skipped (a model config could not be read: {err})")
        return None
    if verbose:
        print(memory_plan.render())
    if mode == "warn":
        if memory_plan.over():
            print("memory plan: does not fit; running anyway (LIGHTNING_UNLEARN_MEMORY_CHECK=warn)")
    else:
        check(memory_plan)
    return memory_plan
