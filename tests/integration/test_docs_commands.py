"""Every shell block of the README and of ``docs/**/*.md`` runs, in a tiny world, so a documented command cannot break
without a test failing (issue 25, item 2).

A block is a fenced block without a language or marked ``bash``/``sh`` (MyST directives such as ``{toctree}``,
Python and BibTeX blocks are not shell). It runs as ``bash -e`` from a folder that looks like a checkout (``main.py``,
``configs/``, ``tests/``, ``benchmarks/``) and holds a prepared ``runs/`` (the tiny pair ``runs/tiny``, a trained
checkpoint ``runs/ckpt/npo.ckpt``, exports ``runs/npo``, ``runs/request1``, ``runs/request2``, a config
``runs/tiny.yaml``), with ``python`` and ``lightning-unlearn`` on the ``PATH`` and one thread.

An HTML comment on the line before a block's fence, invisible on the rendered page and visible in its source, says
how the block runs in this world; several are separated by ``;;``:

* ``<!-- doc-test: skip: REASON -->`` it does not run here (real hub models, GPUs, a server, an install);
* ``<!-- doc-test: where: NAME=VALUE, NAME=VALUE -->`` each placeholder word NAME (``CKPT``, ``CONFIG``...) stands for
  VALUE;
* ``<!-- doc-test: append: ARGS -->`` ARGS are added to each ``fit``/``test``/``validate`` command (fast settings:
  ``--trainer.fast_dev_run 1``);
* ``<!-- doc-test: parse-only -->`` each ``fit``/``test`` command gets ``--print_config``: its configs and flags are
  parsed and checked, nothing is trained (the paper configs name real hub models).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL = ("", "bash", "sh", "shell", "console")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
DIRECTIVE = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->\s*$", re.S)
LIGHTNING_COMMAND = re.compile(r"(main\.py|lightning-unlearn)\s+(fit|test|validate)\b")
MAX_SKIPS = 24
"""Blocks that cannot run here are few (installs, servers, GPUs, hour-long protocols); a new skip past this count
needs a look at why."""


@dataclass
class Block:
    """One shell block: where it is, its text, and its directives."""

    source: str
    line: int
    text: str
    skip: str | None = None
    where: dict[str, str] = field(default_factory=dict)
    append: str = ""
    parse_only: bool = False

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"

    def script(self) -> str:
        """The block as it runs here: continuation lines joined, placeholders replaced, fast settings added."""
        lines = []
        for line in self.text.replace("\\\n", " ").splitlines():
            for name, value in self.where.items():
                line = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w-])", value, line)
            if LIGHTNING_COMMAND.search(line) and (self.append or self.parse_only):
                command, comment = re.match(r"(.*?)(\s+#\s.*)?$", line).groups()
                extra = " ".join(x for x in (self.append, "--print_config" if self.parse_only else "") if x)
                line = f"{command} {extra}{comment or ''}"
            lines.append(line)
        return "\n".join(lines) + "\n"


def parse_directives(comment: str, block: Block) -> None:
    """Apply the ``doc-test:`` comment's directives to ``block``.

    Raises:
        ValueError: an unknown directive, a skip without a reason or a ``where`` entry without ``=``.
    """
    for part in (p.strip() for p in comment.split(";;") if p.strip()):
        name, _, value = part.partition(":")
        name, value = name.strip(), value.strip()
        if name == "skip":
            if not value:
                raise ValueError(f"{block.id}: a skip needs a reason")
            block.skip = value
        elif name == "where":
            for entry in (e.strip() for e in value.split(",") if e.strip()):
                key, eq, val = entry.partition("=")
                if not eq:
                    raise ValueError(f"{block.id}: where entry {entry!r} is not NAME=VALUE")
                block.where[key.strip()] = val.strip()
        elif name == "append":
            block.append = value
        elif name == "parse-only":
            block.parse_only = True
        else:
            raise ValueError(f"{block.id}: unknown doc-test directive {name!r}")


def shell_blocks(path: Path) -> list[Block]:
    """The shell blocks of one Markdown file, with the directives of the comment right above each fence."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        info = match.group(1).strip()
        if info.startswith("{") or (info.split()[0] if info else "") not in SHELL:  # {toctree}, python, bibtex
            continue
        line = text.count("\n", 0, match.start()) + 1
        block = Block(str(path.relative_to(ROOT)), line, match.group(2))
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        directive = DIRECTIVE.search(above)
        if directive:
            parse_directives(directive.group(1), block)
        blocks.append(block)
    return blocks


def documented_blocks() -> list[Block]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [b for f in files if "_build" not in f.parts for b in shell_blocks(f)]


BLOCKS = documented_blocks()


