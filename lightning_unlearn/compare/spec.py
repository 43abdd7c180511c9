"""What a comparison runs: the compare config (YAML), the methods it names and the cells they make.

A compare config names a base ``main.py fit`` config, the models of each mode, one budget and the methods:

.. code-block:: yaml

    world: tiny                      # build the demo's quick world (null: the models below exist)
    world_folder: null               # where: <output>/world by default
    output: runs/compare/tiny
    config: configs/demo/unlearn.yaml
    offset: {large_model: "{world}/models/large_ft", small_model: "{world}/models/small_ft"}
    direct: {large_model: null, small_model: "{world}/models/large_ft"}
    retain_reference: "{world}/eval/retain/TOFU_EVAL.json"
    budget: {max_epochs: 10, batch_size: 8, lr: 1.0e-3}
    args: [--data.eval_subset, "20"]  # every cell, both stages
    general_tasks: [tofu_general]    # lm-eval tasks of every cell's test: the general accuracy column
    methods:
      NPO: {}
      EUL: {modes: [direct], config: configs/demo/eul.yaml, budget: {}}

The budget rule: a method's cells (offset and direct) run with the same epochs, batch size and learning rate,
the config's ``budget`` updated by the method's own ``budget`` if it has one; nothing is tuned per mode. A new
loss joins the table by one line under ``methods`` (its name as ``--model`` takes it); ``--methods all``
takes every loss class the package registers, with default settings.

General capability: every cell's ``test`` runs the lm-eval tasks of ``general_tasks`` (default ``tofu_general``,
the package's offline multiple-choice tasks, which the tiny world's reference models are also evaluated on), and
the table's general accuracy is their mean accuracy; ``general_tasks: []`` leaves the column out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("offset", "direct")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "compare"
GENERAL_TASKS = ("tofu_general",)
"""The default ``general_tasks``: the package's offline multiple-choice tasks (:mod:`lightning_unlearn.harness`)."""


def registered_methods() -> list[str]:
    """The methods ``--model`` resolves that unlearn (SFT fine-tunes), in the registry's order
    (:mod:`lightning_unlearn.modules.registry`)."""
    from ..modules.registry import method_names

    return method_names()


def method_modes(name: str) -> tuple[str, ...]:
    """The modes the registry says method ``name`` runs in (a method's cells default to these)."""
    from ..modules.registry import resolve

    return tuple(resolve(name).modes)


@dataclass
class Cell:
    """One entry of the table: a method in one mode, as a ``fit`` command and a ``test`` command.

    ``test`` lacks ``--ckpt_path``, which the runner adds once ``fit`` has written the checkpoint;
    ``general_tasks``: the lm-eval tasks ``test`` runs, whose results the runner requires in the summary.
    """

    method: str
    mode: str
    fit: list[str]
    test: list[str]
    folder: Path
    inputs: list[str] = field(default_factory=list)
    general_tasks: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.mode}"

    def key(self, upstream: str = "") -> str:
        """Hash of both commands, every config file they read and ``upstream`` (the world's stage keys): the
        full configuration of the cell, so an edited config or a rebuilt world reruns it."""
        return command_key([self.fit, self.test], upstream)


