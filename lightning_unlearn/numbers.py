"""Numbers given by a user (options, manifests, arguments) checked once where they enter, with the place they came from.

A non-finite offset strength does not fail: ``z_L + nan * (z_S - z_S0)`` is NaN everywhere, every score computed
from it is NaN or a tie that a benchmark breaks towards its first choice, and a run ends as if it had succeeded.
So a strength (or a filter threshold, or a loss weight) is refused where it is set, with an error naming the option,
file or argument that set it, rather than where its NaN is finally noticed, if ever.

This module imports nothing of the package, so that every layer (models, offsets, deploy, lm-eval, evaluation) can
use the same check.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["finite", "finite_float", "in_range"]


def finite(value: object, name: str, source: str | None = None) -> float:
    """``value`` as a float, refusing NaN, infinities, booleans and what is not a number.

    Args:
        value: the number as given (a float, an int, or text such as ``"0.5"``).
        name: what it is, e.g. ``"alpha"``.
        source: where it was set, e.g. ``"--model.alpha"`` or a manifest's path; named in the error.

    Raises:
        ValueError: ``value`` is not a finite number; the message names ``name``, ``source`` and the value.
    """
    where = f" ({source})" if source else ""
    number: float | None
    if isinstance(value, bool):  # True would pass as 1.0: almost certainly a misplaced flag
        number = None
    else:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}{where} must be a finite number, got {value!r} (NaN or infinity would make every "
                         "logit and score computed from it NaN or meaningless, without an error).")
    return number


def in_range(value: object, name: str, low: float, high: float, source: str | None = None) -> float:
    """``value`` as a finite float in the closed interval ``[low, high]``.

    Raises:
        ValueError: ``value`` is not finite (see :func:`finite`) or lies outside ``[low, high]``.
    """
    number = finite(value, name, source)
    if not low <= number <= high:
        where = f" ({source})" if source else ""
        raise ValueError(f"{name}{where} must be in [{low:g}, {high:g}], got {number:g}.")
    return number


def finite_float(text: str) -> float:
    """An ``argparse`` ``type`` for strengths: the float in ``text``, refusing ``nan`` and ``inf``.

    argparse prefixes the message with the option (``argument --alpha: ...``), so the error names its source.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a finite number.
    """
    try:
        return finite(text, "value")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
