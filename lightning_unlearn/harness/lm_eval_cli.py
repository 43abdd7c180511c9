"""lm-eval's own command line with this package's model: ``lm_eval --model unlearned``.

``python -m lightning_unlearn.harness.lm_eval_cli run --model unlearned --model_args pretrained=runs/npo,alpha=0.5
--tasks tofu_general`` is lm-eval's ``lm_eval`` (its parser, flags, output files and table: ``cli_evaluate``) with
the ``unlearned`` model registered first.

How lm-eval finds a model by name, and why this module exists:

* Packages declare an ``lm_eval.models`` entry point (``setup.cfg``: ``unlearned =
  lightning_unlearn.harness.model:UnlearnedLM``). lm-eval releases that discover installed plugins read that group
  when ``--model`` names a model they do not ship (upstream pull request #4013, after 0.4.13); for them the
  ``lm_eval`` console script finds ``unlearned`` as soon as this package is installed, and imports it only when asked.
* lm-eval 0.4.13 (the release this package is tested with) discovers nothing: its registry holds the models listed in
  its own ``lm_eval/models/__init__.py`` and whatever was registered by an import before ``get_model`` runs, and
  ``--include_path`` adds task YAML only. Its maintainers' answer for a model defined outside lm-eval
  (lm-evaluation-harness issue #1621) is to import it before calling ``cli_evaluate``: that is this module.

The package's offline tasks (``tofu_general``) are added with ``--include_path`` when the command gives none.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .registry import LOCAL_TASKS

__all__ = ["MODEL_NAME", "MODEL_TARGET", "main", "register"]

MODEL_NAME = "unlearned"
MODEL_TARGET = "lightning_unlearn.harness.model:UnlearnedLM"
"""The ``lm_eval.models`` entry point's value in ``setup.cfg``; lm-eval imports it only when the model is asked for."""


def register() -> None:
    """Register ``unlearned`` with lm-eval's model registry as a lazy ``module:Class`` placeholder (torch and the
    model code load only when ``--model unlearned`` is used); a no-op when it is registered already."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line (``argv``: its arguments, default ``sys.argv[1:]``) with ``unlearned`` registered
    and the package's task folder included unless ``--include_path`` is given."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and not any(a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(LOCAL_TASKS)]
    register()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
