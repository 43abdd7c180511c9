"""A fit checkpoint written out as an export folder (``lightning-unlearn export``, the demo's last stage).

An export is what ``fit`` writes with ``--model.export_dir`` (:meth:`UnlearnModule.export`): the trained model (or
its LoRA adapter), the tokenizer and, in offset mode, ``offset.json`` naming the large model, the reference, alpha
and the dtypes. :func:`export_checkpoint` writes the same files from any checkpoint, so an epoch picked after
training (by the alpha sweep, or by eye) becomes a model that ``generate`` and ``lm-eval`` read, and adds
``source.json`` (:data:`~lightning_unlearn.models.files.EXPORT_SOURCE`): the checkpoint, its epoch and step, and
the alpha with where it came from. Alpha is the one the checkpoint was *trained* with unless another is given, e.g.
the one an alpha sweep selected.

Only the trained model is loaded: the large model is named in ``offset.json``, not needed to write it (a served
one need not be running).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..models.files import EXPORT_SOURCE

__all__ = ["export_checkpoint", "export_record", "read_checkpoint"]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The contents of a checkpoint file written by fit, loaded on the CPU without unpickling code.

    Raises:
        ValueError: ``path`` is a folder (an export or run folder: the message says what to give) or a file that is
            not a torch checkpoint.
        FileNotFoundError: nothing is at ``path``.
    """
    import torch

    from ..models.files import refuse_export_as_checkpoint

    refuse_export_as_checkpoint(path, "CKPT")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: give a checkpoint file written by fit "
                                "(<run folder>/checkpoints/*.ckpt).")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a file that is not a torch checkpoint: say so, not the unpickler's message
        raise ValueError(f"{path} is not a checkpoint written by fit ({type(err).__name__}: {err}).") from err


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, alpha: float | None = None) -> Path:
    """Write the export of ``checkpoint`` to ``out``, with the checkpoint's alpha unless ``alpha`` is given.

    The method's class and hyper-parameters are the ones the checkpoint stores; the trained weights are loaded over
    the model rebuilt from them.

    Raises:
        ValueError, FileNotFoundError: the path is not a checkpoint of this package (the message says what to give
            instead; see :func:`read_checkpoint`).
        KeyError: the checkpoint lacks trainable weights of its model (another model or bottleneck).
    """
    from .registry import UnknownMethod, resolve

    path = Path(checkpoint)
    state = read_checkpoint(path)
    hparams = dict(state.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    if not class_path or "state_dict" not in state:
        raise ValueError(f"{path} holds no model class or weights: give a checkpoint written by "
                         "`lightning-unlearn fit`.")
    try:
        cls = resolve(class_path.rpartition(".")[2]).cls
    except UnknownMethod as err:
        raise ValueError(f"{path} was trained with {class_path}, which this version does not have.\n{err}") \
            from None
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if alpha is not None:
        hparams["alpha"] = alpha
    module = cls(**hparams)
    # The large model is only named in offset.json: keep configure_model from loading (or connecting to) it.
    module._load_local_large = lambda: None
    module._connect_served_large = lambda: None
    from ..data.tokenizer import load_tokenizer

    h = module.hparams
    module.tokenizer = load_tokenizer(h.tokenizer or h.small_model, h.trust_remote_code)
    module.configure_model()
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    target = module.export(out)  # written whole, model paths relative to where the export lies
    source = export_record(path, state, module.alpha if module.offset_mode else None, alpha is not None, target)
    atomic_write_json(target / EXPORT_SOURCE, source)  # after the model: an export without it still loads
    return target


def export_record(checkpoint: Path, state: dict[str, Any], alpha: float | None, given: bool,
                  export_dir: Path) -> dict[str, Any]:
    """What ``source.json`` holds: the checkpoint (relative to the export when it lies inside the export's parent
    folder, as :func:`~lightning_unlearn.models.files.portable_models` writes model paths, so that moving that
    folder keeps the link; else absolute), its epoch (Lightning's, counted from 0 as in ``TOFU_HISTORY.json``
    and checkpoint names ``epoch=7-step=...``) and global step, the recorded ``alpha`` (None in direct mode) and
    ``alpha_from``: ``"--alpha"`` or ``"checkpoint"``."""
    ckpt, export = checkpoint.resolve(), export_dir.resolve()
    portable = os.path.relpath(ckpt, export) if ckpt.is_relative_to(export.parent) else str(ckpt)
    epoch = state.get("epoch")
    return {"checkpoint": portable, "epoch": epoch if isinstance(epoch, int) else None,
            "global_step": state.get("global_step"), "alpha": alpha,
            "alpha_from": None if alpha is None else ("--alpha" if given else "checkpoint")}
