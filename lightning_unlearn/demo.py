"""The offline demo: a tiny TOFU world fine-tuned, unlearned and evaluated on a CPU (``make demo``).

Every stage is an ordinary command (printed before it runs) that works the same on real models:

1. a byte-level BPE tokenizer trained on TOFU text and two tiny Llama models built from config;
2. both fine-tuned on a TOFU subset (``configs/demo/finetune.yaml``), and a retain-only large model;
3. the retain model and the fine-tuned model evaluated (``configs/demo/eval.yaml``);
4. offset unlearning of the fine-tuned pair (``configs/demo/unlearn.yaml``, NPO unless ``--method``; with
   ``--method EUL`` unlearning layers in the fine-tuned large model, ``configs/demo/eul.yaml``),
   evaluated every epoch (EUL: every 5);
5. the selected epoch evaluated at each offset strength of :data:`ALPHAS` (EUL: the last epoch, once);
6. the selected epoch at the selected alpha written as an export, ``runs/demo/export`` (``lightning-unlearn export``:
   ``offset.json`` with the alpha and dtypes, ``source.json`` with the checkpoint and epoch; model paths relative to
   the export, so the ``runs`` folder can be moved);
7. a before/after table (with the accuracy on the offline lm-eval tasks ``tofu_general``, general capability)
   naming the selected epoch and alpha, the forget quality vs model utility figures by epoch and by alpha
   (:func:`figures`), and the commands that ask the export a forget and a retain question, run the lm-eval tasks on
   it and evaluate it again.

The selection protocol: the epoch with the highest forget quality among those keeping model
utility >= 0.9x the retain model's (``UtilityFloorCheckpoint``, ``lightning_unlearn/evaluation/selection.py``),
then the alpha picked by the same rule. The rule reads the evaluation sets the table reports (the tiny world
has no separate validation split), so the table's forget quality is the best of several looks; the NPO settings
(``configs/demo/unlearn_npo.yaml``) and the alphas were themselves chosen by comparing runs on those sets.

A stage whose outputs exist and whose command, configs and inputs are unchanged is skipped, so a second
run only redoes what changed; ``--force`` redoes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging as hf_logging

from .cli import main as cli_main
from .atomic import atomic_write_json
from .data.sources import BUNDLED, load_split
from .evaluation.report import print_table, summary_table
from .evaluation.tradeoff_plot import FLOOR, TradeoffFigure, save_tradeoff, series_figure
from .sweep import main as sweep_main
from .models.files import EXPORT_SOURCE, OFFSET_MANIFEST, evaluation_command
from .models.tiny import make_tiny_pair
from .modules.checkpoint_export import export_checkpoint
from .modules.registry import UnknownMethod, resolve, unlearning_methods

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
TABLE_KEYS = ("forget_Q_A_ROUGE", "forget_Q_A_Prob", "forget_truth_ratio", "retain_Q_A_ROUGE",
              "retain_heldout_Q_A_ROUGE", "ra_Q_A_ROUGE", "wf_Q_A_ROUGE", "model_utility", "forget_quality", "privleak",
              "extraction_strength", "tofu_world_facts_mc/acc", "tofu_real_authors_mc/acc")
ALPHAS = (1.0, 1.25, 1.5)
"""Offset strengths the unlearned checkpoint is evaluated at; the selection rule picks one (see ``configs/demo/unlearn.yaml``).
Steps of 0.25: with the NPO settings of :data:`NPO_CONFIG` the forget truth ratios at alpha 1 are already close to
the retain model's, and alpha 1.5 pushes them past it (forget quality falls again); 2 only overshoots further."""
RETAIN_TERM_ROWS = {"NPO": (200, 10), "offset": (40, 10), "EUL": (40, 10)}
"""How many of the first ``retain_perturbed`` rows the unlearning retain term uses (full world, ``--quick``).
The evaluation scores the first 40 (20) rows the models were fine-tuned on; the rows past this count are known
to the model but outside the retain term, so they show whether retention carries beyond the rows it is trained
on. The full world keeps both retain authors in the retain term (as calibrated; its real authors and world
facts are outside it); ``--quick`` splits its one retain author in halves. The full world's NPO takes a KL
retain term over the first 200 rows (:data:`NPO_CONFIG`): the 40 the models know and 160 of authors they never
saw, on which the KL holds the offset at zero (an NLL term there would teach those authors)."""
NPO_CONFIG = CONFIGS / "unlearn_npo.yaml"
"""The full world's NPO settings, added after ``unlearn.yaml`` for ``--method NPO`` (not ``--quick``, whose slow-test
bounds were measured with ``unlearn.yaml``'s): beta 0.02 and a KL retain term; the file says why."""
NLL_SETS = ("forget", "retain_term", "retain_heldout", "ra", "wf")


