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

__all__ = ["ADAPTER_CONFIG", "COMPOSITION_MANIFEST", "EXPORT_SOURCE", "MANIFEST_MODELS", "MODEL_CONFIG",
           "OFFSET_MANIFEST", "check_adapter_files", "check_model_files", "check_model_path", "looks_local", "export_source", "portable_models",
           "not_an_export", "refuse_export_as_checkpoint", "refuse_offset_export", "resolve_beside", "evaluation_command"]

OFFSET_MANIFEST = "offset.json"
COMPOSITION_MANIFEST = "composition.json"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_SOURCE = "source.json"
"""Written by ``lightning-unlearn export`` beside the model: the checkpoint it came from (a path relative to the
export when both sit in one runs folder), its epoch (counted from 0, as ``TOFU_HISTORY.json`` and checkpoint names
count) and step, and the alpha recorded with where it came from, so that an export can be traced back and evaluated
again from its checkpoint (:func:`evaluation_command`)."""
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
    command = evaluation_command(target) if manifest.name == OFFSET_MANIFEST and target.is_dir() else None
    evaluate = f" Evaluate it on TOFU with `{command}`." if command else ""
    raise ValueError(f"{role} is {str(path)!r}, an offset export ({manifest.name}): its weights are only the trained "
                     "small model S of z_L + alpha (z_S - z_S0), so using it as a plain model would evaluate the bare "
                     f"small model. To use the unlearned model, {RIGHT_USE}.{evaluate}")


def export_source(path: str | os.PathLike) -> dict[str, Any] | None:
    """An export folder's :data:`EXPORT_SOURCE` with its checkpoint made a usable path (relative entries are taken
    relative to the export), or None where the folder has none (``fit --model.export_dir`` writes none) or it is
    unreadable."""
    directory = Path(path)
    try:
        source = json.loads((directory / EXPORT_SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(source, dict):
        return None
    checkpoint = source.get("checkpoint")
    if isinstance(checkpoint, str) and not os.path.isabs(checkpoint):
        source["checkpoint"] = os.path.normpath(directory / checkpoint)  # as the export was named: no link resolved
    return source


def evaluation_command(export: str | os.PathLike) -> str | None:
    """The ``test`` command that evaluates an export again from its checkpoint at its alpha (the checkpoint stores
    the model's and the data's settings), or None where the export names no checkpoint that exists."""
    import shlex

    source = export_source(export)
    checkpoint = source.get("checkpoint") if source else None
    if not isinstance(checkpoint, str) or not os.path.isfile(checkpoint):
        return None
    alpha = source.get("alpha")
    at_alpha = f" --model.alpha {alpha:g}" if isinstance(alpha, (int, float)) else ""
    named = Path(os.path.normpath(Path(export).absolute()))  # as given: a runs folder behind a link stays named so
    out = named.parent / f"eval_{named.name}"
    return (f"lightning-unlearn test --ckpt_path {shlex.quote(checkpoint)}{at_alpha} "
            f"--trainer.default_root_dir {shlex.quote(os.path.relpath(out))}")


def refuse_export_as_checkpoint(path: str | os.PathLike, flag: str = "--ckpt_path") -> None:
    """Refuse a folder where a checkpoint file is expected (an export folder, a run folder), naming what to give.

    Raises:
        ValueError: ``path`` is a directory; the message gives the export's ``test`` command where it names its
            checkpoint (:func:`evaluation_command`), else says where fit writes checkpoints.
    """
    target = Path(path)
    if not target.is_dir():
        return
    is_export = any((target / m).is_file() for m in (OFFSET_MANIFEST, MODEL_CONFIG, ADAPTER_CONFIG))
    if not is_export:
        raise ValueError(f"{flag} is {str(path)!r}, a folder: give a checkpoint file written by fit "
                         "(<run folder>/checkpoints/*.ckpt).")
    command = evaluation_command(target)
    how = (f"evaluate it with `{command}`" if command else
           "give the checkpoint it was exported from (<run folder>/checkpoints/*.ckpt), or evaluate the export itself "
           "with `lightning-unlearn lm-eval EXPORT`")
    raise ValueError(f"{flag} is {str(path)!r}, an export folder, not a checkpoint file: {how}.")


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


def not_an_export(path: str | os.PathLike) -> str:
    """What to do with a path given where an export is expected that is none: a checkpoint file (export it), a run
    folder (export one of its checkpoints, or use the export inside it), anything else (what an export is).

    Returns the sentence to add to the error; the caller raises.
    """
    target = Path(path)
    export = "`lightning-unlearn export CKPT OUT [--alpha A]`"
    if target.is_file():
        return (f"{str(path)!r} is a file, not an export: an export is a folder. If it is a checkpoint written by fit, "
                f"make an export of it with `lightning-unlearn export {target} OUT [--alpha A]`.")
    checkpoints = sorted(target.glob("**/checkpoints/*.ckpt"))[:3] if target.is_dir() else []
    exports = sorted(p.parent for p in target.glob("*/" + OFFSET_MANIFEST))[:3] if target.is_dir() else []
    hint = ""
    if exports:
        hint += f" It holds the export {', '.join(map(str, exports))}: give that."
    if checkpoints:
        hint += (f" It holds checkpoints ({', '.join(map(str, checkpoints))}): make an export of one with "
                 f"`lightning-unlearn export {checkpoints[-1]} OUT [--alpha A]`.")
    return (f"{str(path)!r} holds neither a model ({MODEL_CONFIG}), a LoRA adapter ({ADAPTER_CONFIG}), an "
            f"{OFFSET_MANIFEST} nor a {COMPOSITION_MANIFEST}: give an export folder (fit --model.export_dir, or "
            f"{export}).{hint}")


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (``org/name``) or a served model's URL: it
    starts with ``/``,
    ``.`` or ``~``, has more than one ``/``, or its first part is a folder here (``runs/large`` beside a ``runs``
    folder). Such a name is never looked up on the hub, where a missing folder would be retried for a minute and
    then reported as a tokenizer that cannot be loaded."""
    if "://" in name:  # a served model's address
        return False
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    head, slash, _ = name.partition("/")
    return bool(slash) and os.path.isdir(head)


def check_model_path(path: str | os.PathLike, role: str) -> None:
    """Refuse, before anything is loaded, a path given where one plain model is expected (``role``: the option it
    came from, e.g. ``--model.small_model``) that cannot be one: an offset export (:func:`refuse_offset_export`), a
    file (a checkpoint: the message says how to use it), or a local path where nothing is.

    Raises:
        ValueError: an offset export or composition, or a file.
        FileNotFoundError: a local path (:func:`looks_local`) with nothing at it.
    """
    refuse_offset_export(path, role)
    target = Path(path)
    if target.is_file():
        use = (f"evaluate a checkpoint with `lightning-unlearn test --ckpt_path {target}`, or make a model folder "
               f"of it with `lightning-unlearn export {target} OUT`" if target.suffix == ".ckpt" else
               "give the folder that holds config.json")
        raise ValueError(f"{role} is {str(path)!r}, a file: a model is a folder saved with save_pretrained() (or a "
                         f"hub id); {use}.")
    if target.is_dir():
        check_model_files(target)
    elif looks_local(str(path)):
        raise FileNotFoundError(f"{role} is {str(path)!r}: no such folder (from {os.getcwd()}). Give a model folder "
                                "saved with save_pretrained(), or a hub id (org/name).")
