"""What a local model or export directory must hold, checked before any loader reads it.

Hugging Face's loaders report a missing file as something else: a folder without ``tokenizer.json`` asks to
install sentencepiece or tiktoken, one without ``adapter_model.safetensors`` says the path is not a valid hub
repo id. An export copied in part (or a run stopped while it was written) is the usual cause, so the folder is
checked first and the missing file named.

An offset export (a folder with ``offset.json``) holds a complete Hugging Face model, but that model is only the
trained small model ``S`` of ``z_L + alpha (z_S - z_S0)``: loaded where a plain model is expected it evaluates the
bare small model, silently. :func:`refuse_offset_export` stops that and names the loaders that do combine it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ADAPTER_CONFIG", "COMPOSITION_MANIFEST", "MANIFEST_MODELS", "MODEL_CONFIG", "OFFSET_MANIFEST",
           "check_adapter_files", "check_model_files", "portable_models", "refuse_offset_export", "resolve_beside"]

OFFSET_MANIFEST = "offset.json"
COMPOSITION_MANIFEST = "composition.json"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"

# Weight files, whole or sharded (an index names its shards), in the order ``save_pretrained`` prefers them.
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

RIGHT_USE = ("load it with UnlearnedModel.from_export(EXPORT), `lightning-unlearn generate EXPORT` "
             "or `lightning-unlearn lm-eval EXPORT`, or evaluate it on TOFU with `main.py test --config "
             "<its run's config.yaml> --ckpt_path <its checkpoint>`")


def _first_present(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _check_shards(index: Path) -> None:
    """Every shard a ``*.index.json`` names must be beside it."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{index} is not a readable weight index (no weight_map): {err}") from err
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index.parent} lacks {len(missing)} of the {len(shards)} weight shards its "
                                f"{index.name} lists, e.g. {missing[0]!r}: copy the whole folder again.")


def check_model_files(path: str | os.PathLike) -> None:
    """Refuse a local model folder without ``config.json`` or weights, naming the missing file (a hub id or any
    path that is not a local directory is left to the loader).

    Raises:
        FileNotFoundError: the folder lacks ``config.json``, every weight file, or a listed shard.
    """
    directory = Path(path)
    if not directory.is_dir():
        return
    if not (directory / MODEL_CONFIG).is_file():
        if (directory / ADAPTER_CONFIG).is_file():  # a LoRA adapter: transformers loads it onto its base model
            check_adapter_files(directory)
            return
        raise FileNotFoundError(f"{directory} has no {MODEL_CONFIG}: it is not a Hugging Face model folder (or was "
                                "copied in part). Give the folder save_pretrained() wrote.")
    weights = _first_present(directory, MODEL_WEIGHTS)
    if weights is None:
        raise FileNotFoundError(f"{directory} has a {MODEL_CONFIG} but no weights ({MODEL_WEIGHTS[0]}, or "
                                f"{', '.join(MODEL_WEIGHTS[1:])}): the folder was copied in part; copy it again.")
    if weights.name.endswith(".index.json"):
        _check_shards(weights)


def check_adapter_files(path: str | os.PathLike) -> None:
    """Refuse a LoRA adapter folder without ``adapter_config.json`` or its weights, naming the missing file.

    Raises:
        FileNotFoundError: either file is missing.
    """
    directory = Path(path)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}: it is not a LoRA adapter export (or was "
                                "copied in part).")
    if _first_present(directory, ADAPTER_WEIGHTS) is None:
        raise FileNotFoundError(f"{directory} has an {ADAPTER_CONFIG} but no adapter weights ({ADAPTER_WEIGHTS[0]} "
                                f"or {ADAPTER_WEIGHTS[1]}): the export was copied in part; copy it again.")


def refuse_offset_export(path: str | os.PathLike, role: str) -> None:
    """Refuse an offset export or a composition where one plain model is expected (``role``: where the path came
    from, e.g. ``--model.small_model``).

    Raises:
        ValueError: ``path`` is a folder with ``offset.json`` or ``composition.json``, or a ``composition.json``.
    """
    target = Path(path)
    manifest = next((target / m for m in (OFFSET_MANIFEST, COMPOSITION_MANIFEST) if (target / m).is_file()), None)
    if manifest is None and target.is_file() and target.suffix == ".json":
        manifest = target
    if manifest is None:
        return
    raise ValueError(f"{role} is {str(path)!r}, an offset export ({manifest.name}): its weights are only the trained "
                     "small model S of z_L + alpha (z_S - z_S0), so using it as a plain model would evaluate the bare "
                     f"small model. To use the unlearned model, {RIGHT_USE}.")


MANIFEST_MODELS = ("large_model", "reference_model")
"""The entries of ``offset.json`` that name a model: a local folder, a hub id, or a served model's URL."""


def portable_models(manifest: dict[str, Any], export_dir: str | os.PathLike) -> dict[str, Any]:
    """``manifest`` with its local model folders written so that they survive moving the runs folder.

    A folder inside the export's run folder (the export's parent, e.g. ``runs/demo`` for ``runs/demo/export``) is
    written relative to the export (``../models/large_ft``): the two move together. Any other local folder is written
    absolute, so the export no longer depends on the directory it was made from. Hub ids and URLs are kept.
    """
    export = Path(export_dir).resolve()
    out = dict(manifest)
    for key in MANIFEST_MODELS:
        name = out.get(key)
        if not isinstance(name, str) or not os.path.isdir(name):
            continue
        folder = Path(name).resolve()
        out[key] = os.path.relpath(folder, export) if folder.is_relative_to(export.parent) else str(folder)
    return out


def resolve_beside(name: str | None, export_dir: str | os.PathLike) -> str | None:
    """A model entry of an export's ``offset.json`` as a usable path: relative folders are taken relative to the
    export first (:func:`portable_models` writes them so), else as given (older exports: relative to where they
    were made); hub ids and URLs are returned unchanged."""
    if name is None or os.path.isabs(name) or "://" in name:
        return name
    beside = Path(export_dir) / name
    return str(beside.resolve()) if beside.is_dir() else name