@dataclass
class Stage:
    """One step of the pipeline: a ``main.py`` command (or the model builder) and what it produces."""

    name: str
    args: list[str]
    output: Path
    depends: list[str] = field(default_factory=list)

    def key(self, upstream: dict[str, str]) -> str:
        """Hash of the command, the config files it reads and the keys of the stages it depends on."""
        digest = hashlib.sha256(json.dumps([self.args, [upstream[d] for d in self.depends]]).encode())
        for arg in self.args:
            if arg.endswith(".yaml") and Path(arg).is_file():
                digest.update(Path(arg).read_bytes())
        return digest.hexdigest()[:16]


_QUICK_SPLITS = "'retain_perturbed[:20]', 'real_authors[:20]', 'world_facts[:20]'"
QUICK = {
    "finetune": ["--data.forget_split", f"[forget01, {_QUICK_SPLITS}]", "--trainer.max_epochs", "60"],
    "finetune_retain": ["--data.forget_split", f"[{_QUICK_SPLITS}]", "--trainer.max_epochs", "60"],
    "eval": ["--data.eval_subset", "20"],
    "unlearn": ["--trainer.check_val_every_n_epoch", "5", "--model.retain_weight", "10",
                "--model.optimizer.lr", "3e-4"],
}
"""Overrides of ``--quick``: 20 retain, real-author and world-fact pairs instead of 40, fine-tuned 60 epochs
instead of 30 (with half the steps per epoch, 30 left some seeds' models half-trained on a loss plateau), 20
evaluated per set, offset unlearning evaluated every 5 epochs (the evaluation does not change the training) and
gentler: retain weight 10 and lr 3e-4, the last epoch at alpha 1 (see :func:`selected_checkpoint`). The full
world's selection rule does not carry over: its 10-row retain term does not hold the real authors and world
facts at lr 1e-3 (model utility 0.54-0.68 after the first epoch at retain weight 10, seed 0), so the rule falls
back to the first epoch, which has hardly forgotten yet. At lr 3e-4 the last epoch forgets (forget NLL +4.1
nats, seed 0) and keeps model utility at 0.83x the fine-tuned model's (0.29x with the earlier retain weight 1
at lr 1e-3); ``tests/end_to_end/test_end_to_end.py`` has the measured spread."""


def selected_checkpoint(method: str, quick: bool = False) -> str:
    """The checkpoint the demo evaluates: ``best.ckpt``, the epoch ``configs/demo/unlearn.yaml``'s selection rule
    keeps (:class:`~lightning_unlearn.evaluation.selection.UtilityFloorCheckpoint`), swept over :data:`ALPHAS`;
    for EUL and ``--quick`` the last epoch, evaluated once at the configured alpha (see :data:`QUICK`)."""
    return "last.ckpt" if method == "EUL" or quick else "best.ckpt"


def retain_term_rows(method: str, quick: bool) -> int:
    """Rows of ``retain_perturbed`` in the unlearning retain term (see :data:`RETAIN_TERM_ROWS`)."""
    return RETAIN_TERM_ROWS[method if method in RETAIN_TERM_ROWS else "offset"][int(quick)]


