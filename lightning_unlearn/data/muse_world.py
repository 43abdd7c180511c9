"""A small folder in MUSE's layout made from the TOFU text shipped with the package (no MUSE text is shipped).

``python -m lightning_unlearn.data.muse_world OUT`` writes ``OUT/<config>/<split>.jsonl`` with MUSE's
configurations, splits and fields (:mod:`.muse_sources`), for tests, the demo and trying the MUSE commands offline:

* ``raw``: ``forget`` the forget authors' rows (TOFU ``forget01``), ``retain1`` the first retain authors'
  (``retain_perturbed[:40]``), ``retain2`` the next ones', ``holdout`` authors no model is trained on
  (``holdout01``). Every ``rows_per_document`` consecutive rows (20: one TOFU author) make one document, each
  row written ``Question: {question}\\nAnswer: {answer}`` and the rows separated by a blank line: knowmem's
  few-shot format, so that a tiny model trained on the corpus alone can answer the knowmem questions (a
  large model learns facts from prose; a tiny one only the sequences it saw).
* ``knowmem``: the same authors' questions and answers; the first ``icl`` rows of each are the in-context
  examples (``forget_qa_icl``, ``retain_qa_icl``), the others the questions asked (``forget_qa``,
  ``retain_qa``; ``retain2_qa*`` with ``--books``, as MUSE-Books names them).
* ``verbmem``: ``forget``, one row per forget row: ``prompt`` the row's question and the first half of its
  answer's words, ``gt`` the forget corpus's next ``gt_words`` words from there (its answer's second half
  and what follows it in the document), as MUSE cuts a prompt and its true continuation from the corpus.
* ``privleak``: ``forget``, ``retain`` and ``holdout``: one text per row of the forget, retain1 and holdout
  authors (members, members, non-members of the training corpus).
* ``sust`` and ``scal``: the forget rows cut into ``folds`` contiguous folds (4, as MUSE-News), each written as
  documents: ``sust/forget_k`` the ``k``-th fold, ``scal/forget_k`` folds ``1..k`` (MUSE's sustainability and
  scalability configurations, :mod:`lightning_unlearn.sequence`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_text
from .rows import Record
from .sources import load_split

ROW = "Question: {question}\nAnswer: {answer}"
SEPARATOR = "\n\n"


def row_text(row: Record) -> str:
    """A TOFU row as text, in knowmem's few-shot format."""
    return ROW.format(question=row["question"], answer=row["answer"])


def documents(rows: Sequence[Record], rows_per_document: int) -> list[str]:
    """Consecutive rows joined into documents of ``rows_per_document`` rows (the last may be shorter)."""
    return [SEPARATOR.join(row_text(r) for r in rows[i : i + rows_per_document])
            for i in range(0, len(rows), rows_per_document)]


def verbmem_rows(rows: Sequence[Record], rows_per_document: int, gt_words: int) -> list[dict[str, str]]:
    """For each row: ``prompt`` its question and its answer's first half of words, ``gt`` the next ``gt_words``
    words of its document (whitespace as in the document)."""
    out = []
    for start in range(0, len(rows), rows_per_document):
        group = rows[start : start + rows_per_document]
        doc = SEPARATOR.join(row_text(r) for r in group)
        offset = 0
        for row in group:
            text = row_text(row)
            answer_at = offset + len(text) - len(row["answer"])
            words = [m.end() for m in re.finditer(r"\S+", doc[answer_at:])]
            half = max(1, len(row["answer"].split()) // 2)
            cut = answer_at + words[half - 1]
            end = answer_at + words[min(half - 1 + gt_words, len(words) - 1)]
            out.append({"prompt": doc[offset:cut], "gt": doc[cut:end].strip()})
            offset += len(text) + len(SEPARATOR)
    return out


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_muse_world(out: str | Path, forget: str = "forget01", retain1: str = "retain_perturbed[:40]",
                     retain2: str = "retain_perturbed[40:80]", holdout: str = "holdout01", icl: int = 3,
                     books: bool = False, rows_per_document: int = 20, gt_words: int = 48,
                     folds: int = 4) -> Path:
    """Write the folder (see the module docstring); the split arguments are bundled TOFU splits. Returns ``out``.

    Raises:
        ValueError: if the forget or retain split has no more rows than ``icl`` (no question would be left).
    """
    out = Path(out)
    rows = {name: load_split("bundled", split, ("question", "answer"))
            for name, split in (("forget", forget), ("retain1", retain1), ("retain2", retain2), ("holdout", holdout))}
    for name in ("forget", "retain1"):
        if len(rows[name]) <= icl:
            raise ValueError(f"The {name} split has {len(rows[name])} rows, not more than icl={icl}.")
    for name, split_rows in rows.items():
        _write_jsonl(out / "raw" / f"{name}.jsonl", [{"text": d} for d in documents(split_rows, rows_per_document)])
    retain_qa = "retain2_qa" if books else "retain_qa"
    for name, source in (("forget_qa", "forget"), (retain_qa, "retain1")):
        qa = [{"question": r["question"], "answer": r["answer"]} for r in rows[source]]
        _write_jsonl(out / "knowmem" / f"{name}_icl.jsonl", qa[:icl])
        _write_jsonl(out / "knowmem" / f"{name}.jsonl", qa[icl:])
    _write_jsonl(out / "verbmem" / "forget.jsonl", verbmem_rows(rows["forget"], rows_per_document, gt_words))
    for name, source in (("forget", "forget"), ("retain", "retain1"), ("holdout", "holdout")):
        _write_jsonl(out / "privleak" / f"{name}.jsonl", [{"text": row_text(r)} for r in rows[source]])
    forget_rows, count = rows["forget"], len(rows["forget"])
    if not 1 <= folds <= count:
        raise ValueError(f"cannot cut the {count} forget rows into {folds} folds (sust/scal).")
    cuts = [round(i * count / folds) for i in range(folds + 1)]
    for k in range(1, folds + 1):
        fold = forget_rows[cuts[k - 1] : cuts[k]]
        _write_jsonl(out / "sust" / f"forget_{k}.jsonl", [{"text": d} for d in documents(fold, rows_per_document)])
        grown = forget_rows[: cuts[k]]
        _write_jsonl(out / "scal" / f"forget_{k}.jsonl", [{"text": d} for d in documents(grown, rows_per_document)])
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
