"""A small folder in MUSE's layout made from the TOFU text shipped with the package (no MUSE text is shipped).

``python -m lightning_unlearn.data.muse_world OUT`` writes ``OUT/<config>/<split>.jsonl`` with MUSE's
configurations, splits and fields (:mod:`.muse`), for tests, the demo and trying the MUSE commands offline:

* ``raw``: ``forget`` the forget authors' rows (TOFU ``forget01``), ``retain1`` the first retain authors'
  (``retain_perturbed[:40]``), ``retain2`` the next ones', ``holdout`` authors no model is trained on
  (``holdout01``). Each row is one document ``"Question: {question}\\nAnswer: {answer}"``: the question is
  kept in the text so that a tiny model trained on the corpus alone can answer the knowmem questions (a
  large model learns facts from plain prose; a tiny one only learns the sequences it saw).
* ``knowmem``: the same authors' questions and answers; the first ``icl`` rows of each are the in-context
  examples (``forget_qa_icl``, ``retain_qa_icl``), the others the questions asked (``forget_qa``,
  ``retain_qa``; ``retain2_qa*`` with ``--books``, as MUSE-Books names them).
* ``verbmem``: ``forget``, each forget document cut in the middle of its answer: ``prompt`` the question
  and the answer's first half of words, ``gt`` the rest.
* ``privleak``: ``forget``, ``retain`` and ``holdout``: the documents of the corresponding ``raw`` splits.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .sources import Record, load_split

DOCUMENT = "Question: {question}\nAnswer: {answer}"


def document(row: Record) -> str:
    """A TOFU row as one text document."""
    return DOCUMENT.format(question=row["question"], answer=row["answer"])


def verbmem_row(row: Record) -> dict[str, str]:
    """A document cut in the middle of its answer's words: ``prompt`` (question and first half) and ``gt``."""
    words = row["answer"].split()
    half = max(1, len(words) // 2)
    return {"prompt": DOCUMENT.format(question=row["question"], answer=" ".join(words[:half])),
            "gt": " ".join(words[half:])}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)


def build_muse_world(out: str | Path, forget: str = "forget01", retain1: str = "retain_perturbed[:40]",
                     retain2: str = "retain_perturbed[40:80]", holdout: str = "holdout01", icl: int = 3,
                     books: bool = False) -> Path:
    """Write the folder (see the module docstring); the arguments are bundled TOFU splits. Returns ``out``.

    Raises:
        ValueError: if a split has no more rows than ``icl`` (no question would be left to ask).
    """
    out = Path(out)
    rows = {name: load_split("bundled", split, ("question", "answer"))
            for name, split in (("forget", forget), ("retain1", retain1), ("retain2", retain2), ("holdout", holdout))}
    for name in ("forget", "retain1"):
        if len(rows[name]) <= icl:
            raise ValueError(f"The {name} split has {len(rows[name])} rows, not more than icl={icl}.")
    docs = {name: [{"text": document(r)} for r in split_rows] for name, split_rows in rows.items()}
    for name, texts in docs.items():
        _write_jsonl(out / "raw" / f"{name}.jsonl", texts)
    retain_qa = "retain2_qa" if books else "retain_qa"
    for name, source in (("forget_qa", "forget"), (retain_qa, "retain1")):
        qa = [{"question": r["question"], "answer": r["answer"]} for r in rows[source]]
        _write_jsonl(out / "knowmem" / f"{name}_icl.jsonl", qa[:icl])
        _write_jsonl(out / "knowmem" / f"{name}.jsonl", qa[icl:])
    _write_jsonl(out / "verbmem" / "forget.jsonl", [verbmem_row(r) for r in rows["forget"]])
    for name, source in (("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout")):
        _write_jsonl(out / "privleak" / f"{name}.jsonl", docs[source])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (files in it are replaced)")
    parser.add_argument("--books", action="store_true", help="name the knowmem retain splits retain2_qa as MUSE-Books")
    parser.add_argument("--icl", type=int, default=3, help="in-context examples per knowmem set")
    args = parser.parse_args(argv)
    print(build_muse_world(args.out, icl=args.icl, books=args.books))


if __name__ == "__main__":
    main()
