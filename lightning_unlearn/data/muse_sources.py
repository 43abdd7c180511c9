"""The MUSE benchmark's data (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"),
from the hub or from a local folder in the hub's layout.

MUSE publishes two corpora, ``muse-bench/MUSE-News`` (BBC news articles) and ``muse-bench/MUSE-Books`` (the
Harry Potter books), each with four configurations whose splits and fields are:

============  ==============================================================  ======================
config        splits                                                          fields
============  ==============================================================  ======================
``raw``       ``forget``, ``retain1``, ``retain2``, ``holdout``               ``text``
``knowmem``   ``forget_qa``, ``forget_qa_icl``, ``retain_qa``,                ``question``, ``answer``
              ``retain_qa_icl`` (Books: ``retain2_qa``, ``retain2_qa_icl``)
``verbmem``   ``forget``                                                      ``prompt``, ``gt``
``privleak``  ``forget``, ``retain``, ``holdout``                             ``text``
``sust``      ``forget_1`` .. ``forget_4`` (News: four disjoint folds of the  ``text``
              forget corpus, requested one after the other)
``scal``      ``forget_1`` .. ``forget_4`` (News: growing forget sets, each   ``text``
              holding the one before)
============  ==============================================================  ======================

``sust`` and ``scal`` are MUSE's sustainability and scalability configurations (``lightning-unlearn sequence`` runs
them as a stream of deletion requests, :mod:`lightning_unlearn.sequence`).

A split is named ``config/split`` (``knowmem/forget_qa``); a bare name is a ``raw`` split, so that
``--data.forget_split forget --data.retain_split retain1`` picks the corpora to unlearn and keep. The hub
path reads ``datasets.load_dataset(id, config, split=split)``; a local folder holds the same data as
``<folder>/<config>/<split>.jsonl`` (``python -m lightning_unlearn.data.muse_world OUT`` makes a small one
from the TOFU text shipped with the package: the project ships no MUSE text, the Books corpus being under
copyright).
"""

from __future__ import annotations

import os
from pathlib import Path

from .rows import Rows, read_jsonl

HUB_PREFIX = "muse-bench/"
RAW = "raw"
CONFIGS: dict[str, tuple[str, ...]] = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "knowmem": ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl", "retain2_qa", "retain2_qa_icl"),
    "verbmem": ("forget",),
    "privleak": ("forget", "retain", "holdout"),
    "sust": ("forget_1", "forget_2", "forget_3", "forget_4"),
    "scal": ("forget_1", "forget_2", "forget_3", "forget_4"),
}
FIELDS: dict[str, tuple[str, ...]] = {
    "raw": ("text",), "knowmem": ("question", "answer"), "verbmem": ("prompt", "gt"), "privleak": ("text",),
    "sust": ("text",), "scal": ("text",),
}
BUILD_HINT = "python -m lightning_unlearn.data.muse_world OUT builds a small folder in MUSE's layout"


def is_muse(dataset: str) -> bool:
    """Whether ``dataset`` is MUSE: a ``muse-bench/...`` hub id, or a folder with a ``raw/`` configuration folder."""
    if dataset.startswith(HUB_PREFIX):
        return True
    return os.path.isdir(dataset) and (Path(dataset) / RAW).is_dir()


def split_name(split: str) -> tuple[str, str]:
    """``(config, split)`` of ``config/split``, or of a bare ``raw`` split name.

    Raises:
        ValueError: for a configuration that MUSE does not have.
    """
    config, _, name = split.rpartition("/")
    config = config or RAW
    if config not in CONFIGS:
        raise ValueError(f"MUSE has no configuration {config!r} (split {split!r}); its configurations are "
                         f"{', '.join(CONFIGS)}: name a split as config/split, e.g. knowmem/forget_qa.")
    return config, name


def retain_qa_split(dataset: str) -> str:
    """The knowmem retain split: ``retain2_qa`` in MUSE-Books (and a folder that has it), ``retain_qa`` otherwise."""
    if os.path.isdir(dataset):
        return "retain2_qa" if (Path(dataset) / "knowmem" / "retain2_qa.jsonl").is_file() else "retain_qa"
    return "retain2_qa" if dataset.lower().rstrip("/").endswith("books") else "retain_qa"


def read_muse(dataset: str, split: str) -> Rows:
    """The rows of one MUSE split (``config/split``; a bare name is a ``raw`` split), unchecked.

    Raises:
        FileNotFoundError: the folder lacks the configuration or the split (naming what it holds and how to
            build a folder), or the hub dataset cannot be reached.
        ValueError: for an unknown configuration.
    """
    config, name = split_name(split)
    if not os.path.isdir(dataset):
        return _read_hub_config(dataset, config, name)
    folder = Path(dataset) / config
    if not folder.is_dir():
        held = sorted(p.name for p in Path(dataset).iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"The MUSE folder {dataset} has no {config}/ configuration (it holds {', '.join(held) or 'none'}); "
            f"{config}/{name}.jsonl is needed. Copy it from the hub's {config} configuration, or {BUILD_HINT}.")
    path = folder / f"{name}.jsonl"
    if not path.is_file():
        held = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise FileNotFoundError(f"The MUSE folder {dataset} has no {config}/{name}.jsonl (its {config}/ holds "
                                f"{', '.join(held) or 'nothing'}).")
    return read_jsonl(path)


def _read_hub_config(dataset_id: str, config: str, split: str) -> Rows:
    from datasets import load_dataset

    try:
        data = load_dataset(dataset_id, config, split=split)
    except Exception as err:  # datasets raises many unrelated types for "not found" and "offline"
        raise FileNotFoundError(
            f"Could not load split {split!r} of configuration {config!r} of hub dataset {dataset_id!r}: {err}. "
            f"Offline, give a local folder in MUSE's layout (<folder>/<config>/<split>.jsonl); {BUILD_HINT}."
        ) from err
    records = [dict(row) for row in data]
    return Rows(records, f"hub dataset {dataset_id!r}, configuration {config!r}, split {split!r}",
                [f"row {i}" for i in range(len(records))])
