"""Loader and document processing for the bundled task files, which read JSON Lines shipped with the package.

``datasets.load_dataset("json", data_files=...)`` resolves relative paths against the working directory,
so a task YAML could not name its own data portably. lm-evaluation-harness calls a task's
``custom_dataset`` with the task's ``dataset_kwargs`` and its ``metadata``, which holds the YAML's path
(``config_source``): relative ``data_files`` are resolved against that folder here.

:func:`gold_at_seeded_position` places each multiple-choice item's true answer among its perturbed ones at a
position drawn per question from a fixed seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets

GOLD_POSITION_SEED = "tofu-mc-v2"
"""Seed of the gold positions (with each question's text): changing it changes every task's documents."""


def local_json(data_files: dict[str, str], config_source: str, **_: Any) -> datasets.DatasetDict:
    """The splits ``data_files`` (``{split: path}``, relative to the task YAML) as a ``DatasetDict``.

    Raises:
        FileNotFoundError: a data file is missing (naming it and the YAML).
    """
    root = Path(config_source).parent
    files = {split: (root / path).resolve() for split, path in data_files.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Task {config_source} needs {missing}, which do not exist: reinstall the package or "
                                "point dataset_kwargs.data_files at the files.")
    return datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})


def gold_at_seeded_position(dataset: datasets.Dataset) -> datasets.Dataset:
    """Each row with ``choices`` (its ``perturbed_answer`` list with ``answer`` inserted) and ``gold`` (the index of
    ``answer`` in ``choices``), the position drawn uniformly from ``0..len(perturbed_answer)``.

    Why: lm-eval scores a multiple-choice item by ``argmax`` over the choices' log-likelihoods, which picks the
    first of tied choices. With the true answer always first, a model giving every choice the same score (a
    collapsed, uniform next-token distribution; or NaN log-likelihoods) would be right on every tie. The position
    is drawn from a ``random.Random`` seeded with :data:`GOLD_POSITION_SEED` and the question's text, so it is the
    same on every run and machine and does not depend on the order or number of rows (``--limit``).
    """

    def place(row: dict[str, Any]) -> dict[str, Any]:
        choices = list(row["perturbed_answer"])
        gold = random.Random(f"{GOLD_POSITION_SEED}:{row['question']}").randint(0, len(choices))
        choices.insert(gold, row["answer"])
        return {"choices": choices, "gold": gold}

    return dataset.map(place)
