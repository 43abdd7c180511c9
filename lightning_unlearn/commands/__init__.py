"""The one command: ``lightning-unlearn SUBCOMMAND ...`` (also ``python main.py SUBCOMMAND ...``).

``fit``, ``validate``, ``test`` and ``predict`` are Lightning's (:mod:`lightning_unlearn.cli`); the others are small
tools on exports, plans and worlds, each a ``main(argv)``: here (``export``, ``generate``, ``memory``, ``fuse``,
``methods``) or in the module that owns the work (``lm-eval``, ``compare``, ``demo``...). This package sits above every
other: it imports each subcommand's module only when that subcommand runs (``--help`` imports none of them), and no
library module imports it (``tests/integration/test_command.py`` checks).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROG = "lightning-unlearn"
TRACEBACK_ENV = "LIGHTNING_UNLEARN_TRACEBACK"
"""Set to 1 to see the traceback of an expected error instead of its few lines (see :func:`main`)."""


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: the module and function that run it, the arguments put before the user's, one line of help."""

    target: str
    summary: str
    prefix: tuple[str, ...] = ()

    def function(self) -> Callable[[list[str]], Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


LIGHTNING = "lightning_unlearn.cli:main"
SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(LIGHTNING, "train: unlearn with a method (--model NPO), or fine-tune (--model SFT)", ("fit",)),
    "validate": Subcommand(LIGHTNING, "one validation pass (the unlearning's per-epoch evaluation)", ("validate",)),
    "test": Subcommand(LIGHTNING, "evaluate a model or a checkpoint (TOFU, MUSE, lm-eval tasks)", ("test",)),
    "predict": Subcommand(LIGHTNING, "Lightning's predict loop", ("predict",)),
    "export": Subcommand("lightning_unlearn.commands.export:main",
                         "turn a fit checkpoint into an export folder that generate and lm-eval read"),
    "generate": Subcommand("lightning_unlearn.commands.generate:main", "answer questions with one or more exports"),
    "serve": Subcommand("lightning_unlearn.commands.serve:main",
                        "serve exports with vLLM's OpenAI-compatible server, the offset inside the engine"),
    "lm-eval": Subcommand("lightning_unlearn.harness.__main__:main",
                          "evaluate exports (or any Hugging Face model) with lm-evaluation-harness"),
    "attack": Subcommand("lightning_unlearn.commands.attack:main",
                         "attack an unlearned model: relearn, quantize (int8, 4-bit), membership inference"),
    "compare": Subcommand("lightning_unlearn.compare.main:main", "the offset vs direct table of several methods"),
    "sequence": Subcommand("lightning_unlearn.sequence.main:main",
                           "a stream of deletion requests: continue, compose, fuse and all-at-once, request by request"),
    "memory": Subcommand("lightning_unlearn.commands.memory:main",
                         "print a run's memory plan from model configs, without loading weights"),
    "fuse": Subcommand("lightning_unlearn.commands.fuse:main",
                       "fuse the EUL unlearning layers of several deletion requests"),
    "methods": Subcommand("lightning_unlearn.commands.methods:main", "list the methods, their aliases and modes"),
    "demo": Subcommand("lightning_unlearn.demo:main", "the tiny offline TOFU pipeline, from init to the table"),
    "tiny": Subcommand("lightning_unlearn.models.tiny:main", "a tokenizer and two tiny random models, offline"),
    "families": Subcommand("lightning_unlearn.models.families:main",
                           "a tiny large/small pair in one model family's chat format"),
    "muse-world": Subcommand("lightning_unlearn.data.muse_world:main", "a small folder in MUSE's layout, from TOFU"),
    "references": Subcommand("lightning_unlearn.evaluation.references:main",
                             "open-unlearning's retain-model log for forget quality, cached"),
}
"""Every subcommand, in the order ``--help`` lists them; a new one is one entry here."""


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: {PROG} SUBCOMMAND [ARGS ...]   ({PROG} SUBCOMMAND --help for its arguments)", "",
             "Offset (delta) unlearning of LLMs and white-box baselines.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    lines += ["", f"A mistake in the arguments (a wrong split, a missing model or file) prints what to change; "
              f"{TRACEBACK_ENV}=1 shows its traceback."]
    return "\n".join(lines) + "\n"


def own_error(err: BaseException) -> BaseException | None:
    """The first ``ValueError`` or ``FileNotFoundError`` in ``err``'s chain raised by this package's own code (its
    checks of arguments, paths and files), or None: an error raised elsewhere is not one the user is expected to fix
    from its message alone."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    seen: BaseException | None = err
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        if (isinstance(seen, (ValueError, FileNotFoundError)) and frames
                and os.path.abspath(frames[-1].filename).startswith(package)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _run(function: Callable[[list[str] | None], Any], args: list[str] | None, name: str, short: bool) -> Any:
    """``function(args)``; with ``short`` (a command line, not an in-process call) an expected error of this
    package ends the process with its message and exit status 2 instead of a traceback, unless
    :data:`TRACEBACK_ENV` is set."""
    if not short or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return function(args)
    try:
        return function(args)
    except (ValueError, FileNotFoundError) as err:
        own = own_error(err)
        if own is None:
            raise
        sys.stderr.write(f"{PROG} {name}: error: {own}\n({TRACEBACK_ENV}=1 shows the traceback.)\n")
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``argv`` (``sys.argv[1:]`` if None): its first word picks the subcommand, the rest are its own arguments.

    Returns what the subcommand's function returns (the LightningCLI for ``fit``/``test``, the answers for
    ``generate``...), so tests and notebooks can drive it in-process. From the command line (``argv`` None) an
    expected error (a ``ValueError`` or ``FileNotFoundError`` of this package's checks: a wrong split, a missing
    model) prints its message, which names the flag or file to change, and exits with status 2; set
    ``LIGHTNING_UNLEARN_TRACEBACK=1`` for the traceback. In-process, the exception is raised as it is.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        if not args:
            raise SystemExit(2)
        return None
    name, rest = args[0], args[1:]
    subcommand = SUBCOMMANDS.get(name)
    if subcommand is None:
        import difflib

        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        sys.stderr.write(f"{PROG}: unknown subcommand {name!r}.{hint}\n{usage()}")
        raise SystemExit(2)
    function = subcommand.function()
    short = argv is None  # in-process callers (tests, notebooks) get the exception itself
    if subcommand.target == LIGHTNING:  # the LightningCLI reads the subcommand itself; None: the real sys.argv
        return _run(function, [*subcommand.prefix, *rest] if argv is not None else None, name, short)
    program = sys.argv[0]
    sys.argv[0] = f"{PROG} {name}"  # argparse names the program after it: "lightning-unlearn memory: error ..."
    try:
        return _run(function, [*subcommand.prefix, *rest], name, short)
    finally:
        sys.argv[0] = program
