"""Files written whole or not at all: a crash or a full disk mid-write leaves the old file (or none), never half a
result file that a later run, a sweep or the comparison table would read as finished.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Have ``write(tmp)`` fill a temporary file beside ``path``, then ``os.replace`` it onto ``path``, so a crash
    never leaves half a file (the temporary file is removed when ``write`` raises). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write JSON (indented, NaN allowed) atomically (:func:`atomic_write`)."""
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True))
