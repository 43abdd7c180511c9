"""Slow: the demo pipeline on a reduced tiny TOFU world really forgets, and keeps what it should."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_unlearn.demo import main as demo


@pytest.mark.slow
def test_offset_npo_forgets_the_forget_set_and_keeps_the_rest(tmp_cwd: Path) -> None:
    columns = demo(["--root", str(tmp_cwd / "demo"), "--quick"])
    before, after = columns["fine-tuned"], columns["unlearned"]
    assert before["forget_Q_A_ROUGE"] > 0.8, "the fine-tuned model must know the forget set to begin with"
    assert after["forget_Q_A_ROUGE"] <= 0.5 * before["forget_Q_A_ROUGE"]
    assert after["retain_Q_A_ROUGE"] >= 0.9 * before["retain_Q_A_ROUGE"]
    assert after["forget_quality"] > 10 * before["forget_quality"]

    again = demo(["--root", str(tmp_cwd / "demo"), "--quick"])
    assert again == columns, "a second run skips every stage and reports the same numbers"
