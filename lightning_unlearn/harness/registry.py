"""Which lm-eval tasks exist: the package's local tasks, the user's ``--include_path`` and lm-eval's own.

Indexing lm-eval's built-in tasks reads some 15,000 YAML files (about 10 s of CPU, 30 s on a busy disk), so
the index is built from the local folders first and lm-eval's folder is added only when a requested task is
not among them; each index is kept for the life of the process, so evaluating every epoch pays once.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from lm_eval.tasks import TaskManager

__all__ = ["LOCAL_TASKS", "LOCAL_TASK_NAMES", "task_manager"]

LOCAL_TASKS = Path(__file__).parent / "tasks"
"""The package's own offline tasks: ``tofu_world_facts_mc`` and ``tofu_real_authors_mc`` (tag ``tofu_general``),
four-way multiple choice made from the bundled TOFU ``*_perturbed`` files (the true answer against three
perturbed ones)."""

LOCAL_TASK_NAMES = ("tofu_general", "tofu_real_authors_mc", "tofu_world_facts_mc")


@lru_cache(maxsize=8)
def _manager(include: tuple[str, ...], defaults: bool) -> TaskManager:
    return TaskManager(include_path=list(include), include_defaults=defaults)


def _known(manager: TaskManager, name: str) -> bool:
    return name in manager.all_tasks or bool(manager.match_tasks([name]))


def task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None = None) -> TaskManager:
    """A ``TaskManager`` that knows every name of ``tasks`` (glob patterns allowed, as lm-eval's ``--tasks``).

    The package's local tasks are always included; lm-eval's built-in ones only when needed.

    Raises:
        FileNotFoundError: an ``include_path`` folder does not exist.
        ValueError: a task name is unknown (the message lists the closest known names).
    """
    extra = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for folder in extra:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--include_path {folder!r} is not a folder of lm-eval task YAML files.")
    include = (str(LOCAL_TASKS), *(str(Path(f).resolve()) for f in extra))
    if not tasks:
        raise ValueError("No lm-eval task given: name at least one, e.g. tofu_general or arc_easy.")
    manager = _manager(include, False)
    if all(_known(manager, t) for t in tasks):
        return manager
    manager = _manager(include, True)
    unknown = [t for t in tasks if not _known(manager, t)]
    if unknown:
        hints = "; ".join(f"{t!r}: did you mean {difflib.get_close_matches(t, manager.all_tasks, n=5, cutoff=0.6)}?"
                          for t in unknown)
        raise ValueError(f"Unknown lm-eval task(s) {unknown} ({hints}). `lm-eval ls tasks` lists lm-eval's tasks; "
                         f"the package's offline ones are {list(LOCAL_TASK_NAMES)}; add your own folder of task "
                         "YAML with --include_path.")
    return manager
