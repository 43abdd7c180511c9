"""Import the parts of torchmetrics, NLTK and SciPy's optimizers that are used without their whole packages.

Every command pays for its imports before it does anything, and three third-party packages import far more
than they are used for here (CPU times on the shared 2-vCPU machine, under load):

* Lightning imports ``torchmetrics`` (for ``Metric`` and ``MetricCollection``), whose ``__init__`` imports every
  metric of every domain, ``torchmetrics.functional`` with its text metrics (transformers), audio (SciPy's
  signal processing) and image metrics: about 2 s of CPU of which Lightning and this package need the two
  classes (about 0.5 s, matplotlib included, which ``torchmetrics.metric`` imports for its plots).
* ``rouge_score`` (TOFU's and MUSE's ROUGE) imports ``nltk``, whose ``__init__`` imports all of NLTK, scikit-learn
  and pandas with it, to stem words with NLTK's Porter stemmer: about 1 s of CPU for one module.
* transformers' model code imports ``scipy.optimize`` (all of SciPy's optimizers) for one function,
  ``linear_sum_assignment``, in the loss of its object-detection models: about 0.5 s of CPU.

:func:`defer_package_init` registers such a package with its ``__init__`` not yet run: its submodules import
as usual (``torchmetrics.metric``, ``nltk.stem.porter``), a name that is a submodule is imported when it is
asked for, and any other name runs the package's own ``__init__`` first, so a caller that needs the whole
package (``torchmetrics.Accuracy``, ``nltk.sent_tokenize``) still gets it, only later. What is lost until then:
the compatibility patches those ``__init__`` files apply to other libraries (``numpy.Inf``, ``PIL.PILLOW_VERSION``,
``scipy.signal.hamming``), which only their own metrics need. A package already imported is left as it is,
and any error while preparing a deferred package puts the ordinary import back.

:func:`collector_paused` keeps the garbage collector out of the imports of :mod:`lightning_unlearn.cli`.

``lightning_unlearn/__init__.py`` defers all three, so every entry point (``main.py``, the demo, the compare and
sweep commands) starts without them; ``tests/integration/test_import_diet.py`` checks what
``import lightning_unlearn.cli`` leaves out.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["collector_paused", "defer_nltk", "defer_package_init", "defer_scipy_optimize", "defer_torchmetrics",
           "is_deferred"]

_DEFERRED: dict[str, Callable[[], None]] = {}


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block (imports), as it was before afterwards.

    Importing torch, transformers and Lightning creates some 700,000 objects; the collector's passes triggered by
    those allocations walked them again and again (about 0.8 s of CPU, a sixth of the import) and found some
    12,000 objects of import-time garbage to free, which the next collection after the block frees instead.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def is_deferred(name: str) -> bool:
    """Whether package ``name`` is registered here and its own ``__init__`` has not run yet."""
    return name in _DEFERRED


def defer_package_init(
    name: str,
    prepare: Callable[[ModuleType], Callable[[], None] | None] | None = None,
    exports: dict[str, Callable[[], object]] | None = None,
) -> bool:
    """Register package ``name`` in ``sys.modules`` without running its ``__init__`` (see the module docstring).

    ``prepare`` sets what the package's own submodules read from it (cheaply: it runs at once) and may return a
    function undoing what the package's ``__init__`` would then do twice, run just before it. ``exports`` gives
    the names users import from the package itself, each made by its function on first use (a failure there
    runs the whole ``__init__`` instead). Returns whether the package is now deferred: not when it is already
    imported, not installed, not a package, or when ``prepare`` fails (the ordinary import then applies).
    """
    if name in sys.modules:
        return False
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return False
    module = importlib.util.module_from_spec(spec)
    lock = threading.RLock()
    undo: list[Callable[[], None]] = []
    exports = dict(exports or {})

    def load() -> None:
        with lock:
            if _DEFERRED.pop(name, None) is None:
                return
            module.__dict__.pop("__getattr__", None)
            for step in undo:
                step()
            spec.loader.exec_module(module)

    def __getattr__(attr: str) -> object:
        if attr in exports and name in _DEFERRED:
            try:
                value = exports[attr]()
            except Exception:
                load()
            else:
                setattr(module, attr, value)
                return value
        elif importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        load()
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    sys.modules[name] = module
    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    _DEFERRED[name] = load
    try:
        done = prepare(module) if prepare is not None else None
    except Exception:
        _DEFERRED.pop(name, None)
        del sys.modules[name]
        return False
    if done is not None:
        undo.append(done)
    return True


def _torchmetrics_top(module: ModuleType) -> Callable[[], None]:
    """What torchmetrics' submodules read from its top (the logger, set up as its ``__init__`` does, so that its
    messages print, and the version); returns the removal of the log handler the ``__init__`` adds again."""
    logger = logging.getLogger("torchmetrics")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    module._logger = logger
    module._PACKAGE_ROOT = os.path.dirname(module.__file__)
    module._PROJECT_ROOT = os.path.dirname(module._PACKAGE_ROOT)
    about = importlib.import_module("torchmetrics.__about__")
    for key in about.__all__:
        setattr(module, key, getattr(about, key))
    return lambda: logger.removeHandler(handler)


def _torchmetrics_class(submodule: str, attr: str) -> Callable[[], object]:
    def make() -> object:
        importlib.import_module("torchmetrics.utilities")  # first: it and torchmetrics.metric import each other
        return getattr(importlib.import_module(f"torchmetrics.{submodule}"), attr)

    return make


def defer_torchmetrics() -> bool:
    """Defer torchmetrics' ``__init__``: ``Metric`` and ``MetricCollection`` (what Lightning imports from it) are
    imported alone when first asked for."""
    return defer_package_init("torchmetrics", _torchmetrics_top, {
        "Metric": _torchmetrics_class("metric", "Metric"),
        "MetricCollection": _torchmetrics_class("collections", "MetricCollection"),
    })


def defer_nltk() -> bool:
    """Defer ``nltk`` and ``nltk.stem``, so that ``rouge_score`` loads only the Porter stemmer it uses."""
    if not defer_package_init("nltk"):
        return False
    defer_package_init("nltk.stem")
    return True


def defer_scipy_optimize() -> bool:
    """Defer ``scipy.optimize``'s ``__init__``: ``linear_sum_assignment`` (what transformers imports from it) comes
    from its compiled module alone."""
    return defer_package_init("scipy.optimize", exports={
        "linear_sum_assignment": lambda: importlib.import_module("scipy.optimize._lsap").linear_sum_assignment,
    })
