"""Loader for task files that read JSON Lines shipped next to them, wherever the package is installed.

``datasets.load_dataset("json", data_files=...)`` resolves relative paths against the working directory,
so a task YAML could not name its own data portably. lm-evaluation-harness calls a task's
``custom_dataset`` with the task's ``dataset_kwargs`` and its ``metadata``, which holds the YAML's path
(``config_source``): relative ``data_files`` are resolved against that folder here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets


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