def selectivity(report: dict, retain_rows: int) -> dict[str, float | None]:
    """Per-set mean answer NLL and the retain ROUGE of the rows outside the retain term, from a ``TOFU_EVAL.json``.

    ``report`` holds per-sample ``*_Q_A_Prob`` values ``exp(-mean token NLL)`` of each answer; the mean NLL of a
    set is the mean over its samples of ``-log`` of them (nats per answer token). ``retain_rows``: how many of
    the first retain samples the retain term trains on; the others are the ``retain_heldout`` set. Returns
    ``{set}_mean_nll`` for ``forget``, ``retain_term``, ``retain_heldout``, ``ra``, ``wf`` and the ROUGE of
    both retain parts, ``retain_term_Q_A_ROUGE`` and ``retain_heldout_Q_A_ROUGE`` (None where a part has no
    sample).
    """
    def values(key: str, field: str, keep=lambda i: True) -> list[float]:
        by_index = report.get(key, {}).get("value_by_index", {})
        return [v[field] for i, v in by_index.items() if keep(int(i)) and v.get(field) is not None]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    def nll(key: str, keep=lambda i: True) -> float | None:
        return mean([-math.log(p) for p in values(key, "prob", keep)])

    term, heldout = (lambda i: i < retain_rows), (lambda i: i >= retain_rows)
    return {"forget_mean_nll": nll("forget_Q_A_Prob"), "retain_term_mean_nll": nll("retain_Q_A_Prob", term),
            "retain_heldout_mean_nll": nll("retain_Q_A_Prob", heldout), "ra_mean_nll": nll("ra_Q_A_Prob"),
            "wf_mean_nll": nll("wf_Q_A_Prob"),
            "retain_term_Q_A_ROUGE": mean(values("retain_Q_A_ROUGE", "rougeL_recall", term)),
            "retain_heldout_Q_A_ROUGE": mean(values("retain_Q_A_ROUGE", "rougeL_recall", heldout))}


GENERAL = ["--data.lm_eval_tasks", "[tofu_general]"]
"""The unlearned model's ``test`` adds the lm-eval tasks that ``configs/demo/eval.yaml`` gives the other two
(not in ``configs/demo/unlearn.yaml``: they would run at every validation of the unlearning too)."""

TEST = ["--verbose", "false"]
"""Options of the ``test`` stages: the TOFU table is printed, not Lightning's table of the same metrics."""


