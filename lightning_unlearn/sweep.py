"""Sweep the offset strength alpha at test time: forget quality against model utility, no retraining.

``python -m lightning_unlearn.sweep --config CONFIG --ckpt_path CKPT --alphas 0 0.5 1 1.5 2``
runs ``main.py test`` once per alpha (any further ``--key value`` arguments are passed to each run), then
writes ``ALPHA_SWEEP.json``, ``alpha_sweep.png`` (with the reference models and the selected alpha marked) and
prints a table. alpha = 0 is the large model alone.
The alpha the checkpoint rule of ``evaluation/selection.py`` picks (the best forget quality among the alphas
keeping model utility >= ``--floor`` x the retain model's) is marked ``"selected": true`` and printed; none is
when no alpha has finite numbers. Alphas whose results are not finite (``all_finite: false`` in their summary) are
named on the console.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from .atomic import atomic_write_json
from .cli import main as cli_main
from .evaluation.report import print_table, summary_table
from .evaluation.selection import select
from .evaluation.tofu import HEADLINE
from .evaluation.tradeoff_plot import TradeoffFigure, save_tradeoff, series_figure
from .numbers import finite, finite_float


def sweep(config: str, alphas: list[float], out_dir: str | Path, ckpt_path: str | None = None,
          extra: list[str] | None = None, floor: float = 0.9, finetuned: str | Path | None = None) -> list[dict]:
    """Evaluate the offset model at each alpha; return one summary per alpha (with its ``alpha``), the one
    :func:`~lightning_unlearn.evaluation.selection.select` picks with ``floor`` marked ``"selected": True``
    (none without a retain reference, which the rule needs).

    ``alpha_sweep.png`` draws the alphas with the retain model, forget quality 0.05, the utility floor and the
    selected alpha (:mod:`~lightning_unlearn.evaluation.tradeoff_plot`), and the fine-tuned model when
    ``finetuned`` names its ``TOFU_SUMMARY.json``.

    Raises:
        ValueError: before any run, an alpha that is not finite or two alphas that share a run folder (``alpha_{a:g}``,
            where the second run would overwrite the first's summary).
    """
    out = Path(out_dir)
    reference = None
    if finetuned is not None:
        if not Path(finetuned).is_file():
            raise FileNotFoundError(f"--finetuned {finetuned}: no such file; give the fine-tuned model's "
                                    "TOFU_SUMMARY.json (from its 'test' run) or leave --finetuned out.")
        reference = json.loads(Path(finetuned).read_text(encoding="utf-8"))
    alphas = [finite(a, "alpha", "--alphas") for a in alphas]
    floor = finite(floor, "floor", "--floor")  # a NaN floor would keep every alpha (x < nan is False)
    folders = [f"alpha_{a:g}" for a in alphas]
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise ValueError(f"--alphas gives {repeated} more than once (alphas equal to 6 significant digits share a run "
                         "folder): give each alpha once.")
    results = []
    for alpha, folder in zip(alphas, folders):
        run_dir = out / folder
        # the sweep's own settings last, so that they win over the same keys in ``extra``
        args = ["test", "--config", config, *(extra or []), "--model.alpha", str(alpha), "--trainer.logger", "false",
                "--trainer.default_root_dir", str(run_dir)]
        if ckpt_path:
            args += ["--ckpt_path", ckpt_path]
        cli_main(args)
        summary = json.loads((run_dir / "TOFU_SUMMARY.json").read_text(encoding="utf-8"))
        results.append({**summary, "alpha": alpha})
    if all(r.get("model_utility_vs_retain") is not None for r in results):
        chosen = select(results, floor)
        for r in results:
            r["selected"] = r is chosen
        if chosen is None:
            print("selected: none (no alpha has a finite forget quality and model utility)")
    atomic_write_json(out / "ALPHA_SWEEP.json", results)
    save_tradeoff(figure(results, floor, reference), out / "alpha_sweep.png")
    print_table(summary_table({f"alpha={r['alpha']:g}": r for r in results}, HEADLINE, "alpha sweep"))
    for r in results:
        if r.get("all_finite") is False:
            print(f"alpha={r['alpha']:g}: NON-FINITE results: {', '.join(r['non_finite']['metrics'])}")
        if r.get("selected"):
            print(f"selected: alpha={r['alpha']:g} (best forget quality with model utility >= {floor:g}x the retain "
                  "model's, or the closest to that floor)")
            if ckpt_path:  # the checkpoint at that alpha as a model to ask: the checkpoint records its trained alpha
                print(f"  as an export: lightning-unlearn export {shlex.quote(str(ckpt_path))} EXPORT_DIR "
                      f"--alpha {r['alpha']:g}")
    return results


def figure(results: list[dict], floor: float, finetuned: dict | None = None) -> TradeoffFigure:
    """The sweep's figure: one point per alpha, the alpha marked ``"selected"`` ringed (none: none is), the retain
    model (from the summaries' utility ratio), the fine-tuned model's summary ``finetuned`` if given, forget
    quality 0.05 and the utility floor ``floor`` x the retain model's."""
    chosen = next((r for r in results if r.get("selected")), None)
    return series_figure(results, "alpha", "offset strength alpha: forget quality vs model utility",
                         finetuned=finetuned, floor=floor, selected=chosen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config of the unlearning run (as for main.py test)")
    parser.add_argument("--ckpt_path", default=None, help="checkpoint of the trained offset")
    parser.add_argument("--alphas", type=finite_float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--out", default="runs/alpha_sweep", help="folder for the per-alpha runs and the plot")
    parser.add_argument("--floor", type=finite_float, default=0.9,
                        help="the selection rule's floor on model utility / the retain model's")
    parser.add_argument("--finetuned", default=None, metavar="TOFU_SUMMARY.json",
                        help="the fine-tuned model's summary, drawn in alpha_sweep.png as a reference point")
    args, extra = parser.parse_known_args(argv)
    sweep(args.config, args.alphas, args.out, args.ckpt_path, extra, args.floor, args.finetuned)


if __name__ == "__main__":
    main()