def test_the_blocks_are_found_and_skips_are_few_and_explained() -> None:
    """The extraction finds the documented commands (a broken pattern would find none and every test would pass),
    and each skip says why."""
    ids = {b.id for b in BLOCKS}
    assert len(BLOCKS) >= 20 and any(i.startswith("README.md") for i in ids)
    assert not any(b.text.lstrip().startswith(":") for b in BLOCKS), "MyST directive blocks are not shell"
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= MAX_SKIPS, [b.id for b in skipped]
    assert sum(not b.skip for b in BLOCKS) >= 15


def test_directives_apply_to_commands_only() -> None:
    block = Block("x.md", 1, "python main.py test --config CONFIG \\\n  --ckpt_path CKPT   # the evaluation\n"
                             "python -m lightning_unlearn.sweep --config CONFIG\n")
    parse_directives("where: CONFIG=runs/a.yaml, CKPT=runs/b.ckpt ;; append: --trainer.fast_dev_run 1", block)
    assert block.script() == ("python main.py test --config runs/a.yaml    --ckpt_path runs/b.ckpt "
                              "--trainer.fast_dev_run 1   # the evaluation\n"
                              "python -m lightning_unlearn.sweep --config runs/a.yaml\n")
    with pytest.raises(ValueError, match="needs a reason"):
        parse_directives("skip:", Block("x.md", 2, ""))
    with pytest.raises(ValueError, match="unknown"):
        parse_directives("skipp: no", Block("x.md", 3, ""))


TINY_CONFIG = """\
# The documented commands' CONFIG in the tiny world: NPO offset on the tiny pair, a few steps, TOFU evaluated on
# two samples per set with short answers.
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
model:
  class_path: lightning_unlearn.modules.NPO
  init_args:
    large_model: runs/tiny/large
    small_model: runs/tiny/small
    max_new_tokens: 8
data:
  forget_split: forget01
  retain_split: retain99
  batch_size: 2
  max_length: 128
  evaluation: tofu
  eval_subset: 2
"""


@pytest.fixture(scope="session")
def doc_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A checkout-like folder with the tiny world the documented commands name, and the environment to run them."""
    from lightning_unlearn.commands import main as command
    from lightning_unlearn.models.tiny import make_tiny_pair

    world = tmp_path_factory.mktemp("doc_world")
    for name in ("main.py", "configs", "tests", "benchmarks", "lightning_unlearn"):
        (world / name).symlink_to(ROOT / name)
    runs = world / "runs"
    make_tiny_pair(runs / "tiny", large=(32, 2), small=(16, 1))
    config = runs / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    bin_dir = world / ".bin"
    bin_dir.mkdir()
    # Scripts, not links: a virtual environment's python finds its site-packages from the path it is called by.
    for name, target in (("python", ""), ("python3", ""), ("lightning-unlearn", f' "{ROOT / "main.py"}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cwd = os.getcwd()
    os.chdir(world)
    try:
        trained = command(["fit", "--config", str(config), "--trainer.fast_dev_run", "false", "--trainer.max_steps",
                           "1", "--trainer.default_root_dir", "runs/npo_run"])
        trained.trainer.save_checkpoint(runs / "ckpt" / "npo.ckpt")
        for name, alpha in (("npo", "1.0"), ("request1", "1.0"), ("request2", "0.5")):
            command(["export", "runs/ckpt/npo.ckpt", f"runs/{name}", "--alpha", alpha])
        for request in ("eul1", "eul2"):  # two deletion requests' unlearning layers, for fuse
            command(["fit", "--config", str(config), "--model", "EUL", "--model.small_model", "runs/tiny/large",
                     "--model.large_model", "null", "--trainer.fast_dev_run", "1",
                     "--trainer.default_root_dir", f"runs/{request}_run"])
            shutil.copytree(runs / f"{request}_run" / "unlearning_layers", runs / request)
    finally:
        os.chdir(cwd)
    shutil.copytree(runs / "tiny" / "large", runs / "demo" / "models" / "large_ft")
    return {"root": str(world), **{k: v for k, v in env.items() if isinstance(v, str)}}


# long (make test-long), not in make test: the documented commands were added to by several parts in one day and
# have not yet run whole in the final tree (one block takes up to minutes); their extraction and skips are checked
# above in every run.
@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_commands_run(block: Block, doc_world: dict[str, str]) -> None:
    if block.skip:
        pytest.skip(f"doc-test: skip: {block.skip}")
    env = dict(doc_world)
    root = env.pop("root")
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.script()], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (f"{block.id} failed (exit {result.returncode}):\n{block.script()}\n"
                                    f"--- last output ---\n{(result.stdout + result.stderr)[-4000:]}")
