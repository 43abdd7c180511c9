"""``lightning-unlearn methods``: the methods ``--model`` takes, their other names and the modes they run in."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..modules.registry import all_methods


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Print one line per method (name, aliases, modes); returns the lines."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    width = max(len(m.name) for m in all_methods())
    lines = []
    for method in all_methods():
        modes = "/".join(method.modes) if method.unlearns else "fine-tuning (makes and evaluates models)"
        aliases = f"  also {', '.join(method.aliases)}" if method.aliases else ""
        lines.append(f"{method.name:<{width}}  {modes}{aliases}")
    print("\n".join(lines))
    return lines
