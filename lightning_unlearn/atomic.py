"""Files written whole or not at all: a crash or a full disk mid-write leaves the old file (or none), never half a
result file that a later run, a sweep or the comparison table would read as finished.

The final file gets the mode an ordinary ``open(path, "w")`` would give it (``0o666 & ~umask``): the temporary file
that ``tempfile.mkstemp`` creates is private (``0o600``) whatever the umask, and ``os.replace`` keeps that mode, so
without the ``chmod`` a result file shared through a group-readable run folder would be unreadable to the group.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "current_umask"]


def current_umask() -> int:
    """The process's umask (e.g. ``0o022``). Read from ``/proc/self/status`` where Linux offers it, because the
    portable way (set it and set it back) changes a process-wide setting for an instant, which another thread
    creating a file at that moment would see."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Have ``write(tmp)`` fill a temporary file beside ``path``, then ``os.replace`` it onto ``path``, so a crash
    never leaves half a file (the temporary file is removed when ``write`` raises). The file ends with mode
    ``0o666 & ~umask``, as ``open`` would create it. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
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
