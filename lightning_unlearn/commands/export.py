"""``lightning-unlearn export CKPT OUT [--alpha A]``: a fit checkpoint as an export folder.

An export is what ``fit`` writes with ``--model.export_dir`` (:meth:`UnlearnModule.export`): the trained model (or
its LoRA adapter), the tokenizer and, in offset mode, ``offset.json`` naming the large model, the reference, alpha
and the dtypes. This command writes the same files from any checkpoint, so an epoch picked after training (by the
alpha sweep, or by eye) becomes a model that ``generate`` and ``lm-eval`` read. Local model paths are written so
that they survive moving the runs folder (:func:`~lightning_unlearn.models.files.portable_models`).

Only the trained model is loaded: the large model is named in ``offset.json``, not needed to write it (a served
one need not be running).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..numbers import finite_float

__all__ = ["export_checkpoint", "main"]


def _checkpoint(path: Path) -> dict[str, Any]:
    import torch

    if path.is_dir():
        raise SystemExit(f"error: {path} is a folder; export takes a checkpoint file written by fit "
                         "(<run>/checkpoints/*.ckpt).")
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}.")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a file that is not a torch checkpoint: say so, not the unpickler's message
        raise SystemExit(f"error: {path} is not a checkpoint written by fit ({type(err).__name__}: {err}).") from err


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, alpha: float | None = None) -> Path:
    """Write the export of ``checkpoint`` to ``out``, with the checkpoint's alpha unless ``alpha`` is given.

    The method's class and hyper-parameters are the ones the checkpoint stores; the trained weights are loaded over
    the model rebuilt from them.

    Raises:
        SystemExit: the path is not a checkpoint of this package (the message says what to give instead).
        KeyError: the checkpoint lacks trainable weights of its model (another model or bottleneck).
    """
    from ..modules.registry import UnknownMethod, resolve

    path = Path(checkpoint)
    state = _checkpoint(path)
    hparams = dict(state.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    if not class_path or "state_dict" not in state:
        raise SystemExit(f"error: {path} holds no model class or weights: give a checkpoint written by "
                         "`lightning-unlearn fit`.")
    try:
        cls = resolve(class_path.rpartition(".")[2]).cls
    except UnknownMethod as err:
        raise SystemExit(f"error: {path} was trained with {class_path}, which this version does not have.\n{err}") \
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
    return module.export(out)


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``CKPT OUT [--alpha A]``, write the export, print where it is and how to use it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by fit (<run>/checkpoints/*.ckpt)")
    parser.add_argument("out", metavar="OUT", help="the export folder to write (replaced if it exists)")
    parser.add_argument("--alpha", type=finite_float, default=None,
                        help="offset strength to record (default: the checkpoint's, the one it was trained with)")
    args = parser.parse_args(argv)
    target = export_checkpoint(args.checkpoint, args.out, args.alpha)
    print(f"exported {args.checkpoint} to {target}\n"
          f"  lightning-unlearn generate {target} --prompt \"...\"\n"
          f"  lightning-unlearn lm-eval {target} --tasks tofu_general")
    return target
