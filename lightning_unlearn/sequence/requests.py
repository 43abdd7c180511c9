"""Deletion requests: the forget data of each request in a sequence, and which evaluation samples belong to it.

A sequence config names its requests in one of three ways (``requests:`` in ``configs/sequence/*.yaml``):

.. code-block:: yaml

    requests: {folds: forget01, count: 3}                        # disjoint folds of one forget split (TOFU)
    requests: {nested: [forget01, forget05, forget10]}           # growing sets, each holding the one before
    requests: {splits: [sust/forget_1, sust/forget_2, sust/forget_3, sust/forget_4]}   # disjoint named splits

``folds`` cuts the split's rows into ``count`` contiguous folds of (nearly) equal size, ``forget01[0:13]``,
``forget01[13:27]``...; contiguous, so that a TOFU fold holds whole authors where the count allows it and the union
of the first ``k`` folds is one slice. ``nested`` is TOFU's forget01 within forget05 within forget10 and MUSE's
``scal`` configuration (``scal/forget_1`` within ``scal/forget_2``...): request ``k`` asks to forget its whole split,
of which only the rows the previous one lacked are new. ``splits`` are disjoint named splits, as MUSE's ``sust``
configuration (four folds of MUSE-News's forget corpus, requested one after the other).

The *union of the first k requests* is what the all-at-once reference trains on: a slice for folds, the ``k``-th
split for nested requests, the list of the ``k`` splits otherwise (the data module concatenates a list).

For question/answer data the evaluation's forget set (``eval_forget_split``) holds every request's rows; each
request's samples in it are found by question (:func:`fold_indices`), so that its answers can be scored apart:
forgotten once requested, kept until then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Request", "Requests", "fold_bounds", "fold_indices", "parse_requests"]

KINDS = ("folds", "nested", "splits")


@dataclass(frozen=True)
class Request:
    """One deletion request: its 1-based ``index``, the ``split`` its forget data is (``name[a:b]`` for a fold)."""

    index: int
    split: str

    @property
    def name(self) -> str:
        return f"request {self.index} ({self.split})"


@dataclass(frozen=True)
class Requests:
    """The requests of a sequence, in order, and how they relate (``kind``: ``folds``, ``nested`` or ``splits``).

    ``source`` is the split the folds are cut from (``folds``), else None.
    """

    kind: str
    items: tuple[Request, ...]
    source: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def union(self, k: int) -> str | list[str]:
        """The forget data of the first ``k`` requests as one ``data.forget_split`` value.

        Raises:
            ValueError: ``k`` outside 1..len.
        """
        if not 1 <= k <= len(self.items):
            raise ValueError(f"the union of the first {k} requests: there are {len(self.items)} (1..{len(self.items)}).")
        if self.kind == "nested":
            return self.items[k - 1].split
        if self.kind == "folds":
            stop = self.items[k - 1].split.rpartition(":")[2].rstrip("]")
            return f"{self.source}[0:{stop}]"
        return [r.split for r in self.items[:k]] if k > 1 else self.items[0].split

    def eval_forget_split(self) -> str | None:
        """The TOFU forget evaluation split holding every request's rows (``<split>_perturbed`` of the source split,
        of the largest nested split), or None where the requests are not TOFU's ``forgetXX`` splits."""
        base = self.source if self.kind == "folds" else self.items[-1].split
        name = base.partition("[")[0]
        return f"{name}_perturbed" if name.startswith("forget") and "/" not in name else None

    def eval_holdout_split(self) -> str | None:
        """``holdoutXX`` matching :meth:`eval_forget_split`'s ``forgetXX`` (membership inference), or None."""
        forget = self.eval_forget_split()
        if forget is None:
            return None
        digits = "".join(ch for ch in forget.partition("_")[0] if ch.isdigit())
        return f"holdout{digits}" if digits else None

    def new_rows(self, k: int) -> str:
        """The split whose rows request ``k`` adds (for nested requests the whole split; the previous one's rows are
        removed by :func:`fold_indices`)."""
        return self.items[k - 1].split