def stages(root: Path, method: str, large: tuple[int, int], small: tuple[int, int], epochs: int | None,
           quick: bool = False, seed: int = 0) -> list[Stage]:
    """The pipeline's stages; ``seed`` seeds the tiny models' initialisation and every ``main.py`` command."""
    q = QUICK if quick else {}
    r = str(root)
    seeded = ["--seed_everything", str(seed)]
    retain_term = ["--data.retain_split", f"retain_perturbed[:{retain_term_rows(method, quick)}]"]
    ft, ft_retain, ev, un = (os.path.relpath(CONFIGS / f) for f in ("finetune.yaml", "finetune_retain.yaml", "eval.yaml",
                                                        "unlearn.yaml"))
    if method == "EUL":  # unlearning layers inside the fine-tuned large model itself (direct mode)
        unlearning = ["--config", os.path.relpath(CONFIGS / "eul.yaml"), "--model.small_model", f"{r}/models/large_ft",
                      "--model.adapter_seed", str(seed)]
    else:
        unlearning = ["--config", un, "--model", method, "--model.large_model", f"{r}/models/large_ft",
                      "--model.small_model", f"{r}/models/small_ft"]
        if method == "NPO" and not quick:
            unlearning += ["--config", os.path.relpath(NPO_CONFIG)]
    unlearn_common = unlearning + seeded + retain_term + [
        "--model.retain_reference", f"{r}/eval/retain/TOFU_EVAL.json",
        "--trainer.default_root_dir", f"{r}/logs/unlearn",
    ] + (["--trainer.max_epochs", str(epochs)] if epochs else []) + q.get("eval", []) + (
        q.get("unlearn", []) if method != "EUL" else [])
    checkpoint = ["--ckpt_path", f"{r}/logs/unlearn/checkpoints/{selected_checkpoint(method, quick)}"]
    if method == "EUL" or quick:  # EUL has no offset to rescale: the last epoch, evaluated once
        eval_unlearned = Stage("eval_unlearned", ["test", *TEST, *unlearn_common, "--trainer.callbacks", "null",
                                                  *GENERAL, *checkpoint, "--trainer.default_root_dir", f"{r}/eval/unlearned"],
                               root / "eval/unlearned", ["unlearn"])
    else:  # the selected epoch at each alpha of ALPHAS; the selection rule picks one (sweep.py)
        eval_unlearned = Stage("eval_unlearned", ["sweep", "--config", un, *checkpoint, "--alphas", *map(str, ALPHAS),
                                                  "--out", f"{r}/eval/unlearned", *TEST, *unlearn_common[2:],
                                                  "--trainer.callbacks", "null", *GENERAL],
                               root / "eval/unlearned", ["unlearn"])
    return [
        Stage("init", ["tiny", f"{r}/init", "--large", *map(str, large), "--small", *map(str, small), "--seed", str(seed)],
              root / "init"),
        Stage("finetune_large", ["fit", "--config", ft, *seeded, "--model.small_model", f"{r}/init/large",
                                 "--model.export_dir", f"{r}/models/large_ft",
                                 "--trainer.default_root_dir", f"{r}/logs/finetune_large", *q.get("finetune", [])],
              root / "models/large_ft", ["init"]),
        Stage("finetune_small", ["fit", "--config", ft, *seeded, "--model.small_model", f"{r}/init/small",
                                 "--model.export_dir", f"{r}/models/small_ft",
                                 "--trainer.default_root_dir", f"{r}/logs/finetune_small", *q.get("finetune", [])],
              root / "models/small_ft", ["init"]),
        Stage("finetune_retain", ["fit", "--config", ft_retain, *seeded, "--model.small_model", f"{r}/init/large",
                                  "--model.export_dir", f"{r}/models/large_retain",
                                  "--trainer.default_root_dir", f"{r}/logs/finetune_retain",
                                  *q.get("finetune_retain", [])],
              root / "models/large_retain", ["init"]),
        Stage("eval_retain", ["test", *TEST, "--config", ev, *seeded, "--model.small_model", f"{r}/models/large_retain",
                              "--trainer.default_root_dir", f"{r}/eval/retain", *q.get("eval", [])],
              root / "eval/retain", ["finetune_retain"]),
        Stage("eval_finetuned", ["test", *TEST, "--config", ev, *seeded, "--model.small_model", f"{r}/models/large_ft",
                                 "--model.retain_reference", f"{r}/eval/retain/TOFU_EVAL.json",
                                 "--trainer.default_root_dir", f"{r}/eval/finetuned", *q.get("eval", [])],
              root / "eval/finetuned", ["finetune_large", "eval_retain"]),
        Stage("unlearn", ["fit", *unlearn_common], root / "logs/unlearn",
              ["finetune_large", "finetune_small", "eval_retain"]),
        eval_unlearned,

    ]


def selected_alpha(folder: Path) -> float | None:
    """The alpha an alpha sweep in ``folder`` selected (``ALPHA_SWEEP.json``), or None where no sweep ran there
    (EUL, ``--quick``: the checkpoint's own alpha is the one evaluated)."""
    selected = selected_alpha_dir(folder)
    return None if selected == folder else float(selected.name.removeprefix("alpha_"))


def export_stage(root: Path, method: str, quick: bool) -> Stage:
    """The last stage: the checkpoint :func:`selected_checkpoint` names, at the alpha the sweep selected, written as
    an export to ``root/export`` (built after ``eval_unlearned`` ran, since the alpha is its result)."""
    r = str(root)
    alpha = selected_alpha(root / "eval/unlearned")
    checkpoint = f"{r}/logs/unlearn/checkpoints/{selected_checkpoint(method, quick)}"
    return Stage("export", ["export", checkpoint, f"{r}/export", *(["--alpha", f"{alpha:g}"] if alpha is not None
                                                                  else [])],
                 root / "export", ["eval_unlearned"])


