"""One split's records as read, with where each came from: what every reader of :mod:`.sources` and
:mod:`.muse_sources` returns, so that a bad row is reported with its file and line whoever read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]


@dataclass
class Rows:
    """The records of one split with where each comes from, for error messages.

    Attributes:
        records: the rows, as read.
        source: the file (``.../forget10.jsonl``) or hub dataset and configuration they were read from.
        places: where each row is in ``source``: ``line N`` (1-based, of a file) or ``row N`` (0-based).
    """

    records: list[Record]
    source: str
    places: list[str]


def read_jsonl(path: Path) -> Rows:
    """The records of a JSON Lines file (blank lines skipped), each with its line number."""
    records, places = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}). Fix or remove that line.") from err
            places.append(f"line {number}")
    return Rows(records, str(path), places)
