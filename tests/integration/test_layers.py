"""The package's layers hold: no import runs up the order written in ``lightning_unlearn/__init__.py``, and no
import goes round in a circle, between files or between the packages they belong to.

The imports are read with :mod:`ast` from every file of the package, those inside functions and under
``if TYPE_CHECKING:`` included: a function-level import is still a dependency a reader has to follow (it only runs
later), and an annotation names what it depends on. Nothing is imported to find them, so the test is cheap and a
broken module cannot hide its imports.

A failure names the file and line of each offending import and the rule it breaks; the fix is to move the shared
piece down to a layer both may use, or the importing code up, not to hide the import.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lightning_unlearn"
SOURCE = ROOT / PACKAGE


@dataclass(frozen=True)
class Import:
    """One import in the package: the file and line it stands on, the module that imports, the module imported."""

    path: Path
    line: int
    importer: str
    imported: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files() -> dict[str, Path]:
    """Every module of the package by dotted name (folders of data files that hold Python, e.g. lm-eval's task
    loader, are read too: an import there is an import of the package)."""
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name ``from ... import`` reads from, relative levels resolved against ``module``'s package."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: set[str], source: str | None = None) -> list[Import]:
    """The package-internal imports of one file (its text: ``source``, else read from ``path``), each resolved to
    the deepest module it names: ``from .x import y`` is an import of ``x.y`` when ``y`` is a module, else of ``x``."""
    found = []
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text, filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        for target in targets:
            while target not in modules and "." in target:  # ``import a.b.c`` of a name inside ``a.b``
                target = target.rsplit(".", 1)[0]
            if target in modules and target.split(".")[0] == PACKAGE and target != module:
                found.append(Import(path, node.lineno, module, target))
    return found


def all_imports() -> list[Import]:
    files = package_files()
    return [imp for module, path in files.items() for imp in imports_of(module, path, set(files))]


def unit(module: str) -> str:
    """The layer member a module belongs to: its top-level subpackage or module (``__init__`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def declared_layers() -> list[list[str]]:
    """The layers written in the package docstring, bottom first: ``name [name ...] -- what they hold`` lines
    under ``Layers, from the top down:``."""
    doc = ast.get_docstring(ast.parse((SOURCE / "__init__.py").read_text(encoding="utf-8"))) or ""
    assert "Layers, from the top down:" in doc, "lightning_unlearn/__init__.py's docstring must list the layers"
    block = doc.split("Layers, from the top down:", 1)[1].strip("\n").split("\n\n", 1)[0]
    layers = []
    for line in block.splitlines():
        match = re.fullmatch(r"\s+([\w ]+?) -- .+", line)
        assert match, f"a layer line reads 'name [name ...] -- what they hold', not {line!r}"
        layers.append(match[1].split())
    return layers[::-1]


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph ``edges`` (its nodes in order, the first repeated at the end), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (circle := visit(start)):
            return circle
    return None


def describe_circle(circle: list[str], imports: list[Import], key=lambda name: name) -> str:
    steps = []
    for a, b in zip(circle, circle[1:]):
        first = next(imp for imp in imports if key(imp.importer) == a and key(imp.imported) == b)
        steps.append(f"  {a} -> {b}  ({first.where()} imports {first.imported})")
    return "\n".join(steps)


LAYERS = declared_layers()
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
IMPORTS = all_imports()


def test_the_docstring_lists_each_layer_member_once() -> None:
    names = [name for names in LAYERS for name in names]
    assert len(names) == len(set(names)), f"a name stands in two layers: {names}"


def test_every_package_and_module_has_a_layer() -> None:
    """A new subpackage or top-level module is placed in the order on purpose, not left out of the check."""
    missing = sorted({unit(module) for module in package_files()} - set(LEVEL))
    assert not missing, (f"{missing} stand in no layer: add each to the list in lightning_unlearn/__init__.py's "
                         "docstring, above what it imports and below what imports it")
    unknown = sorted(set(LEVEL) - {unit(module) for module in package_files()})
    assert not unknown, f"the layer list names {unknown}, which are not in lightning_unlearn/"


def test_no_import_runs_up_the_layers() -> None:
    upward = [*dict.fromkeys(f"{imp.where()}: {unit(imp.importer)} (layer {LEVEL[unit(imp.importer)]}) imports "
                             f"{imp.imported} ({unit(imp.imported)}, layer {LEVEL[unit(imp.imported)]})"
                             for imp in IMPORTS
                             if unit(imp.importer) in LEVEL and unit(imp.imported) in LEVEL
                             and LEVEL[unit(imp.imported)] > LEVEL[unit(imp.importer)])]
    assert not upward, ("imports that run up the layers (lightning_unlearn/__init__.py lists them bottom last); move "
                        "what is shared down, or the importer up:\n" + "\n".join(upward))


def test_library_code_never_imports_the_command_line() -> None:
    """Only what runs the training command (the sweep, the demo, the comparison) may import it."""
    above = {name for names in LAYERS[LEVEL["cli"] + 1:] for name in names}
    offending = [*dict.fromkeys(f"{imp.where()}: {imp.importer} imports {imp.imported}" for imp in IMPORTS
                                if unit(imp.imported) == "cli" and unit(imp.importer) not in above | {"cli"})]
    assert not offending, "library code imports the CLI:\n" + "\n".join(offending)


def test_no_circle_between_files() -> None:
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        edges.setdefault(imp.importer, set()).add(imp.imported)
    circle = find_circle(edges)
    assert circle is None, "files that import each other in a circle:\n" + describe_circle(circle, IMPORTS)


def test_no_circle_between_layer_members() -> None:
    """Peers of one layer may import each other one way only; between layers the order already rules circles out."""
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        if unit(imp.importer) != unit(imp.imported):
            edges.setdefault(unit(imp.importer), set()).add(unit(imp.imported))
    circle = find_circle(edges)
    assert circle is None, ("packages that import each other in a circle:\n"
                            + describe_circle(circle, IMPORTS, key=unit))


@pytest.mark.parametrize("source, message", [
    ("from ..cli import main\n", "runs up"),
    ("def f():\n    from ..modules import base\n", "runs up"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..evaluation import tofu\n", "runs up"),
])
def test_the_check_sees_imports_at_every_depth(source: str, message: str) -> None:
    """The reader finds module-level, function-level and type-checking imports, with their line."""
    module = f"{PACKAGE}.data.example"
    found = imports_of(module, SOURCE / "data" / "example.py", set(package_files()) | {module}, source)
    assert [imp.line for imp in found] == [source.count("\n")]
    assert LEVEL[unit(found[0].imported)] > LEVEL[unit(module)], message


def test_the_circle_finder_names_the_loop() -> None:
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "d": {"a"}}) is None
