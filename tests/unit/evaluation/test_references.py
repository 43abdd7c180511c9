"""Published retain-model logs as forget-quality references: cached once, read offline afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_unlearn.evaluation.references import ReferenceUnavailable, cached_path, fetch, main

LOG = {"forget_truth_ratio": {"agg_value": 0.6, "value_by_index": {"0": {"score": 0.5}, "1": {"score": 0.7}}}}


def no_network(filename: str, folder: str) -> str:
    raise OSError("no network")


def test_offline_without_a_cached_log_says_how_to_provide_it(tmp_path: Path) -> None:
    # conftest puts the hub offline: the real download fails at once
    with pytest.raises(ReferenceUnavailable) as err:
        fetch("Llama-3.2-1B-Instruct", "retain90", cache=tmp_path)
    text = str(err.value)
    assert "open-unlearning/eval" in text and "tofu_Llama-3.2-1B-Instruct_retain90/TOFU_EVAL.json" in text
    assert "--from PATH" in text and "main.py test --model SFT" in text
    assert not any(tmp_path.rglob("*.json")), "nothing half-written in the cache"


def test_a_local_copy_is_cached_and_read_offline_afterwards(tmp_path: Path) -> None:
    copy = tmp_path / "TOFU_EVAL.json"
    copy.write_text(json.dumps(LOG))
    cache = tmp_path / "cache"
    path = main(["Llama-3.2-1B-Instruct", "--cache", str(cache), "--from", str(copy)])
    assert path == cached_path("Llama-3.2-1B-Instruct", "retain90", cache) and json.loads(path.read_text()) == LOG
    assert fetch("Llama-3.2-1B-Instruct", "retain90", cache, download=no_network) == path


def test_the_command_caches_under_runs_references_by_default(tmp_cwd: Path) -> None:
    copy = tmp_cwd / "TOFU_EVAL.json"
    copy.write_text(json.dumps(LOG))
    path = main(["Llama-3.2-1B-Instruct", "--from", str(copy)])
    expected = tmp_cwd / "runs" / "references" / "tofu_Llama-3.2-1B-Instruct_retain90" / "TOFU_EVAL.json"
    assert path.resolve() == expected and json.loads(expected.read_text()) == LOG


def test_a_download_is_checked_and_cached(tmp_path: Path) -> None:
    calls = []

    def hub(filename: str, folder: str) -> str:
        calls.append(filename)
        out = Path(folder) / filename
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps(LOG))
        return str(out)

    path = fetch("Llama-2-7b-chat-hf", "retain95", tmp_path, download=hub)
    assert calls == ["tofu_Llama-2-7b-chat-hf_retain95/TOFU_EVAL.json"] and path.is_file()
    assert fetch("Llama-2-7b-chat-hf", "retain95", tmp_path, download=hub) == path and len(calls) == 1


def test_a_file_that_is_not_a_tofu_log_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="forget_truth_ratio"):
        fetch("Llama-3.2-1B-Instruct", cache=tmp_path / "cache", source=bad)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))
    with pytest.raises(ValueError, match="retain split"):
        fetch("Llama-3.2-1B-Instruct", "forget10", tmp_path)
