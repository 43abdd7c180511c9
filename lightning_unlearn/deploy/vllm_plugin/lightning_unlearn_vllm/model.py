"""The unlearned model as one vLLM model: ``z_L + keep(z_L) * sum_i alpha_i (z_S_i - z_S0)`` per scheduled token.

The large model ``L``, the frozen reference ``S0`` and the trained small models ``S_i`` are each built as vLLM's
own implementation of their architecture (``init_vllm_registered_model``: a Llama is vLLM's ``LlamaForCausalLM``),
as submodules named ``large``, ``reference``, ``offset_a``, ``offset_b``... Every attention layer of each registers
under its own name, so vLLM gives each a paged KV cache of its own shape (the large model's heads and the pair's
differ; vLLM groups full-attention layers of different head sizes into one KV-cache group whose block table all
share), and every model sees exactly the engine's batch: the same token ids and positions of every scheduled
sequence, prefill and decode chunks mixed. :meth:`UnlearnedOffsetForCausalLM.forward` returns the models' last
hidden states side by side (``[tokens, H_L + H_S0 + sum H_S_i]``); :meth:`~UnlearnedOffsetForCausalLM.
compute_logits`, which vLLM calls on the rows it samples from (or scores), splits them, takes each model's logits
and combines them in float32. Sampling, log-probabilities, stop tokens and streaming are then vLLM's own.

``keep`` is ULD's relative-top filter on ``z_L`` (``relative_top`` > 0; every token otherwise); without a reference
(ULD) the ``z_S0`` term is absent. The formula is lightning-unlearn's :mod:`lightning_unlearn.offset.filtered`
and :func:`lightning_unlearn.losses.logit_arithmetic.relative_top_mask`, restated here because this module runs in
vLLM's environment, which does not have lightning-unlearn's dependencies.

The serving folder (written by ``lightning-unlearn serve``) holds the large model's ``config.json`` with
``architectures: ["UnlearnedOffsetForCausalLM"]`` and a ``lightning_unlearn_offset`` entry (see :func:`read_spec`),
the export's tokenizer, and links to the large model's weight files: vLLM's loader reads those as the primary
weights (no prefix: the large model's) and the reference's and offsets' folders as ``secondary_weights`` under
their submodule's prefix.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.utils import init_vllm_registered_model

SPEC_KEY = "lightning_unlearn_offset"
"""The ``config.json`` entry of a serving folder naming the models and strengths (:func:`read_spec`)."""


@dataclass(frozen=True)
class Part:
    """One model of the sum: its submodule name, folder and weight (``alpha_i``, ``-sum alpha_i`` for ``S0``)."""

    name: str
    path: str
    weight: float


def offset_name(index: int) -> str:
    """``offset_a``, ..., ``offset_z``, ``offset_ba``...: digit-free, since vLLM reads a layer's index as the one
    integer in its name (``offset_a.model.layers.3.self_attn.attn`` -> 3)."""
    letters = ""
    while True:
        letters = chr(ord("a") + index % 26) + letters
        index = index // 26
        if index == 0:
            return f"offset_{letters}"


def read_spec(spec: Any) -> tuple[str, list[Part], float, int]:
    """The large model's folder, the weighted parts (offsets, then the reference if any), ``relative_top`` and the
    tokenizer's vocabulary size, from the serving folder's ``lightning_unlearn_offset`` entry::

        {"large_model": DIR, "reference_model": DIR or null, "offsets": [{"path": DIR, "alpha": float}, ...],
         "relative_top": float in [0, 1], "vocab_size": int}

    Raises:
        ValueError: the entry is missing or malformed, or a folder named in it has no ``config.json`` (the server
            then stops while loading the model, before it answers any request).
    """
    if not isinstance(spec, dict):
        raise ValueError(f"The serving folder's config.json has no {SPEC_KEY!r} object: write it with "
                         "`lightning-unlearn serve`.")
    try:
        large, reference, offsets = spec["large_model"], spec["reference_model"], spec["offsets"]
        relative_top, vocab_size = float(spec.get("relative_top", 0.0)), int(spec["vocab_size"])
        weights = [float(o["alpha"]) for o in offsets]
        paths = [str(o["path"]) for o in offsets]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Malformed {SPEC_KEY!r} entry in the serving folder's config.json: {err!r}.") from err
    if not offsets or not all(math.isfinite(w) for w in weights) or not 0.0 <= relative_top <= 1.0:
        raise ValueError(f"{SPEC_KEY!r} needs at least one offset, finite alphas and relative_top in [0, 1].")
    parts = [Part(offset_name(i), p, w) for i, (p, w) in enumerate(zip(paths, weights))]
    if reference is not None:
        parts.append(Part("reference", str(reference), -sum(weights)))
    for path in [large] + [p.path for p in parts]:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} (named in the serving folder's {SPEC_KEY!r}) has no config.json here: "
                             "restart `lightning-unlearn serve` with the models where they are now.")
    return str(large), parts, relative_top, vocab_size


def relative_top_keep(z_large: torch.Tensor, relative_top: float) -> torch.Tensor | None:
    """Where ULD's filter keeps the offset: ``log p(v) >= min(log p_max + log tau, log p_(k))``, ``k = max(1,
    floor(tau V))`` (contrastive decoding's plausibility bound, Li et al. 2023, as ULD uses it); ``None`` when
    ``tau = 0`` keeps every token. Bool ``[N, V]``."""
    if relative_top == 0.0:
        return None
    logp = torch.log_softmax(z_large, dim=-1)
    k = max(1, int(relative_top * logp.shape[-1]))
    kth = logp.topk(k, dim=-1).values[..., -1]
    threshold = torch.minimum(logp.max(dim=-1).values + math.log(relative_top), kth)
    return logp >= threshold.unsqueeze(-1)


class UnlearnedOffsetForCausalLM(nn.Module):
    """vLLM model class of a serving folder: the large model, the reference and the offsets run on the engine's batch;
    logits ``z_L + keep(z_L) * sum_j w_j z_j`` (``w``: the alphas, and ``-sum alpha`` for the reference), float32,
    ``-inf`` beyond the tokenizer's vocabulary (rows some checkpoints pad their embeddings with).

    Raises (while the server starts, from :func:`read_spec` or here):
        ValueError: a malformed spec, a missing model folder, or a model whose vocabulary is smaller than the
            tokenizer's.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        large_path, self.parts, self.relative_top, self.vocab_size = read_spec(
            getattr(vllm_config.model_config.hf_config, SPEC_KEY, None))
        configs = {"large": AutoConfig.from_pretrained(large_path)}
        configs.update((p.name, AutoConfig.from_pretrained(p.path)) for p in self.parts)
        for name, config in configs.items():
            text = config.get_text_config()
            if text.vocab_size < self.vocab_size:
                raise ValueError(f"The {name} model's vocabulary ({text.vocab_size}) is smaller than the tokenizer's "
                                 f"({self.vocab_size}): it was not trained with this export's tokenizer.")
        self.names = list(configs)
        self.widths = [configs[n].get_text_config().hidden_size for n in self.names]
        for name, config in configs.items():
            self.add_module(name, init_vllm_registered_model(vllm_config, prefix=name, hf_config=config))
        self.weights = [p.weight for p in self.parts]
        # The reference and offsets are read from their own folders under their submodule's prefix; the serving
        # folder's weight files (links to the large model's) are the primary, unprefixed ones.
        self.secondary_weights = [DefaultModelLoader.Source(p.path, None, prefix=f"{p.name}.") for p in self.parts]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Refused: each model embeds tokens its own way, so no single embedding stands for the three (vLLM calls this
        only for prompt embeddings and multimodal inputs, which the unlearned model does not take)."""
        raise NotImplementedError("The unlearned offset model takes token ids only (no prompt embeddings).")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Every model on the same scheduled tokens (``input_ids`` ``[T]``, ``positions`` ``[T]``), each with its own
        KV cache; their last hidden states side by side, ``[T, sum of hidden sizes]``."""
        if inputs_embeds is not None:
            raise NotImplementedError("The unlearned offset model takes token ids only (no prompt embeddings).")
        return torch.cat([getattr(self, n)(input_ids, positions) for n in self.names], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The combined logits ``[N, V_large]`` (float32) of the rows vLLM samples from or scores."""
        pieces = torch.split(hidden_states, self.widths, dim=-1)
        logits = [getattr(self, n).compute_logits(h) for n, h in zip(self.names, pieces)]
        large = logits[0].float()
        z_large = large[:, : self.vocab_size]
        delta = sum(w * z[:, : self.vocab_size].float() for w, z in zip(self.weights, logits[1:]))
        keep = relative_top_keep(z_large, self.relative_top)
        out = torch.full_like(large, float("-inf"))
        out[:, : self.vocab_size] = z_large + (delta if keep is None else delta * keep)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route each checkpoint tensor to its model by prefix (unprefixed: the large model's), in the loader's order
        (each source's files in turn, so no tensor is held longer than one model's loader holds it); returns the
        loaded parameters' names with their prefix, for vLLM's check that nothing stayed uninitialised."""
        prefixes = [f"{p.name}." for p in self.parts]

        def owner(item: tuple[str, torch.Tensor]) -> str:
            return next((p[:-1] for p in prefixes if item[0].startswith(p)), "large")

        loaded: set[str] = set()
        for name, group in itertools.groupby(weights, key=owner):
            strip = 0 if name == "large" else len(name) + 1
            model = getattr(self, name)
            loaded |= {f"{name}.{n}" for n in model.load_weights((k[strip:], t) for k, t in group)}
        return loaded
