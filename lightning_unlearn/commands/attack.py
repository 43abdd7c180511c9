"""``lightning-unlearn attack relearn|quantize|mia EXPORT_OR_CKPT``: attack an unlearned model, write ``ATTACK.json``.

mia       the six membership-inference AUCs (LOSS, ZLib, Min-K%, Min-K%++, GradNorm, and Reference with
          --reference-model) of the forget vs the holdout set, beside the model before unlearning
quantize  int8 and 4-bit weight-only quantization (torchao): the direct model; in offset mode the large model alone
          and the whole pair; the forget metrics of each quantized model next to the unquantized
relearn   k fine-tuning steps (1, 5, 20) on a few forget rows by what the attacker can change (the model in direct
          mode; the small offset, alone or through the combined logits, in offset mode), measured on the others

A checkpoint (``*.ckpt`` from fit) is exported first into OUT/export. The report is written atomically to
OUT/ATTACK.json (default OUT: ``attack-<attack>`` beside the export).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..numbers import finite_float

__all__ = ["main"]

SHOWN = {"forget_Q_A_Prob": "Q_A_Prob", "forget_truth_ratio": "truth_ratio", "forget_quality": "forget_q",
         "mia_loss": "mia_loss", "mia_min_k": "mia_min_k", "mia_reference": "mia_ref", "mia_gradnorm": "mia_gradn"}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _p_norm(text: str) -> float:
    value = float(text)
    if value not in (1.0, 2.0, math.inf):
        raise argparse.ArgumentTypeError(f"must be 1, 2 or inf, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-unlearn attack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=("mia", "quantize", "relearn"))
    p.add_argument("export", metavar="EXPORT_OR_CKPT", help="an export folder, composition.json, or fit checkpoint")
    p.add_argument("--out", default=None, help="folder for ATTACK.json (default: attack-ATTACK beside the export)")
    p.add_argument("--dataset", default="bundled", help="where the splits are: bundled, a folder, or a hub id")
    p.add_argument("--forget-split", default="forget01_perturbed",
                   help="forget rows (with paraphrased/perturbed answers for the truth ratio)")
    p.add_argument("--holdout-split", default="holdout01", help="rows never trained on, for the MIA AUCs")
    p.add_argument("--limit", type=_positive, default=None, help="use only the first N rows of each split")
    p.add_argument("--retain-eval", default=None, help="the retain model's TOFU_EVAL.json, for forget quality")
    p.add_argument("--reference-model", default=None,
                   help="a model for the Reference attack (open-unlearning's: the retain model)")
    p.add_argument("--original", default=None,
                   help="direct mode: the model before unlearning, to say how much an attack recovered (offset mode "
                        "uses the large model alone)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--gradnorm-p", type=_p_norm, default=2.0, help="GradNorm's norm: 1, 2 or inf")
    p.add_argument("--bits", nargs="+", choices=("int8", "int4"), default=["int8", "int4"])
    p.add_argument("--group-size", type=_positive, default=32, help="int4's group of input columns")
    p.add_argument("--steps", type=_positive, nargs="+", default=[1, 5, 20], help="relearn step counts measured")
    p.add_argument("--relearn-rows", type=_positive, default=10, help="forget rows the relearning trains on")
    p.add_argument("--lr", type=finite_float, default=1e-3, help="relearning learning rate (AdamW)")
    p.add_argument("--relearn-batch-size", type=_positive, default=4)
    p.add_argument("--seed", type=int, default=0, help="which forget rows relearn trains on, and their order")
    return p


def _row(label: str, metrics: dict[str, Any]) -> str:
    cells = []
    for key in SHOWN:
        v = metrics.get(key)
        cells.append(f"{'-':>12}" if v is None else f"{v:>12.4g}")
    return f"{label:<28}" + "".join(cells)


def summary(report: dict[str, Any]) -> str:
    """The report as a small table: one line per model (original, before, each attacked variant)."""
    lines = [f"{'':<28}" + "".join(f"{name:>12}" for name in SHOWN.values())]
    if report["original"] is not None:
        lines.append(_row("before unlearning", report["original"]))
    lines.append(_row("unlearned", report["before"]))
    for entry in report["after"]:
        label = (f"{entry['bits']} {entry['quantized']}" if "bits" in entry else
                 f"relearn {entry['target']} k={entry['steps']}" if "steps" in entry else "")
        lines.append(_row(label, entry["metrics"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse the arguments, run the attack, write ``ATTACK.json``, print its table; returns the file's path."""
    from ..attacks.run import AttackSettings, run_attack

    args = parser().parse_args(argv)
    settings = AttackSettings(dataset=args.dataset, forget_split=args.forget_split, holdout_split=args.holdout_split,
                              limit=args.limit, retain_eval=args.retain_eval, reference_model=args.reference_model,
                              original=args.original, batch_size=args.batch_size, gradnorm_p=args.gradnorm_p,
                              bits=list(args.bits), group_size=args.group_size, relearn_steps=sorted(set(args.steps)),
                              relearn_rows=args.relearn_rows, relearn_lr=args.lr,
                              relearn_batch_size=args.relearn_batch_size, seed=args.seed)
    source = Path(args.export)
    out = Path(args.out) if args.out else source.parent / f"attack-{args.attack}"
    with tempfile.TemporaryDirectory() as scratch:
        export = str(source)
        if source.is_file() and source.suffix == ".ckpt":
            from .export import export_checkpoint

            export = str(export_checkpoint(source, Path(scratch) / "export"))
        report = run_attack(args.attack, export, settings)
    if source.suffix == ".ckpt":
        report["checkpoint"] = str(source)
    path = atomic_write_json(out / "ATTACK.json", report)
    print(summary(report))
    print(f"wrote {path}")
    return path
