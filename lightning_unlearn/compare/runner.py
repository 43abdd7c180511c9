"""Running the cells of a comparison: each an ordinary ``main.py fit`` then ``main.py test``, printed first.

A cell's result (``RESULT.json`` in its folder) records its key (:meth:`.Cell.key`), status, timings, the
commands and the TOFU summary of its test. A cell whose result is ``ok`` with the same key is skipped; a failed
cell records its error and the others go on (it is retried on the next run).
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..console import on_terminal
from .spec import Cell

Runner = Callable[[list[str]], None]
"""Runs one ``main.py`` command line (without the program name); raises on failure."""


def in_process(args: list[str]) -> None:
    """Run a command in this process (the tiny world: no start-up cost per cell)."""
    from ..cli import main as cli_main

    try:
        cli_main(list(args))
    except SystemExit as exit_:  # jsonargparse reports bad arguments by exiting
        if exit_.code not in (0, None):
            raise RuntimeError(f"main.py exited with status {exit_.code} (bad arguments; see the log above)") from None


def in_subprocess(args: list[str]) -> None:
    """Run a command as its own process (real models: each cell starts with all device memory free)."""
    done = subprocess.run([sys.executable, "-m", "lightning_unlearn.cli", *args], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"main.py exited with status {done.returncode} (see the log above)")


def find_one(folder: Path, pattern: str) -> Path:
    """The newest file matching ``pattern`` under ``folder`` (logger subfolders included).

    Raises:
        FileNotFoundError: nothing matches.
    """
    found = sorted(glob.glob(str(folder / "**" / pattern), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no {pattern} under {folder}")
    return Path(found[-1])


def read_result(cell: Cell | Path) -> dict[str, Any] | None:
    """The ``RESULT.json`` of a cell (or of a folder), None when there is none or it is not JSON."""
    path = (cell if isinstance(cell, Path) else cell.folder) / "RESULT.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_done(cell: Cell | Path, key: str) -> bool:
    """Whether the cell (or folder) has an ``ok`` result made with this key."""
    result = read_result(cell)
    return result is not None and result.get("status") == "ok" and result.get("key") == key


def run_recorded(folder: Path, result: dict[str, Any], work: Callable[[dict[str, Any]], None],
                 name: str = "", tag: str = "compare") -> dict[str, Any]:
    """Run ``work(result)``, which fills ``result`` in; write it to ``folder/RESULT.json`` (atomically) with
    ``status`` ``ok``, or ``failed`` with the error (type, message, last traceback lines) when ``work`` raised.

    The one place a cached unit of work (a comparison's cell, a sequence's step) is run and recorded: any
    exception is caught, so one failure becomes a row of the table instead of ending the run, and a unit whose
    ``RESULT.json`` is ``ok`` with the same ``key`` is known to be done (:func:`is_done`).
    """
    result["status"] = "failed"
    try:
        work(result)
        result["status"] = "ok"
    except Exception as err:  # noqa: BLE001  (a failure of any kind is reported in the table)
        lines = traceback.format_exception(err)
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = "".join(lines[-6:])
        print(f"[{tag}] {name}: FAILED: {result['error']}", flush=True)
    atomic_write_json(folder / "RESULT.json", result)
    return result


def run_cell(cell: Cell, key: str, runner: Runner = in_process) -> dict[str, Any]:
    """Fit and test one cell; return (and write atomically) its result, ``status`` ``ok`` or ``failed``.

    Any exception of either command is caught and recorded (:func:`run_recorded`), so one failing cell does not
    stop the comparison.
    """
    def work(result: dict[str, Any]) -> None:
        if cell.folder.exists():
            for stale in ("fit", "test"):
                _remove(cell.folder / stale)
        print(f"\n[compare] {cell.name}: {result['fit_command']}", flush=True)
        start = time.perf_counter()
        runner(cell.fit)
        result["train_s"] = round(time.perf_counter() - start, 1)
        test = [*cell.test, "--ckpt_path", str(find_one(cell.folder / "fit", "*.ckpt"))]
        result["test_command"] = "python main.py " + shlex.join(test)
        print(f"[compare] {cell.name}: {result['test_command']}", flush=True)
        start = time.perf_counter()
        runner(test)
        result["test_s"] = round(time.perf_counter() - start, 1)
        result["summary"] = json.loads(find_one(cell.folder / "test", "TOFU_SUMMARY.json").read_text())
        if cell.general_tasks and not any("/" in key for key in result["summary"]):
            raise RuntimeError(f"the test ran lm-eval tasks {cell.general_tasks} but its TOFU_SUMMARY.json has no "
                               "task/metric entries: the general accuracy would be missing")

    result: dict[str, Any] = {"method": cell.method, "mode": cell.mode, "key": key,
                              "fit_command": "python main.py " + shlex.join(cell.fit)}
    return run_recorded(cell.folder, result, work, cell.name)


def _remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def run_cells(cells: list[Cell], upstream: str = "", runner: Runner = in_process, force: bool = False,
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every cell not already done (same key, ``ok``), with a progress bar of cells done and left (without a
    terminal, a line per cell instead).

    Returns the results in the order of ``cells`` (skipped cells: their stored result).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    keys = [cell.key(upstream) for cell in cells]
    todo = [i for i, (cell, key) in enumerate(zip(cells, keys)) if force or not is_done(cell, key)]
    results: list[dict[str, Any] | None] = [None if i in todo else read_result(c) for i, c in enumerate(cells)]
    skipped = len(cells) - len(todo)
    if skipped:
        print(f"[compare] {skipped} of {len(cells)} cells already done with the same configuration: skipped")
    columns = (TextColumn("[compare] cells"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn())
    lines = progress and not on_terminal()  # a log: a line per cell, not a bar redrawn in place
    start = time.perf_counter()
    with Progress(*columns, disable=not progress or lines, transient=False) as bar:
        task = bar.add_task("", total=len(cells), completed=skipped)
        for n, i in enumerate(todo):
            bar.update(task, description=f"now {cells[i].name}, {len(todo) - todo.index(i) - 1} left after it")
            if lines:
                print(f"[compare] cell {skipped + n + 1}/{len(cells)}: {cells[i].name}, {len(todo) - n - 1} left "
                      f"after it, elapsed {time.perf_counter() - start:.0f} s", flush=True)
            results[i] = run_cell(cells[i], keys[i], runner)
            bar.advance(task)
        bar.update(task, description="done")
    return [r for r in results if r is not None]
