"""The one list of methods: what ``--model`` takes, read from the classes themselves.

Each concrete :class:`~.base.UnlearnModule` exported by :mod:`lightning_unlearn.modules` is a method; the class
declares its other names (``aliases``: open-unlearning's ``GradAscent``, ``IdkDPO``, ``CE-U``...), the modes it runs
in (``modes``: offset, direct) and whether it unlearns (``unlearns``: ``SFT`` fine-tunes the models that are later
unlearned). Help texts, the demo, the comparison and the tests read this registry, so a new method is its class
(exported by the package) and nothing else here.

Names match without regard to case, ``-`` or ``_`` (``npo``, ``gradascent``, ``CE_U``); an unknown name is answered
with the closest valid ones (:func:`unknown_method`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from .base import Mode, UnlearnModule

__all__ = ["Method", "UnknownMethod", "all_methods", "method_names", "methods_without_parts", "resolve", "unknown_method", "unlearning_methods"]


@dataclass(frozen=True)
class Method:
    """One method: its class (whose name is the canonical one), the other names it answers to, its modes."""

    cls: type[UnlearnModule]
    aliases: tuple[str, ...]
    modes: tuple[Mode, ...]
    unlearns: bool

    @property
    def name(self) -> str:
        return self.cls.__name__

    def label(self) -> str:
        """``GA (GradAscent)``: the name and its aliases, as help texts list them."""
        return f"{self.name} ({', '.join(self.aliases)})" if self.aliases else self.name


class UnknownMethod(ValueError):
    """A ``--model`` name no method answers to; the message names the closest valid ones and the list."""


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


@cache
def all_methods() -> tuple[Method, ...]:
    """Every method ``--model`` takes, in the package's order, SFT included."""
    from .. import modules

    found = []
    for name in modules.__all__:
        cls = getattr(modules, name)
        if inspect.isclass(cls) and issubclass(cls, UnlearnModule) and cls is not UnlearnModule:
            # aliases are the class's own: a subclass (KL of GA) does not answer to its parent's other names
            found.append(Method(cls, tuple(cls.__dict__.get("aliases", ())), tuple(cls.modes), bool(cls.unlearns)))
    return tuple(found)


def unlearning_methods(mode: Mode | None = None) -> list[Method]:
    """The methods that unlearn (all but SFT), those that run in ``mode`` if given."""
    return [m for m in all_methods() if m.unlearns and (mode is None or mode in m.modes)]


def methods_without_parts(parts: Iterable[str]) -> list[Method]:
    """The unlearning methods whose training items carry none of ``parts`` (e.g. the parts that need questions:
    these methods run on raw text)."""
    return [m for m in unlearning_methods() if not set(m.cls.extra_parts) & set(parts)]


def method_names(unlearning_only: bool = True) -> list[str]:
    """The canonical names, in the package's order."""
    return [m.name for m in (unlearning_methods() if unlearning_only else all_methods())]


@cache
def _by_key() -> dict[str, Method]:
    table: dict[str, Method] = {}
    for method in all_methods():
        for name in (method.name, *method.aliases):
            if table.setdefault(_key(name), method) is not method:
                raise RuntimeError(f"Two methods answer to {name!r}: {table[_key(name)].name} and {method.name}.")
    return table


def resolve(name: str) -> Method:
    """The method ``name`` names (its class name or an alias, in any case).

    Raises:
        UnknownMethod: no method answers to ``name``; the message lists the closest ones and all of them.
    """
    method = _by_key().get(_key(name))
    if method is None:
        raise UnknownMethod(unknown_method(name))
    return method


def unknown_method(name: str, flag: str = "--model") -> str:
    """A few lines for an unknown method name: the closest valid names (by spelling) and the full list."""
    spellings = {n: m for m in all_methods() for n in (m.name, *m.aliases)}
    lowered = {n.lower(): n for n in spellings}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    suggestions = list(dict.fromkeys(spellings[lowered[c]].name for c in close))
    lines = [f"{flag} {name}: no method has this name."]
    if suggestions:
        lines.append(f"Did you mean {' or '.join(suggestions)}?")
    lines.append("Methods (names and aliases match in any case): "
                 + ", ".join(m.label() for m in all_methods()) + ".")
    return "\n".join(lines)