def command_key(commands: list[list[str]], upstream: str = "") -> str:
    """A 16-hex-digit digest of command lines, the content of every YAML file they name and ``upstream``: what a
    cached run (a comparison's cell, a sequence's step) was made with, so that an edited config reruns it."""
    digest = hashlib.sha256(json.dumps([*commands, upstream]).encode())
    for arg in (a for command in commands for a in command):
        if arg.endswith((".yaml", ".yml")) and Path(arg).is_file():
            digest.update(Path(arg).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class CompareSpec:
    """A parsed compare config (see the module docstring for its fields)."""

    config: str
    methods: dict[str, dict[str, Any]]
    offset: dict[str, Any] = field(default_factory=dict)
    direct: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/compare"
    world: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    test_args: list[str] = field(default_factory=list)
    general_tasks: list[str] = field(default_factory=lambda: list(GENERAL_TASKS))
    retain_reference: str | None = None
    world_folder: str | None = None
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> CompareSpec:
        """Read a compare config.

        Raises:
            ValueError: a missing or unknown field, a method ``--model`` does not know, or a bad mode.
        """
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; a compare config takes {sorted(known)}.")
        missing = [k for k in ("config", "methods") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing {missing} (see lightning_unlearn/compare/spec.py for an example).")
        methods = raw["methods"]
        if isinstance(methods, list):
            methods = {m: {} for m in methods}
        raw["methods"] = {name: dict(opts or {}) for name, opts in methods.items()}
        general = raw.get("general_tasks", [])
        if not isinstance(general, list) or not all(isinstance(t, str) for t in general):
            raise ValueError(f"{path}: general_tasks must be a list of lm-eval task names, e.g. [tofu_general]; "
                             f"got {general!r}.")
        spec = cls(**raw, source=str(path))
        spec.check_methods()
        return spec

    def check_methods(self) -> None:
        from ..modules.registry import UnknownMethod, resolve, unknown_method

        canonical: dict[str, dict[str, Any]] = {}
        for name, opts in self.methods.items():
            try:
                name = resolve(name).name  # any case, open-unlearning's names
            except UnknownMethod:
                hint = unknown_method(name).split("\n", 1)[1]  # the closest names and the list
                raise ValueError(f"{self.source}: method {name!r} is not a registered loss.\n{hint}") from None
            if resolve(name).unlearns is False:
                raise ValueError(f"{self.source}: {name} does not unlearn; the table takes {registered_methods()}.")
            canonical[name] = opts
        self.methods = canonical
        for name, opts in self.methods.items():
            bad = sorted(set(opts.get("modes", MODES)) - set(MODES))
            if bad:
                raise ValueError(f"{self.source}: method {name}: unknown modes {bad}; use {list(MODES)}.")
            unsupported = sorted(set(opts.get("modes", ())) - set(method_modes(name)))
            if unsupported:
                raise ValueError(f"{self.source}: method {name} runs in {list(method_modes(name))} mode only, not "
                                 f"{unsupported}: remove them from its modes.")
            for mode in opts.get("modes", method_modes(name)):
                if not getattr(self, mode):
                    raise ValueError(f"{self.source}: method {name} runs in {mode} mode but the config gives no "
                                     f"{mode} models: add `{mode}: {{small_model: ...}}` or set its `modes`.")
            extra = sorted(set(opts) - {"modes", "config", "budget", "args"})
            if extra:
                raise ValueError(f"{self.source}: method {name}: unknown options {extra}; "
                                 "use modes, config, budget, args.")

    def select(self, names: list[str] | None) -> None:
        """Keep only ``names`` (``["all"]``: every registered loss, default settings for those not listed).

        Raises:
            ValueError: a name the config does not list and the package does not register.
        """
        if not names:
            return
        if names == ["all"]:
            self.methods = {m: self.methods.get(m, {}) for m in registered_methods()}
        else:
            from ..modules.registry import UnknownMethod, resolve

            listed = {}
            for name, opts in self.methods.items():
                try:
                    listed[resolve(name).name] = opts
                except UnknownMethod:
                    listed[name] = opts  # check_methods names it
            try:
                names = [resolve(m).name for m in names]
            except UnknownMethod as err:
                raise ValueError(f"--methods: {err}") from None
            self.methods = {m: listed.get(m, {}) for m in names}
        self.check_methods()

    @property
    def root(self) -> Path:
        return Path(self.output)

    @property
    def world_root(self) -> Path:
        """Where the world is built: ``world_folder``, by default ``<output>/world``."""
        return Path(self.world_folder) if self.world_folder else self.root / "world"

    def fill(self, value: Any) -> Any:
        """``value`` with ``{world}`` replaced by the world folder (strings only)."""
        return value.replace("{world}", str(self.world_root)) if isinstance(value, str) else value

    def cells(self) -> list[Cell]:
        """Every method in each of its modes, in config order, offset before direct."""
        cells = []
        for method, opts in self.methods.items():
            for mode in opts.get("modes", method_modes(method)):
                cells.append(self._cell(method, mode, opts))
        return cells

    def _cell(self, method: str, mode: str, opts: dict[str, Any]) -> Cell:
        folder = self.root / "cells" / f"{method}-{mode}"
        models = self.offset if mode == "offset" else self.direct
        model_args: list[str] = ["--model", method]
        for key, value in models.items():
            model_args += [f"--model.{key}", "null" if value is None else str(self.fill(value))]
        if self.retain_reference:
            model_args += ["--model.retain_reference", self.fill(self.retain_reference)]
        budget = {**self.budget, **opts.get("budget", {})}
        budget_args: list[str] = []
        if "max_epochs" in budget:
            budget_args += ["--trainer.max_epochs", str(budget["max_epochs"])]
        if "batch_size" in budget:
            budget_args += ["--data.batch_size", str(budget["batch_size"])]
        if "lr" in budget:
            budget_args += ["--model.optimizer.init_args.lr", str(budget["lr"])]
        common = ["--config", opts.get("config", self.config), *model_args, *[self.fill(a) for a in self.args],
                  *[self.fill(a) for a in opts.get("args", [])]]
        fit = ["fit", *common, *budget_args, "--trainer.callbacks", "null", "--trainer.limit_val_batches", "0",
               "--trainer.check_val_every_n_epoch", "1",  # else the default checkpoint waits for a validation
               "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(folder / "fit")]
        general = ["--data.lm_eval_tasks", "[" + ", ".join(self.general_tasks) + "]"] if self.general_tasks else []
        test = ["test", *common, *[self.fill(a) for a in self.test_args], *general, "--trainer.callbacks", "null",
                "--trainer.default_root_dir", str(folder / "test"), "--verbose", "false"]
        return Cell(method, mode, fit, test, folder, general_tasks=list(self.general_tasks))