def program() -> str:
    """How to call ``lightning-unlearn`` so that a printed command works verbatim: by name where the command on the
    ``PATH`` is this interpreter's (an activated environment), else by its path in this interpreter's environment
    (``make demo`` runs ``.venv/bin/python`` without activating it), else ``python main.py`` from a checkout."""
    bin_dir = Path(sys.executable).parent
    on_path = shutil.which("lightning-unlearn")
    if on_path and Path(on_path).resolve().parent == bin_dir.resolve():
        return "lightning-unlearn"
    beside = bin_dir / "lightning-unlearn"
    if beside.is_file():
        relative = os.path.relpath(beside)
        return relative if not relative.startswith("..") else str(beside)
    return f"{shlex.quote(os.path.relpath(sys.executable))} main.py"


def demo_questions() -> tuple[dict, dict]:
    """A forget question (``forget01``, the author the demo unlearns) and a retain question (``retain_perturbed``,
    an author the models were fine-tuned on and the retain term keeps), each with its TOFU answer."""
    return load_split(BUNDLED, "forget01")[0], load_split(BUNDLED, "retain_perturbed")[0]


def next_steps(root: Path, prog: str | None = None) -> list[str]:
    """The commands printed at the end: ask the export a forget and a retain question, run the offline lm-eval tasks
    on it, and evaluate it again on TOFU from its checkpoint (:func:`~lightning_unlearn.models.files.evaluation_command`)."""
    prog = prog or program()
    export = shlex.quote(str(root / "export"))
    forget, retain = demo_questions()
    lines = ["# ask it a forget question, then a retain question (TOFU's answers: "
             f"{forget['answer'][:60]!r}..., {retain['answer'][:60]!r}...)",
             f"{prog} generate {export} --prompt {shlex.quote(forget['question'])} "
             f"--prompt {shlex.quote(retain['question'])} --max-new-tokens 48",
             "# general capability: the offline lm-eval tasks (world facts, real authors; chance 0.25)",
             f"{prog} lm-eval {export} --tasks tofu_general"]
    command = evaluation_command(root / "export")
    if command:
        lines += ["# evaluate it on TOFU again, from its checkpoint at its alpha", command.replace(
            "lightning-unlearn", prog, 1)]
    return lines


def run_stage(stage: Stage, upstream: dict[str, str], force: bool) -> bool:
    """Run a stage unless its recorded key matches; returns whether it ran."""
    key = stage.key(upstream)
    upstream[stage.name] = key
    # An export holds only what the export command writes: its stamp sits beside it, not in it.
    stamp = stage.output / ".stage" if stage.args[0] != "export" else stage.output.parent / f".{stage.name}.stage"
    if not force and stamp.is_file() and stamp.read_text() == key and stage.output.is_dir():
        print(f"[demo] {stage.name}: up to date, skipped")
        return False
    if stage.output.exists():
        shutil.rmtree(stage.output)
    tool = stage.args[0] if stage.args[0] in ("tiny", "sweep", "export") else None
    plain = tool in ("tiny", "export") or not sys.stdout.isatty()  # no progress bar to ask for
    args = stage.args if plain else [*stage.args, "--trainer.enable_progress_bar", "true"]
    command = {"tiny": "python -m lightning_unlearn.models.tiny ", "sweep": "python -m lightning_unlearn.sweep ",
               "export": f"{program()} export ", None: "python main.py "}[tool]
    print(f"\n[demo] {stage.name}: {command}{shlex.join(args[1:] if tool else args)}", flush=True)
    start = time.perf_counter()
    if tool == "tiny":
        opts = stage.args[2:]
        make_tiny_pair(stage.args[1], large=tuple(map(int, opts[1:3])), small=tuple(map(int, opts[4:6])),
                       seed=int(opts[7]))
    elif tool == "sweep":
        sweep_main(args[1:])
    elif tool == "export":
        export_checkpoint(args[1], args[2], float(args[4]) if args[3:4] == ["--alpha"] else None)
    else:
        cli_main(args)
    stage.output.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    print(f"[demo] {stage.name}: done in {time.perf_counter() - start:.0f} s")
    return True


