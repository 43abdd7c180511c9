"""General capability through lm-evaluation-harness: any model the framework makes, evaluated on lm-eval tasks.

* :class:`~.model.UnlearnedLM`: lm-eval's ``LM`` over the combined model (offset, composed, LoRA or direct),
  registered with lm-eval as ``unlearned``; usable with ``lm_eval.simple_evaluate(model=UnlearnedLM(...))``.
* :mod:`.registry`: task lookup, with the package's offline tasks (``tasks/``: ``tofu_general``).
* :mod:`.run`: running tasks and flattening results to ``task/metric`` names.
* :mod:`.hooks`: the same tasks beside the TOFU evaluation in ``fit`` (validation) and ``test``.
* ``python -m lightning_unlearn.lm_eval EXPORT_DIR ... --tasks ...``: the command line (:mod:`.__main__`).

This package is named after the library it wraps; inside it ``import lm_eval`` is the installed library
(absolute imports), which is checked here so that running a script from inside ``lightning_unlearn/`` (which
would put this folder first on ``sys.path``) fails clearly instead of importing itself.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval as _lm_eval

if Path(_lm_eval.__file__).resolve().parent == Path(__file__).resolve().parent:  # pragma: no cover
    raise ImportError("`import lm_eval` found lightning_unlearn/lm_eval instead of lm-evaluation-harness: run from "
                      "the repository root (python -m lightning_unlearn.lm_eval), not from inside lightning_unlearn/.")

from .model import UnlearnedLM  # noqa: E402  (after the check above)

__all__ = ["UnlearnedLM"]