def fold_bounds(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ``[start, stop)`` row ranges covering ``n`` rows, sizes differing by at most one.

    Raises:
        ValueError: ``count`` below 1 or above ``n``.
    """
    if not 1 <= count <= n:
        raise ValueError(f"cannot cut {n} rows into {count} folds: give requests.count between 1 and {n}.")
    cuts = [round(i * n / count) for i in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def parse_requests(raw: Any, count_rows: Any, where: str = "requests") -> Requests:
    """The requests of a sequence config's ``requests`` entry (see the module docstring).

    ``count_rows(split) -> int`` gives a split's number of rows (for ``folds``; read from the dataset).

    Raises:
        ValueError: not exactly one of ``folds``, ``nested``, ``splits``; fewer than one request; a bad count;
            a nested or split entry that is not a list of split names.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping with one of {list(KINDS)}, e.g. "
                         "{folds: forget01, count: 3}; got " + repr(raw))
    kinds = [k for k in KINDS if k in raw]
    extra = sorted(set(raw) - set(KINDS) - {"count"})
    if len(kinds) != 1 or extra:
        raise ValueError(f"{where} takes exactly one of {list(KINDS)} (folds with a count); got {sorted(raw)}.")
    kind = kinds[0]
    if kind == "folds":
        source, count = raw["folds"], raw.get("count")
        if not isinstance(source, str) or not isinstance(count, int) or isinstance(count, bool):
            raise ValueError(f"{where}: folds takes a split name and count an integer, e.g. "
                             f"{{folds: forget01, count: 3}}; got folds={source!r}, count={count!r}.")
        bounds = fold_bounds(int(count_rows(source)), count)
        items = tuple(Request(i + 1, f"{source}[{a}:{b}]") for i, (a, b) in enumerate(bounds))
        return Requests(kind, items, source)
    if "count" in raw:
        raise ValueError(f"{where}: count goes with folds, not {kind}.")
    splits = raw[kind]
    if not isinstance(splits, Sequence) or isinstance(splits, str) or not splits \
            or not all(isinstance(s, str) and s for s in splits):
        raise ValueError(f"{where}: {kind} takes a non-empty list of split names; got {splits!r}.")
    if len(set(splits)) != len(splits):
        raise ValueError(f"{where}: {kind} names a split twice: {list(splits)}.")
    return Requests(kind, tuple(Request(i + 1, s) for i, s in enumerate(splits)))


def fold_indices(requests: Requests, eval_questions: Sequence[str], request_questions: Sequence[Sequence[str]],
                 ) -> list[list[int]]:
    """For each request, the indices of the evaluation forget set's samples it asks to forget (new to it).

    ``eval_questions``: the evaluation forget split's questions in order (sample ``i`` is row ``i``, the index the
    evaluation's per-sample report keys by); ``request_questions[k]``: the questions of request ``k + 1``'s split.
    A sample belongs to the first request whose split holds its question (nested requests: the rows added).

    Raises:
        ValueError: a request none of whose questions is in the evaluation set (a wrong ``eval_forget_split``).
    """
    owner: dict[str, int] = {}
    for k, questions in enumerate(request_questions):
        for q in questions:
            owner.setdefault(q, k)
    folds: list[list[int]] = [[] for _ in request_questions]
    for i, q in enumerate(eval_questions):
        if q in owner:
            folds[owner[q]].append(i)
    empty = [requests.items[k].split for k, f in enumerate(folds) if not f]
    if empty:
        raise ValueError(f"no sample of the forget evaluation set belongs to {empty}: data.eval_forget_split must "
                         "hold every request's questions (e.g. forget10_perturbed for forget01..forget10), and "
                         "data.eval_subset must not cut it.")
    return folds