@contextmanager
def quiet_console() -> Iterator[None]:
    """Keep the demo's console to its stage lines, progress bars, results and warnings.

    Lightning's info lines (seed, accelerators, "Loading `train_dataloader`...", "`Trainer.fit` stopped") and
    transformers' bars for loading and saving a tiny model say nothing a demo user acts on; warnings pass.
    """
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def figures(root: Path, columns: dict[str, dict]) -> dict[Path, TradeoffFigure]:
    """Draw the demo's trade-off figures in ``root`` with its reference models, the fine-tuned and retain columns:
    ``tradeoff_by_epoch.png`` (every evaluated epoch, the selected one marked) and, after an alpha sweep,
    ``alpha_sweep.png`` (the selected epoch at each alpha, the selected alpha marked); return each figure written
    with its path.

    The selected epoch is the one the sweep evaluated: ``best.ckpt``, the rule's pick with the floor of
    ``configs/demo/unlearn.yaml`` (0.9), or without a sweep (EUL, ``--quick``) ``last.ckpt``, the last epoch.
    """
    retain = columns["retain model"].get("model_utility")
    history_file, sweep_file = root / "logs/unlearn/TOFU_HISTORY.json", root / "eval/unlearned/ALPHA_SWEEP.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    sweep = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    drawn = {}
    if history:
        drawn[root / "tradeoff_by_epoch.png"] = series_figure(
            history, "epoch", "unlearning, epoch by epoch: forget quality vs model utility",
            finetuned=columns["fine-tuned"], retain_utility=retain, floor=FLOOR,
            selected=None if sweep is not None else history[-1])
    if sweep:
        drawn[root / "alpha_sweep.png"] = series_figure(
            sweep, "alpha", "the selected epoch at each offset strength alpha", finetuned=columns["fine-tuned"],
            retain_utility=retain, floor=FLOOR, selected=next((r for r in sweep if r.get("selected")), None))
    return {path: figure for path, figure in drawn.items() if save_tradeoff(figure, path) is not None}


def selected_alpha_dir(folder: Path) -> Path:
    """Where a model's ``TOFU_SUMMARY.json`` is: ``folder``, or after an alpha sweep the selected alpha's run."""
    sweep = folder / "ALPHA_SWEEP.json"
    if not sweep.is_file():
        return folder
    chosen = [r for r in json.loads(sweep.read_text()) if r.get("selected")]
    if not chosen:
        raise ValueError(f"{sweep} marks no selected alpha: was the sweep run with a retain reference?")
    return folder / f"alpha_{chosen[0]['alpha']:g}"


REFERENCE_ROWS = {"forget_quality": "(reference)", "privleak": "(reference)"}
"""The retain model's cells of the metrics measured *against* it (forget quality: the KS test of forget truth ratios
against the retain model's; privleak: the AUC gap relative to the retain model's): it is their reference."""


def export_summary(export: Path) -> dict | None:
    """The export's method, epoch and alpha (``offset.json``, ``source.json``) and a label for the table, or None
    where the demo wrote no export."""
    source_file, manifest_file = export / EXPORT_SOURCE, export / OFFSET_MANIFEST
    if not source_file.is_file():
        return None
    source = json.loads(source_file.read_text(encoding="utf-8"))
    manifest = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    parts = [f"{manifest['method']} offset" if manifest.get("method") else "direct",
             f"epoch={source['epoch']}" if source.get("epoch") is not None else None,
             f"alpha={source['alpha']:g}" if source.get("alpha") is not None else None]
    return {"export": str(export), "method": manifest.get("method"), "epoch": source.get("epoch"),
            "alpha": source.get("alpha"), "alpha_from": source.get("alpha_from"),
            "label": ", ".join(p for p in parts if p)}


