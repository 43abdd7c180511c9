"""Weight-only quantization of a model's linear layers with torchao (int8 and 4-bit, both run on CPU).

Why this attack: unlearning by small weight updates can be undone by rounding (Zhang et al. 2024, "Catastrophic
Failure of LLM Unlearning via Quantization", arXiv:2410.16454): when the update is smaller than a quantization
step, the 4-bit model rounds back to the original weights and the forgotten answers return.

Schemes (torchao 0.18, ``torchao.quantization.quantize_``):

* ``int8``: ``Int8WeightOnlyConfig`` -- symmetric int8 per output channel; activations stay float.
* ``int4``: ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` -- 4-bit weights stored unpacked in int8 tensors
  (exact 4-bit values, 16 levels, not a packed fast kernel: torchao's packed ``Int4WeightOnlyConfig`` kernels need
  CUDA or an x86 packing not available for every shape), per group of ``group_size`` input columns where the layer's
  input width divides by it, else per output channel.

Only ``nn.Linear`` layers are quantized (every projection and, when not tied to the embedding, the output head);
embeddings and norms stay float, as in the usual weight-only schemes.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

__all__ = ["BITS", "quantize_weights"]

BITS = ("int8", "int4")
"""The schemes :func:`quantize_weights` knows."""


def _torchao():  # noqa: ANN202 - the module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as quantization
    except ImportError as err:
        raise ValueError("The quantize attack needs torchao: pip install 'lightning-unlearn[quantize]' (or "
                         "pip install torchao).") from err
    return quantization


def quantize_weights(model: nn.Module, bits: str, group_size: int = 32) -> dict[str, int]:
    """Quantize ``model``'s linear weights in place; returns how many layers got each scheme.

    Args:
        model: any module; its ``nn.Linear`` layers are replaced in place by torchao's quantized weights.
        bits: ``"int8"`` or ``"int4"``.
        group_size: int4's group of input columns sharing a scale (32: the common choice for small models).

    Raises:
        ValueError: an unknown ``bits``, a group size below 1, torchao missing, or no linear layer in ``model``.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}.")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}.")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize.")
    q = _torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup

    counts: Counter[str] = Counter()
    seen: set[int] = set()

    def pick(grouped: bool):  # noqa: ANN202 - torchao's filter
        def keep(module: nn.Module, fqn: str) -> bool:
            if not isinstance(module, nn.Linear) or id(module.weight) in seen:
                return False  # a weight tied to another layer's is quantized once
            ok = (module.in_features % group_size == 0) == grouped
            if ok:
                seen.add(id(module.weight))
                counts[f"{bits}_per_group{group_size}" if grouped else f"{bits}_per_channel"] += 1
            return ok
        return keep

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if bits == "int8":
            q.quantize_(model, q.Int8WeightOnlyConfig(), filter_fn=pick(False))
            # int8 is per output channel whatever the width: count the others under the same name
            q.quantize_(model, q.Int8WeightOnlyConfig(), filter_fn=pick(True))
        else:
            q.quantize_(model, q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size)),
                        filter_fn=pick(True))
            q.quantize_(model, q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0)),
                        filter_fn=pick(False))
    if bits == "int8":
        counts = Counter({"int8_per_channel": sum(counts.values())})
    return dict(counts)
