"""Sphinx configuration: ``make docs`` builds this site into docs/_build/html with warnings as errors."""

from __future__ import annotations

import os
import pkgutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
# Importing the package for autodoc must not reach the network nor start W&B.
for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)

project = "lightning-unlearn"
author = "the lightning-unlearn authors"
copyright = "the lightning-unlearn authors, MIT licence"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "lightning-unlearn"

# The API reference: one page per module of the package, generated from the docstrings. The module list is
# written at build time (api/modules.rst, not committed), so a new module appears without editing the docs.
# ``__main__`` modules run their command when imported and are left out (their commands are in the guides).
autosummary_generate = True
# ignore-module-all: a package that re-exports names in __all__ would describe them a second time.
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource",
                           "ignore-module-all": True}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes as fields of their class: a NamedTuple's would otherwise be described twice.
napoleon_use_ivar = True
# Methods overridden without a docstring (Lightning hooks) would inherit Lightning's, written for its own site.
autodoc_inherit_docstrings = False


def _public_modules() -> list[str]:
    import lightning_unlearn

    names = ["lightning_unlearn"]
    for info in pkgutil.walk_packages(lightning_unlearn.__path__, "lightning_unlearn."):
        if info.name.rsplit(".", 1)[-1] == "__main__" or ".tasks" in info.name:
            continue
        names.append(info.name)
    return sorted(names)


def _write_module_list() -> None:
    lines = [
        ".. This file is written by docs/conf.py at every build; edit conf.py, not this file.",
        "",
        "Modules",
        "=======",
        "",
        ".. autosummary::",
        "   :toctree: generated",
        "",
    ]
    lines += [f"   {name}" for name in _public_modules()]
    target = DOCS / "api" / "modules.rst"
    text = "\n".join(lines) + "\n"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


_write_module_list()
