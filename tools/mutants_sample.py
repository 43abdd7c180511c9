"""A seeded, stratified random sample of mutmut mutants, and its mutation score with 95% intervals.

The four mutated folders (setup.cfg [mutmut] only_mutate) hold several thousand mutants; at ~14 s each on one
core, running them all takes a day. A simple random sample of ``--per-folder`` mutants from each folder (the
strata) estimates each folder's score with a Wilson 95% interval, and the package's score as the stratum-size
weighted mean of the folder scores (standard stratified estimator, Cochran, *Sampling Techniques*, 3rd ed.,
section 5.3; interval from its normal approximation with the finite-population correction). The sample is a
function of the source and the seed alone, so the same ``make mutants-sample`` on the same commit runs the same
mutants.

Mutant names are listed with mutmut's own generator (``mutmut.mutation.file_mutation.mutate_file_contents``), the
one ``mutmut run`` uses, so the names are the ones ``mutmut run NAME...`` accepts.

Usage::

    python tools/mutants_sample.py names --per-folder 50 --seed 17    # one name a line, for `mutmut run`
    python tools/mutants_sample.py report --per-folder 50 --seed 17   # after the run: scores, survivors

A mutant counts as detected when its tests failed ("killed") or ran past mutmut's time limit ("timeout"): a
mutant that hangs the code is caught by the suite's timeout just as a wrong value is. "no tests" (no fast test
reaches the function) counts as not detected.
"""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DETECTED = {"killed", "timeout"}


def mutated_folders(setup_cfg: Path = ROOT / "setup.cfg") -> list[str]:
    """The ``only_mutate`` globs of setup.cfg's [mutmut] section, e.g. ``lightning_unlearn/losses/*`` (a folder) or
    ``lightning_unlearn/sweep.py`` (one file).

    Raises:
        SystemExit: setup.cfg has no [mutmut] only_mutate.
    """
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    raw = parser.get("mutmut", "only_mutate", fallback="")
    globs = [line.strip() for line in raw.splitlines() if line.strip()]
    if not globs:
        raise SystemExit(f"{setup_cfg}: [mutmut] only_mutate is empty; name the folders to mutate there")
    return globs


def mutant_names_by_folder(globs: Sequence[str]) -> dict[str, list[str]]:
    """Every mutant mutmut generates for the files matching ``globs``, keyed by glob, names sorted.

    Names look like ``lightning_unlearn.losses.npo.x_npo_loss__mutmut_7``.
    """
    from mutmut.mutation.file_mutation import mutate_file_contents
    from mutmut.utils.format_utils import get_mutant_name

    out: dict[str, list[str]] = {}
    for glob in globs:
        names: list[str] = []
        files = [ROOT / glob] if glob.endswith(".py") else ROOT.glob(glob.rstrip("*") + "**/*.py")  # a file or a folder
        for path in sorted(files):
            rel = path.relative_to(ROOT)
            if not fnmatch.fnmatch(str(rel), glob):
                continue
            mutated = mutate_file_contents(str(rel), path.read_text())
            names += [get_mutant_name(rel, name) for name in mutated.mutant_names]
        out[glob] = sorted(names)
    return out


def draw(names_by_folder: dict[str, list[str]], per_folder: int, seed: int) -> dict[str, list[str]]:
    """``per_folder`` names drawn without replacement from each folder (all of a smaller one), seeded."""
    rng = random.Random(seed)
    return {
        folder: sorted(rng.sample(names, min(per_folder, len(names)))) for folder, names in names_by_folder.items()
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def statuses(mutants_dir: Path = ROOT / "mutants") -> dict[str, str]:
    """Each run mutant's status ("killed", "survived", "no tests", "timeout", ...) from mutmut's .meta files.

    Raises:
        SystemExit: no mutants/ folder (run ``make mutants-sample`` first).
    """
    from mutmut.stats import status_by_exit_code

    metas = list(mutants_dir.glob("**/*.py.meta"))
    if not metas:
        raise SystemExit(f"no mutmut results under {mutants_dir}; run `make mutants-sample` first")
    out: dict[str, str] = {}
    for meta in metas:
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def report(names_by_folder: dict[str, list[str]], sample: dict[str, list[str]], status: dict[str, str]) -> str:
    """Per-folder detected/sampled with Wilson 95% intervals, the stratified package score, and the survivors."""
    lines = [f"{'folder':<32} {'mutants':>7} {'sampled':>7} {'detected':>8} {'score':>6}  95% interval"]
    est = var = 0.0
    total = sum(len(v) for v in names_by_folder.values())
    survivors: list[str] = []
    unrun: list[str] = []
    for folder, picked in sample.items():
        big_n = len(names_by_folder[folder])
        got = [status.get(name, "not checked") for name in picked]
        unrun += [name for name, s in zip(picked, got) if s == "not checked"]
        survivors += [f"{s:<10} {name}" for name, s in zip(picked, got) if s not in DETECTED | {"not checked"}]
        checked = [s for s in got if s != "not checked"]
        k = sum(s in DETECTED for s in checked)
        lo, hi = wilson(k, len(checked))
        p = k / len(checked) if checked else 0.0
        lines.append(f"{folder:<32} {big_n:>7} {len(checked):>7} {k:>8} {p:>6.1%}  [{lo:.1%}, {hi:.1%}]")
        weight = big_n / total
        est += weight * p
        if len(checked) > 1:
            var += weight**2 * (1 - len(checked) / big_n) * p * (1 - p) / (len(checked) - 1)
    half = 1.96 * math.sqrt(var)
    if unrun and any(all(status.get(name, "not checked") == "not checked" for name in picked)
                     for picked in sample.values()):
        lines.append("stratified package score: n/a until every folder has a run mutant")
    else:
        lines.append(f"{'stratified package score':<32} {total:>7} {'':>7} {'':>8} {est:>6.1%}  "
                     f"[{max(0.0, est - half):.1%}, {min(1.0, est + half):.1%}]")
    if unrun:
        lines.append(f"{len(unrun)} sampled mutants not run yet (left out of the scores above)")
    lines += ["", f"not detected ({len(survivors)}):", *survivors]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["names", "report"])
    parser.add_argument("--per-folder", type=int, default=50, help="mutants drawn from each folder (default 50)")
    parser.add_argument("--seed", type=int, default=17, help="seed of the draw (default 17)")
    args = parser.parse_args(argv)
    if args.per_folder < 1:
        parser.error("--per-folder must be at least 1")
    names = mutant_names_by_folder(mutated_folders())
    sample = draw(names, args.per_folder, args.seed)
    if args.action == "names":
        print("\n".join(name for picked in sample.values() for name in picked))
    else:
        print(report(names, sample, statuses()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
