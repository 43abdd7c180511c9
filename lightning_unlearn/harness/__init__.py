"""General capability through lm-evaluation-harness: any model the framework makes, evaluated on lm-eval tasks.

* :class:`~.model.UnlearnedLM`: lm-eval's ``LM`` over the combined model (offset, composed, LoRA or direct),
  registered with lm-eval as ``unlearned``; usable with ``lm_eval.simple_evaluate(model=UnlearnedLM(...))``.
* :mod:`.registry`: task lookup, with the package's offline tasks (``tasks/``: ``tofu_general``).
* :mod:`.run`: running tasks and flattening results to ``task/metric`` names.
* :mod:`.hooks`: the same tasks beside the TOFU evaluation in ``fit`` (validation) and ``test``.
* ``python -m lightning_unlearn.harness EXPORT_DIR ... --tasks ...``: the command line (:mod:`.__main__`).
* :mod:`.lm_eval_cli`: lm-eval's own command line with ``--model unlearned`` (and the ``lm_eval.models`` entry point
  for lm-eval releases that discover installed models).

Named ``harness`` (for lm-evaluation-harness), not ``lm_eval``: a package of the library's own name would
shadow it wherever ``lightning_unlearn/`` stands first on ``sys.path``. Users meet lm-eval's names: the model is
registered as ``unlearned`` (``--model unlearned``) and the offline task as ``tofu_general``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UnlearnedLM"]


def __getattr__(name: str) -> Any:
    # Lazy: the training modules import :mod:`.hooks` from here, and lm-eval (a second or two to import) is
    # loaded only when a run asks for lm-eval tasks.
    if name == "UnlearnedLM":
        from .model import UnlearnedLM

        return UnlearnedLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
