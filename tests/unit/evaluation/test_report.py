"""The result writers: a file is written whole or not at all, and JSON keeps the NaN of an undefined metric."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest

from lightning_unlearn.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_text_and_json_are_written_whole_and_read_back(tmp_path: Path) -> None:
    text = tmp_path / "deep" / "er" / "notes.txt"
    assert atomic_write_text(text, "forget ROUGE 0.5\nünlearned\n") == text
    assert text.read_text(encoding="utf-8") == "forget ROUGE 0.5\nünlearned\n"
    data = {"forget_quality": float("nan"), "model_utility": 0.9, "by_index": {"0": [1, 2]}}
    atomic_write_json(tmp_path / "summary.json", data)
    back = json.loads((tmp_path / "summary.json").read_text())
    assert math.isnan(back.pop("forget_quality")) and back == {"model_utility": 0.9, "by_index": {"0": [1, 2]}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "summary.json"], "no temporary file is left"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "summary.json", "old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_result_file_has_the_mode_the_umask_gives_an_ordinary_file(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        written = atomic_write_json(tmp_path / "summary.json", {"forget_quality": 0.5})
        copied = atomic_write(tmp_path / "copy.json", lambda tmp: shutil.copyfile(written, tmp))
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == expected, "the reference: what open() gives"
    assert stat.S_IMODE(written.stat().st_mode) == expected
    assert stat.S_IMODE(copied.stat().st_mode) == expected
