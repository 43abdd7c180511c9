"""Sphinx configuration: ``make docs`` builds this site into docs/_build/html with warnings as errors."""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import sys
from pathlib import Path

from sphinx.util import logging as sphinx_logging

_logger = sphinx_logging.getLogger(__name__)

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

# Docstrings name sibling modules relatively (:mod:`.sources`). Sphinx resolves such a name by searching every
# module whose name ends with it, so a name that exists in two subpackages (data.sources, offset.sources) is
# ambiguous and fails the build. Each relative target whose first part is a module beside the documented object
# is made absolute here, as Python would resolve it.
_RELATIVE_ROLE = re.compile(r":(mod|class|func|meth|data|attr|exc|obj):`(~?)\.([A-Za-z_][\w.]*)`")


def _package_of(what: str, name: str, obj: object) -> str | None:
    module = name if what == "module" else getattr(obj, "__module__", None) or name.rsplit(".", 1)[0]
    if what == "module" and hasattr(obj, "__path__"):
        return module  # a package's own docstring: its siblings are its submodules
    return module.rpartition(".")[0] or None


def _absolute_refs(app, what, name, obj, options, lines) -> None:
    package = _package_of(what, name, obj)
    if not package:
        return

    def absolute(match: re.Match) -> str:
        role, tilde, target = match.groups()
        first = target.split(".", 1)[0]
        try:
            found = importlib.util.find_spec(f"{package}.{first}") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return match.group(0)
        return f":{role}:`{tilde or '~'}{package}.{target}`"

    lines[:] = [_RELATIVE_ROLE.sub(absolute, line) for line in lines]


def _unresolved_package_ref(app, env, node, contnode) -> None:
    """A cross-reference from a written page (guides, methods...) to this package that finds nothing (a renamed
    module, a misspelt class) fails the build. The API pages are left lenient: docstrings may name private bases,
    type variables and undocumented helpers, and references to other libraries may stay unresolved everywhere."""
    target = node.get("reftarget", "")
    written_page = not str(node.get("refdoc", "")).startswith("api/")
    if node.get("refdomain") == "py" and written_page and target.lstrip("~.").startswith("lightning_unlearn"):
        _logger.warning("reference to %s finds nothing in the package (renamed or moved?)", target, location=node)


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _absolute_refs)
    app.connect("missing-reference", _unresolved_package_ref)
