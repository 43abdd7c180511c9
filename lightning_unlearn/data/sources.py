"""Where question/answer splits come from: the bundled TOFU files, a local folder, or the hub.

A split is a list of dicts. The same split names work in all three places (``forget10``,
``retain90``, ``forget10_perturbed``, ``real_authors_perturbed``, ...), so a config written against the
bundled copy runs unchanged against ``locuslab/TOFU`` or a user's own folder of JSON Lines files.

Rows are checked when they are read (:func:`load_split` with ``fields``): a row without a field, or whose
question or answer is not text (a number, null, a list), is refused with the file, the row and the field,
instead of failing later inside the tokenizer; an empty text is allowed with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .muse_sources import is_muse, read_muse
from .rows import Record, Rows, read_jsonl

BUNDLED = "bundled"


def bundled_dir() -> Path:
    """Folder of the TOFU JSON Lines files shipped inside the package."""
    return Path(str(resources.files("lightning_unlearn.data") / "tofu"))


def available_splits(folder: str | Path) -> list[str]:
    """Names of the ``*.jsonl`` and ``*.txt`` files in a folder, without extension."""
    return sorted({p.stem for pattern in ("*.jsonl", "*.txt") for p in Path(folder).glob(pattern)})


def _read_text_files(path: Path) -> Rows:
    """A ``.txt`` file as one text document, or a folder's ``.txt`` files (sorted by name) one document each."""
    files = [path] if path.is_file() else sorted(path.glob("*.txt"))
    return Rows([{"text": f.read_text(encoding="utf-8")} for f in files], str(path), [f.name for f in files])


def _read_local(folder: Path, split: str) -> Rows:
    path = folder / f"{split}.jsonl"
    if path.is_file():
        return read_jsonl(path)
    for text_path in (folder / f"{split}.txt", folder / split):
        if text_path.is_file() or (text_path.is_dir() and any(text_path.glob("*.txt"))):
            return _read_text_files(text_path)
    names = available_splits(folder)
    raise FileNotFoundError(
        f"Split {split!r} not found: there is no {path} (nor {split}.txt, nor a {split}/ folder of .txt files). "
        f"Splits available in {folder}: {', '.join(names) if names else 'none (the folder holds no .jsonl file)'}."
    )


def _read_hub(dataset_id: str, split: str) -> Rows:
    """Read one configuration of a hub dataset (TOFU publishes each split as a config)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(dataset_id, split, split="train")
    except Exception as err:  # datasets raises many unrelated types for "not found" and "offline"
        raise FileNotFoundError(
            f"Could not load split {split!r} of hub dataset {dataset_id!r}: {err}. Offline, use "
            f"dataset: {BUNDLED} or a local folder of JSON Lines files."
        ) from err
    records = [dict(row) for row in dataset]
    return Rows(records, f"hub dataset {dataset_id!r}, configuration {split!r}",
                [f"row {i}" for i in range(len(records))])


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def load_split(dataset: str, split: str, fields: Sequence[str] = (), list_fields: Sequence[str] = ()) -> list[Record]:
    """Load ``split`` from ``dataset``: ``"bundled"``, a local folder, or a hub dataset id.

    ``name[a:b]`` takes rows a to b of a split (``retain_perturbed[:120]``: the first six authors).
    With ``fields`` (and ``list_fields``), every row taken must hold text in each field (and a non-empty list
    of texts in each list field), checked by :func:`require_fields` with the file and line of each row.

    Raises:
        FileNotFoundError: the split, folder or hub dataset does not exist or cannot be reached.
        ValueError: a line is not JSON, or a row lacks a field or holds something other than text in it.
    """
    rows = load_rows(dataset, split)
    if fields or list_fields:
        require_fields(rows.records, fields, rows.source, list_fields, rows.places)
    return rows.records


def load_rows(dataset: str, split: str) -> Rows:
    """:func:`load_split`'s rows (unchecked) with the file and place of each."""
    sliced = _SLICE.match(split)
    if sliced:
        rows = load_rows(dataset, sliced["name"])
        start, stop = sliced["start"], sliced["stop"]
        window = slice(int(start) if start else None, int(stop) if stop else None)
        return Rows(rows.records[window], rows.source, rows.places[window])
    if is_muse(dataset):
        return read_muse(dataset, split)
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


def describe(value: Any) -> str:
    """A JSON-ish name of a value's type, with the value when short (``a number (42)``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    kind = {list: "a list", tuple: "a list", dict: "an object", str: "text"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} ({shown if len(shown) <= 60 else shown[:57] + '...'})"


def require_fields(
    records: Sequence[Record], fields: Sequence[str], where: str, list_fields: Sequence[str] = (),
    places: Sequence[str] | None = None, warn_empty: bool = True,
) -> None:
    """Check that every record holds text in each of ``fields`` and a non-empty list of texts in each of
    ``list_fields`` (TOFU's perturbed answers), so that bad data fails here, named, and not in the tokenizer.

    Args:
        records: the rows to check.
        fields: names of the fields that must hold a string.
        where: the file or split the rows come from, first in every message.
        list_fields: names of the fields that must hold a non-empty list of strings.
        places: where each row is (``line 7``); ``row <index>`` by default.
        warn_empty: warn once per field about rows whose text is empty or blank (the model then learns
            and is scored on the end-of-answer token alone for that answer).

    Raises:
        ValueError: naming ``where``, the row and the field, for the first row that is not an object, lacks
            a field, or holds a number, null, a list or an object where text belongs.
    """
    fields = tuple(dict.fromkeys(fields))
    list_fields = tuple(dict.fromkeys(list_fields))
    needed = list(fields + list_fields)
    empty: dict[str, list[str]] = {}
    for index, record in enumerate(records):
        place = places[index] if places is not None else f"row {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}, {place}: a row must be an object with the fields {needed}, not "
                             f"{describe(record)}.")
        missing = [f for f in needed if f not in record]
        if missing:
            raise ValueError(
                f"{where}, {place}: no field {missing[0]!r} (the row has {sorted(record)}). Every row needs "
                f"{needed}; set question_key/answer_key if your files name them differently."
            )
        for name in fields:
            _require_text(record[name], name, where, place, empty)
        for name in list_fields:
            options = record[name]
            if not isinstance(options, list) or not options:
                raise ValueError(f"{where}, {place}: field {name!r} must be a non-empty list of texts, not "
                                 f"{describe(options)}.")
            for position, option in enumerate(options):
                _require_text(option, f"{name}[{position}]", where, place, empty, name)
    if warn_empty:
        for name, at in empty.items():
            shown = ", ".join(at[:5]) + (f" and {len(at) - 5} more" if len(at) > 5 else "")
            warnings.warn(f"{where}: field {name!r} is empty in {len(at)} row(s) ({shown}). They are used as they "
                          "are (an empty answer is only its end-of-answer token); fill or remove them if that is "
                          "not intended.", UserWarning, stacklevel=3)


def _require_text(value: Any, name: str, where: str, place: str, empty: dict[str, list[str]],
                  group: str | None = None) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}, {place}: field {name!r} is {describe(value)}, not text. Write it as a JSON "
                         "string (in quotes), or remove the row.")
    if not value.strip():
        empty.setdefault(group or name, []).append(place)
