"""``lightning-unlearn memory``: a run's memory plan from model configs (:mod:`lightning_unlearn.models.memory`)."""

from __future__ import annotations

import argparse

from ..models.memory import (DTYPE_BYTES, GIB, SHARD_COUNTS, MemoryPlan, RunSpec, load_config, model_shape, plan,
                             sharded)


def main(argv: list[str] | None = None) -> MemoryPlan:
    """``lightning-unlearn memory --small CONFIG [--large CONFIG] ...``: print a plan from config files (a
    ``config.json``, a model folder or a hub id) without loading any weight."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--small", required=True, help="config of the trained (small) model")
    parser.add_argument("--large", help="config of the frozen large model (offset mode)")
    parser.add_argument("--small-dtype", default="float32", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--large-dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--parts", type=int, default=2, help="data parts per step (forget, retain, ...)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="direct mode, a loss without reference (GA, GD)")
    parser.add_argument("--large-device", help="device of the large model (e.g. cuda:1)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--free-gib", type=float, help="free memory per device (default: measured)")
    parser.add_argument("--strategy", choices=["single", "fsdp2"], default="single",
                        help="fsdp2: every model sharded over --devices devices (--trainer.strategy fsdp2)")
    parser.add_argument("--devices", type=int, default=1, help="devices in all (all nodes) with --strategy fsdp2")
    parser.add_argument("--gather-dtype", choices=sorted(DTYPE_BYTES),
                        help="fsdp2's param_dtype (layers gathered in it; default: each model's dtype)")
    parser.add_argument("--offload-frozen", action="store_true", help="fsdp2: frozen models' shards in host memory")
    args = parser.parse_args(argv)
    if args.strategy == "fsdp2" and args.devices < 2:
        parser.error("--strategy fsdp2 shards over several devices: give --devices N with N >= 2")
    spec = RunSpec(small=model_shape(load_config(args.small)),
                   large=model_shape(load_config(args.large)) if args.large else None,
                   small_dtype=args.small_dtype, large_dtype=args.large_dtype,
                   trainable="lora" if args.lora_rank else "full", lora_rank=args.lora_rank,
                   reference_copy=not args.lora_rank, reference_logits=args.large is not None or not args.no_reference,
                   batch_size=args.batch_size, max_length=args.max_length,
                   parts=args.parts, gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                   large_device=args.large_device, gather_dtype=args.gather_dtype, offload_frozen=args.offload_frozen)
    if args.strategy == "fsdp2":
        spec = sharded(spec, args.devices)
    free = None if args.free_gib is None else {d: int(args.free_gib * GIB) for d in
                                                {args.device, args.large_device or args.device}}
    memory_plan = plan(spec, free)
    print(memory_plan.render())
    over = memory_plan.over()
    print("fits" if not over else "does not fit; options:\n" + "\n".join(f"  - {o}" for o in memory_plan.options))
    print(device_table(spec, memory_plan.free.get(args.device)))
    return memory_plan


def device_table(spec: RunSpec, free: int | None) -> str:
    """Each device's total on 1 device and under fsdp2 on 2..64 devices, and whether it fits ``free`` bytes."""
    free_text = "free unknown" if free is None else f"{free / GIB:.1f} GiB free per device"
    lines = [f"per device by device count ({free_text}):"]
    for count in (1, *SHARD_COUNTS):
        each = plan(sharded(spec, count) if count > 1 else sharded(spec, 1), free={}).per_device()
        total = each.get(spec.device, 0)
        verdict = "" if free is None else ("  fits" if total <= free else "  does not fit")
        how = "one device" if count == 1 else f"fsdp2 x {count}"
        lines.append(f"  {how:<12} {total / GIB:9.1f} GiB{verdict}")
    return "\n".join(lines)

