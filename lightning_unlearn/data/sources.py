"""Where question/answer splits come from: the bundled TOFU files, a local folder, or the hub.

A split is a list of dicts. The same split names work in all three places (``forget10``,
``retain90``, ``forget10_perturbed``, ``real_authors_perturbed``, ...), so a config written against the
bundled copy runs unchanged against ``locuslab/TOFU`` or a user's own folder of JSON Lines files.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

BUNDLED = "bundled"

Record = dict[str, Any]


def bundled_dir() -> Path:
    """Folder of the TOFU JSON Lines files shipped inside the package."""
    return Path(str(resources.files("lightning_unlearn.data") / "tofu"))


def available_splits(folder: str | Path) -> list[str]:
    """Names of the ``*.jsonl`` files in a folder, without extension."""
    return sorted(p.stem for p in Path(folder).glob("*.jsonl"))


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}). Fix or remove that line.") from err
    return records


def _read_local(folder: Path, split: str) -> list[Record]:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        names = available_splits(folder)
        raise FileNotFoundError(
            f"Split {split!r} not found: there is no {path}. Splits available in {folder}: "
            f"{', '.join(names) if names else 'none (the folder holds no .jsonl file)'}."
        )
    return _read_jsonl(path)


def _read_hub(dataset_id: str, split: str) -> list[Record]:
    """Read one configuration of a hub dataset (TOFU publishes each split as a config)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split, split="train")
    except Exception as err:  # datasets raises many unrelated types for "not found" and "offline"
        raise FileNotFoundError(
            f"Could not load split {split!r} of hub dataset {dataset_id!r}: {err}. Offline, use "
            f"dataset: {BUNDLED} or a local folder of JSON Lines files."
        ) from err
    return [dict(row) for row in dataset]


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def load_split(dataset: str, split: str) -> list[Record]:
    """Load ``split`` from ``dataset``: ``"bundled"``, a local folder, or a hub dataset id.

    ``name[a:b]`` takes rows a to b of a split (``retain_perturbed[:120]``: the first six authors).
    """
    sliced = _SLICE.match(split)
    if sliced:
        rows = load_split(dataset, sliced["name"])
        start, stop = sliced["start"], sliced["stop"]
        return rows[int(start) if start else None : int(stop) if stop else None]
    if dataset == BUNDLED:
        return _read_local(bundled_dir(), split)
    if os.path.isdir(dataset):
        return _read_local(Path(dataset), split)
    if dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1:
        raise FileNotFoundError(f"Dataset folder {dataset!r} does not exist. Give an existing folder, "
                                f"{BUNDLED!r}, or a hub id such as 'locuslab/TOFU'.")
    return _read_hub(dataset, split)


def load_refusals(dataset: str = BUNDLED) -> list[str]:
    """The "I don't know" answers IdkDPO prefers over the real ones (``idontknow.jsonl``, one per line)."""
    folder = bundled_dir() if dataset == BUNDLED or not os.path.isdir(dataset) else Path(dataset)
    path = folder / "idontknow.jsonl"
    if not path.is_file():
        path = bundled_dir() / "idontknow.jsonl"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no refusal answers.")
    return lines


def require_fields(records: list[Record], fields: tuple[str, ...], where: str) -> None:
    """Fail on the first record missing a field, naming the split, the row and the fields it has."""
    for index, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(
                f"{where}: row {index} has no field {missing[0]!r} (it has {sorted(record)}). Every row needs "
                f"{list(fields)}; set question_key/answer_key if your files name them differently."
            )
