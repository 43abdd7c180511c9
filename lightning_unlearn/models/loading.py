"""Loading causal LMs by Hugging Face id or local directory (their tokenizers: :mod:`lightning_unlearn.data.tokenizer`).

Everything that touches weights goes through here, so the offline rule (a local folder never hits the
network) and the dtype handling live in one place.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .files import check_model_files, check_model_path

DType = Literal["float32", "bfloat16", "float16"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config string to a torch dtype, with an error that lists the valid names."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"Unknown dtype {name!r}: use one of {sorted(_DTYPES)}.") from None


def _local_only(name_or_path: str) -> bool:
    return os.path.isdir(name_or_path)


def load_causal_lm(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, role: str | None = None
) -> PreTrainedModel:
    """Load a causal LM in the given dtype, offline when ``name_or_path`` is a local directory.

    Args:
        role: the option or argument the path came from (e.g. ``--model.small_model``) where a *plain* model is
            expected: an offset export there is refused, since its weights alone are the bare small model.
            ``None`` where the folder is loaded on purpose as part of an export.

    Raises:
        FileNotFoundError: a local folder lacks ``config.json``, its weights or a shard (named).
        ValueError: ``role`` is given and the path is an offset export, a composition or a file
            (:func:`~lightning_unlearn.models.files.check_model_path`).
        FileNotFoundError: ``role`` is given and nothing is at a local path.
        OSError: the model cannot be loaded otherwise.
    """
    if role is not None:
        check_model_path(name_or_path, role)
    check_model_files(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype),
            local_files_only=_local_only(name_or_path),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"Could not load a causal LM from {name_or_path!r}: give a local directory saved with "
            f"save_pretrained() or a Hugging Face hub id reachable from this machine. ({err})"
        ) from err


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a model in eval mode with no parameter requiring a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_tokenizer(
    first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase, first_name: str, second_name: str
) -> None:
    """Refuse two tokenizers that map any token to different ids.

    Offset logits add vectors index by index, so equal vocabulary *sizes* are not enough: the ids have to
    mean the same tokens.
    """
    vocab_a, vocab_b = first.get_vocab(), second.get_vocab()
    if vocab_a == vocab_b:
        return
    only_a = sorted(set(vocab_a) - set(vocab_b))[:5]
    only_b = sorted(set(vocab_b) - set(vocab_a))[:5]
    moved = sorted(t for t in set(vocab_a) & set(vocab_b) if vocab_a[t] != vocab_b[t])[:5]
    raise ValueError(
        f"The tokenizers of {first_name!r} ({len(vocab_a)} tokens) and {second_name!r} ({len(vocab_b)} tokens) "
        f"differ, so their logits cannot be combined. Tokens only in the first: {only_a}; only in the second: "
        f"{only_b}; same token, different id: {moved}. Use a large and a small model of the same family that "
        "share one tokenizer."
    )