def report(root: Path, retain_rows: int) -> dict[str, dict]:
    """Print the before/after table and gather the summaries into ``DEMO_SUMMARY.json``.

    Each model's column is its ``TOFU_SUMMARY.json`` plus :func:`selectivity` of its ``TOFU_EVAL.json``.
    """
    columns = {}
    selected = export_summary(root / "export")
    for name, folder in (("fine-tuned", "finetuned"), ("retain model", "retain"), ("unlearned", "unlearned")):
        results = selected_alpha_dir(root / "eval" / folder)
        columns[name] = {**json.loads((results / "TOFU_SUMMARY.json").read_text()),
                         **selectivity(json.loads((results / "TOFU_EVAL.json").read_text()), retain_rows)}
    history = root / "logs/unlearn/TOFU_HISTORY.json"
    atomic_write_json(root / "DEMO_SUMMARY.json", {"models": columns, "selected": selected,
                                                   "epochs": json.loads(history.read_text()) if history.is_file() else []})
    plots = figures(root, columns)
    # The printed column names the selected epoch and alpha; the returned and saved columns keep the plain names.
    label = f"unlearned ({selected['label']})" if selected else "unlearned"
    printed = {(label if name == "unlearned" else name): column for name, column in columns.items()}
    print_table(summary_table(printed, TABLE_KEYS, "TOFU, tiny world: before and after offset unlearning",
                              missing={"retain model": REFERENCE_ROWS}))
    print(f"[demo] summaries: {root / 'DEMO_SUMMARY.json'}; plots: {', '.join(map(str, plots)) or 'none'}")
    return columns


def demo_method(name: str) -> str:
    """An ``argparse`` type: the canonical name of a method the demo runs (offset mode, or EUL)."""
    try:
        method = resolve(name)
    except UnknownMethod as err:
        raise argparse.ArgumentTypeError(str(err).replace("--model ", "", 1)) from None
    if "offset" not in method.modes and method.name != "EUL" or not method.unlearns:
        raise argparse.ArgumentTypeError(f"the demo unlearns in offset mode (or with EUL); {method.name} runs in "
                                         f"{'/'.join(method.modes)} mode only.")
    return method.name


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="folder for models, logs and results")
    offset_methods = ", ".join(m.name for m in unlearning_methods("offset"))
    parser.add_argument("--method", default="NPO", type=demo_method,
                        help=f"unlearning method, any case or alias: offset unlearning with {offset_methods}; "
                        "EUL: unlearning layers in the large model (configs/demo/eul.yaml)")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--large", type=int, nargs=2, default=(128, 4), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--small", type=int, nargs=2, default=(64, 2), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--epochs", type=int, default=None, help="unlearning epochs (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="a reduced world (80 pairs, 20 evaluation samples)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny models' initialisation and of every "
                        "stage (seed_everything; EUL: adapter_seed)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    start = time.perf_counter()
    upstream: dict[str, str] = {}
    with quiet_console():
        for stage in stages(root, args.method, tuple(args.large), tuple(args.small), args.epochs, args.quick,
                            args.seed):
            run_stage(stage, upstream, args.force)
        if args.method != "EUL":  # EUL's unlearning layers are not an export generate reads (not yet)
            run_stage(export_stage(root, args.method, args.quick), upstream, args.force)
    columns = report(root, retain_term_rows(args.method, args.quick))
    print(f"[demo] total {time.perf_counter() - start:.0f} s")
    selected = export_summary(root / "export")
    if selected:
        print(f"\n[demo] the unlearned model: {root / 'export'} ({selected['label']}). Next, from this folder:")
        print("\n".join(f"  {line}" for line in next_steps(root)))
    return columns


if __name__ == "__main__":
    main()
