"""Where ``model.export_dir`` may be written, checked when ``fit`` sets up rather than when it ends.

The export (:func:`write_export`) replaces its folder at the end of ``fit``.
A target that is a file failed only then, after the whole training; a target that is, or holds, a model the run
reads (the small model, which an offset export's ``offset.json`` names as its reference, the large model or the
tokenizer) was silently replaced by the trained weights, so the export named a reference that no longer exists.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..models.files import portable_models

__all__ = ["check_export_dir", "write_export"]


def check_export_dir(export_dir: str | None, sources: Mapping[str, str | None]) -> None:
    """Refuse an export folder that cannot be written or would replace a model the run reads.

    Args:
        export_dir: ``model.export_dir`` (None: no export, nothing to check).
        sources: the run's model options by name (``{"small_model": path_or_hub_id, ...}``); hub ids that are not
            local folders are skipped.

    Raises:
        ValueError: the target is a file, or it is (or holds) one of ``sources``.
        PermissionError: the target's nearest existing folder is not writable.
    """
    if not export_dir:
        return
    target = Path(export_dir).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"model.export_dir {export_dir} is a file: an export is a folder (fit replaces the folder at "
                         "its end); give a folder path.")
    resolved = target.resolve()
    for option, source in sources.items():
        if not source or not Path(source).expanduser().exists():
            continue
        model = Path(source).expanduser().resolve()
        if model == resolved or model.is_relative_to(resolved):
            raise ValueError(f"model.export_dir {export_dir} {'is' if model == resolved else 'holds'} model.{option} "
                             f"({source}): the export would replace the model this run reads (and an offset export "
                             "names its small model as the reference). Export to another folder.")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"model.export_dir {export_dir}: {existing} is not writable, so the export at the end of "
                              "fit would fail. Give a folder you can write.")


def write_export(model: Any, tokenizer: PreTrainedTokenizerBase, manifest: dict[str, Any] | None,
                 directory: str | os.PathLike, state_dict: dict[str, Any] | None = None) -> Path:
    """Save the trained model (a Hugging Face model, or with LoRA a peft model: the adapter only, peft's format),
    the tokenizer and, for an offset, ``offset.json`` (``manifest``, its model paths made to survive moving the
    runs folder; :mod:`lightning_unlearn.deploy.manifest` reads it) to ``directory``, replacing it atomically: the
    files are written beside it and the folder renamed into place, so a crash leaves the old export or the new one.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(staging, state_dict=state_dict)  # with LoRA, peft saves the adapter only
    tokenizer.save_pretrained(staging)
    if manifest is not None:
        (staging / "offset.json").write_text(json.dumps(portable_models(manifest, target), indent=2),
                                             encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
