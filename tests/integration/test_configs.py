"""The paper configs compose: every stack of a benchmark base, the models of a mode and a method resolves to the
configuration of the near-duplicate file it replaced (``tests/fixtures/resolved_configs/``, printed from the old
files before they were deleted), and every base, mode and method config is in a stack its header names.

``python tests/integration/test_configs.py --regenerate`` rewrites the resolved configurations from the stacks:
only for a resolved value meant to change (a new default, a new argument), with the diff reviewed.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_unlearn.cli import main
from paper_configs import CONFIGS, METHODS, ROOT, config_args, header, paper_stacks

RESOLVED = ROOT / "tests" / "fixtures" / "resolved_configs"
SNAPSHOTS = sorted(str(p.relative_to(RESOLVED).with_suffix("")) for p in RESOLVED.rglob("*.yaml"))
STACKS = paper_stacks()


def resolved_text(args: list[str]) -> str:
    """What ``python main.py fit ARGS --print_config=`` prints (without comments)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main(["fit", *args, "--print_config="])
    except SystemExit as done:
        if done.code not in (0, None):
            raise AssertionError(f"{' '.join(args)} does not parse (exit {done.code})") from None
    return out.getvalue()


def resolved(args: list[str]) -> dict[str, Any]:
    return yaml.safe_load(resolved_text(args))


def test_every_replaced_config_has_its_stack() -> None:
    """A stack with no resolved configuration on file is a new one (a method added since): nothing to compare."""
    assert set(SNAPSHOTS) <= set(STACKS)
    assert {"tofu/offset/npo", "tofu/direct/eul", "muse/news/direct/simnpo"} <= set(SNAPSHOTS)


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_stack_resolves_to_the_config_it_replaced(name: str) -> None:
    """Equal as mappings: only the order of keys may differ."""
    expected = yaml.safe_load((RESOLVED / f"{name}.yaml").read_text())
    assert resolved(config_args(STACKS[name])) == expected


def test_every_base_mode_and_method_config_is_in_a_stack() -> None:
    parts = {p for d in ("tofu", "muse", "method") for p in (CONFIGS / d).rglob("*.yaml")}
    assert parts == {p for stack in STACKS.values() for p in stack}


def test_stacks_are_a_base_a_mode_and_a_method() -> None:
    for name, (base, mode, method) in STACKS.items():
        assert base.name == "base.yaml" and mode.stem in {"offset", "direct"} and method.parent == METHODS, name
        assert base.parent.relative_to(CONFIGS).parts[0] == mode.relative_to(CONFIGS).parts[0], name


@pytest.mark.parametrize("path", sorted(p for d in ("tofu", "muse", "method") for p in (CONFIGS / d).rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_part_heads_with_a_command_that_stacks_it(path: Path) -> None:
    """A base or a mode names a full command too, so a reader of any one file sees how it is run."""
    commands = [line for line in header(path) if "python main.py fit --config" in line]
    assert commands and all(str(path.relative_to(ROOT)) in line for line in commands), path


def regenerate() -> None:
    """Rewrite every resolved configuration on file from its stack."""
    for name in SNAPSHOTS:
        path = RESOLVED / f"{name}.yaml"
        path.write_text(resolved_text(config_args(STACKS[name])))
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        raise SystemExit(f"usage: python {Path(__file__).relative_to(ROOT)} --regenerate")
    regenerate()
