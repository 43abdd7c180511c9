"""``lightning-unlearn export CKPT OUT [--alpha A]``: a fit checkpoint as an export folder.

The work is :func:`~lightning_unlearn.modules.checkpoint_export.export_checkpoint` (the demo's last stage calls it
too): the trained model, its tokenizer, ``offset.json`` with model paths that survive moving the runs folder, and
``source.json`` naming the checkpoint, its epoch and the alpha with where it came from. This command prints what it
recorded and the commands that use the export.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from ..models.files import EXPORT_SOURCE, evaluation_command
from ..modules.checkpoint_export import export_checkpoint
from ..numbers import finite_float

__all__ = ["export_checkpoint", "main", "next_commands"]


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``CKPT OUT [--alpha A]``, write the export, print where it is and how to use it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by fit (<run>/checkpoints/*.ckpt)")
    parser.add_argument("out", metavar="OUT", help="the export folder to write (replaced if it exists)")
    parser.add_argument("--alpha", type=finite_float, default=None,
                        help="offset strength to record (default: the checkpoint's, the one it was trained with)")
    args = parser.parse_args(argv)
    target = export_checkpoint(args.checkpoint, args.out, args.alpha)
    source = json.loads((target / EXPORT_SOURCE).read_text(encoding="utf-8"))
    if source["alpha"] is None:
        what = "direct mode (no offset)"
    else:
        origin = "given" if source["alpha_from"] == "--alpha" else "the checkpoint's, as trained; --alpha gives another"
        what = f"alpha {source['alpha']:g} ({origin})"
    print(f"exported {args.checkpoint} (epoch {source['epoch']}) to {target}: {what}")
    print("\n".join(f"  {line}" for line in next_commands(target)))
    return target


def next_commands(export: Path, prog: str = "lightning-unlearn") -> list[str]:
    """Commands that use ``export``: ask it, run the offline lm-eval tasks, and evaluate it again on TOFU from its
    checkpoint where ``source.json`` names one that exists."""
    quoted = shlex.quote(str(export))
    lines = [f'{prog} generate {quoted} --prompt "..."', f"{prog} lm-eval {quoted} --tasks tofu_general"]
    command = evaluation_command(export)
    return lines + ([command.replace("lightning-unlearn", prog, 1)] if command else [])
