"""The paper configs as they are run: a benchmark base, the models of a mode and a method, stacked.

Each method's YAML under ``configs/method/`` heads with the commands that run it
(``python main.py fit --config configs/tofu/base.yaml --config configs/tofu/offset.yaml --config
configs/method/npo.yaml``); the stacks are read from those commands, so a command a header advertises is a
command the tests run. A stack is named after the file it replaced: the mode's path and the method
(``tofu/offset/npo`` was ``configs/tofu/offset/npo.yaml``).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHODS = CONFIGS / "method"
COMMAND = re.compile(r"python main\.py fit((?: --config \S+)+)")


def header(path: Path) -> list[str]:
    """The comment lines at the top of a YAML file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def paper_stacks() -> dict[str, list[Path]]:
    """Every stack the method configs' headers run, by name (``tofu/offset/npo``): config paths, absolute."""
    stacks: dict[str, list[Path]] = {}
    for method in sorted(METHODS.glob("*.yaml")):
        for line in header(method):
            match = COMMAND.search(line)
            if match is None:
                continue
            configs = [ROOT / p for p in match.group(1).split()[1::2]]
            base, mode, last = configs
            name = f"{mode.relative_to(CONFIGS).with_suffix('')}/{last.stem}"
            stacks[name] = configs
    return stacks


def config_args(stack: list[Path]) -> list[str]:
    """``--config A --config B ...`` for a stack."""
    return [arg for path in stack for arg in ("--config", str(path))]


def is_offset(name: str) -> bool:
    """Whether the stack named ``name`` runs in offset mode (the mode is the part before the method)."""
    return name.split("/")[-2] == "offset"
