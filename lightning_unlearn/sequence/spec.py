"""What a sequence runs: the sequence config (YAML), its strategies and the steps they make.

.. code-block:: yaml

    world: tiny                            # build the demo's quick world (null: the models below exist)
    output: runs/sequence/tiny
    config: configs/demo/unlearn.yaml      # the base fit/test config of every step
    method: NPO                            # the loss of continue, compose and all_at_once
    offset: {large_model: "{world}/models/large_ft", small_model: "{world}/models/small_ft"}
    direct: {large_model: null, small_model: "{world}/models/large_ft"}
    retain_model: "{world}/models/large_retain"   # evaluated once, the reference of forget quality (or:)
    retain_reference: null                 # a retain model's TOFU_EVAL.json / MUSE_EVAL.json, as compare takes
    requests: {folds: forget01, count: 3}  # see requests.py
    budget: {max_epochs: 5, batch_size: 8, lr: 1.0e-3}   # per request
    args: [--data.eval_subset, "40"]       # every step, both stages
    method_args: [--model.retain_weight, "10"]   # the steps of `method` (not fuse's EUL), both stages
    test_args: []                          # every evaluation
    general_tasks: [tofu_general]          # lm-eval tasks of every evaluation
    strategies:
      continue: {modes: [offset, direct]}
      compose: {}
      fuse: {config: configs/demo/eul.yaml, budget: {max_epochs: 25, lr: 3.0e-3}}
      all_at_once: {modes: [offset]}

The strategies (each with options ``modes``, ``config``, ``budget``, ``args``; leave one out to skip it):

* ``continue``: one model trained on each request in turn: request ``k`` resumes request ``k-1``'s checkpoint
  (weights, optimizer state, epoch counter: ``max_epochs`` grows by the budget's each request) on request ``k``'s
  data. In offset mode the reference ``S0`` stays the small model as it was before the first request.
* ``compose``: a new offset per request, each trained from the same ``L`` and ``S0`` on its request alone and
  exported; after request ``k`` the model is ``z_L + sum_{i<=k} alpha_i (z_S_i - z_S0)``
  (:mod:`lightning_unlearn.deploy.manifest`), evaluated in-process (:mod:`.composed`). Offset mode only.
* ``fuse``: EUL's unlearning layers trained per request (``method`` EUL, direct mode, the same ``adapter_seed``),
  the layers of requests ``1..k`` fused in closed form from their Gram matrices
  (:func:`lightning_unlearn.models.adapters.fuse`) and tested with ``--model.adapters``.
* ``all_at_once``: one run from the start on the union of requests ``1..k``: the reference the others are
  measured against (a deletion system that could retrain on everything asked so far).

Before any request, the model as it is (``before``) and, with ``retain_model``, the retain model are evaluated
with the same settings: ``before`` is every strategy's point at zero requests, and the retain model's
per-sample results are the forget-quality reference of every step (so its forget set covers every fold).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..compare.spec import GENERAL_TASKS, command_key, method_modes
from .requests import Requests, parse_requests

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "sequence"
STRATEGIES = ("continue", "compose", "fuse", "all_at_once")
MODES = ("offset", "direct")
FUSE_METHOD = "EUL"
STRATEGY_MODES = {"continue": MODES, "compose": ("offset",), "fuse": ("direct",), "all_at_once": MODES}
"""The modes each strategy can run in; ``modes`` picks among them (defaults: continue both, all_at_once offset)."""
DEFAULT_MODES = {"continue": MODES, "compose": ("offset",), "fuse": ("direct",), "all_at_once": ("offset",)}


@dataclass
class Step:
    """One evaluated point of a sequence: strategy ``strategy`` in ``mode`` after ``k`` requests (``k = 0``: a
    reference evaluation, ``series`` ``before`` or ``retain``).

    ``fit`` and ``test`` are ``main.py`` command lines (``test`` lacks ``--ckpt_path``, which the runner adds;
    ``test`` of ``compose`` starts with ``compose``: the arguments its in-process evaluation reads). ``resume``: the
    step whose checkpoint ``continue`` resumes; ``parts``: the steps whose exports (``compose``) or unlearning layers
    (``fuse``) make this one's model, itself last; ``depends``: every step whose output this one reads.
    """

    series: str
    strategy: str
    mode: str
    k: int
    folder: Path
    fit: list[str] | None
    test: list[str] | None
    resume: Step | None = None
    parts: list[Step] = field(default_factory=list)
    depends: list[Step] = field(default_factory=list)
    forget_split: str | list[str] | None = None
    general_tasks: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.series} after {self.k} request{'s' if self.k != 1 else ''}" if self.k else self.series

    def key(self, upstream: str = "") -> str:
        """The step's configuration: its commands and config files, ``upstream`` (the world, the reference) and the
        keys of the steps its model is built from, so that a changed earlier request reruns the later ones."""
        before = [s.key(upstream) for s in self.depends]
        return command_key([self.fit or [], self.test or [], [self.strategy, self.mode, *before]], upstream)

    def describe(self) -> str:
        return "python main.py " + shlex.join(self.fit) if self.fit else ""


def _flag_pairs(args: list[str]) -> list[tuple[str, str]]:
    """``--flag value`` pairs of an argument list (a flag without a value gets ``""``)."""
    pairs, i = [], 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append((args[i], args[i + 1]))
            i += 2
        else:
            pairs.append((args[i], ""))
            i += 1
    return pairs


def settings(configs: list[str], args: list[str]) -> dict[str, Any]:
    """The ``data`` options and ``model.init_args`` that a ``main.py`` command with ``--config`` files ``configs``
    then ``args`` would use, merged in order (``--config`` files inside ``args`` included): what the in-process
    composed evaluation needs to serve the same data as ``test`` (:mod:`.composed`). Only ``data.*`` and
    ``model.*`` keys are read; a ``--data.KEY VALUE`` value is parsed as YAML, as the command line does.

    Raises:
        FileNotFoundError: a config file that does not exist.
    """
    data: dict[str, Any] = {}
    model: dict[str, Any] = {}

    def merge(path: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        data.update(raw.get("data") or {})
        model.update(((raw.get("model") or {}).get("init_args")) or {})

    for path in configs:
        merge(path)
    for flag, value in _flag_pairs(args):
        if flag == "--config":
            merge(value)
        elif flag.startswith("--data."):
            data[flag[len("--data."):]] = yaml.safe_load(value) if value else None
        elif flag.startswith("--model.") and "." not in flag[len("--model."):]:
            model[flag[len("--model."):]] = yaml.safe_load(value) if value else None
    return {"data": data, "model": model}


@dataclass
class SequenceSpec:
    """A parsed sequence config (see the module docstring for its fields)."""

    config: str
    method: str
    requests: dict[str, Any]
    strategies: dict[str, dict[str, Any]]
    offset: dict[str, Any] = field(default_factory=dict)
    direct: dict[str, Any] = field(default_factory=dict)
    output: str = "runs/sequence"
    world: str | None = None
    world_folder: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    method_args: list[str] = field(default_factory=list)
    test_args: list[str] = field(default_factory=list)
    general_tasks: list[str] = field(default_factory=lambda: list(GENERAL_TASKS))
    retain_model: str | None = None
    retain_reference: str | None = None
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> SequenceSpec:
        """Read and check a sequence config.

        Raises:
            ValueError: a missing or unknown field, an unknown strategy, mode or option, a method ``--model`` does
                not know, a strategy whose mode has no models, or both ``retain_model`` and ``retain_reference``.
        """
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; a sequence config takes {sorted(known)}.")
        missing = [k for k in ("config", "method", "requests", "strategies") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing {missing} (see lightning_unlearn/sequence/spec.py for an example).")
        strategies = raw["strategies"]
        if isinstance(strategies, list):
            strategies = {s: {} for s in strategies}
        if not isinstance(strategies, dict) or not strategies:
            raise ValueError(f"{path}: strategies must name at least one of {list(STRATEGIES)}.")
        raw["strategies"] = {name: dict(opts or {}) for name, opts in strategies.items()}
        spec = cls(**raw, source=str(path))
        spec.check()
        return spec

    def check(self) -> None:
        from ..modules.registry import UnknownMethod, resolve

        try:
            self.method = resolve(self.method).name
        except UnknownMethod as err:
            raise ValueError(f"{self.source}: method: {err}") from None
        if self.retain_model and self.retain_reference:
            raise ValueError(f"{self.source}: give retain_model (evaluated here) or retain_reference (a file), "
                             "not both.")
        for name, opts in self.strategies.items():
            if name not in STRATEGIES:
                raise ValueError(f"{self.source}: unknown strategy {name!r}; the strategies are {list(STRATEGIES)}.")
            extra = sorted(set(opts) - {"modes", "config", "budget", "args"})
            if extra:
                raise ValueError(f"{self.source}: strategy {name}: unknown options {extra}; use modes, config, "
                                 "budget, args.")
            modes = opts.get("modes", DEFAULT_MODES[name])
            bad = sorted(set(modes) - set(STRATEGY_MODES[name]))
            if bad:
                raise ValueError(f"{self.source}: strategy {name} runs in {list(STRATEGY_MODES[name])} mode, not "
                                 f"{bad}.")
            method = FUSE_METHOD if name == "fuse" else self.method
            unsupported = sorted(set(modes) - set(method_modes(method)))
            if unsupported:
                raise ValueError(f"{self.source}: strategy {name}: {method} runs in {list(method_modes(method))} "
                                 f"mode only, not {unsupported}.")
            for mode in modes:
                if not getattr(self, mode):
                    raise ValueError(f"{self.source}: strategy {name} runs in {mode} mode but the config gives no "
                                     f"{mode} models: add `{mode}: {{small_model: ...}}` or set its modes.")

    @property
    def root(self) -> Path:
        return Path(self.output)

    @property
    def world_root(self) -> Path:
        return Path(self.world_folder) if self.world_folder else self.root / "world"

    def fill(self, value: Any) -> Any:
        """``value`` with ``{world}`` replaced by the world folder (strings only)."""
        return value.replace("{world}", str(self.world_root)) if isinstance(value, str) else value

    def base_settings(self) -> dict[str, Any]:
        """The data and model options of the base config with the config's ``args`` (:func:`settings`)."""
        return settings([self.config], [self.fill(a) for a in self.args])

    def benchmark(self) -> str:
        """``TOFU`` or ``MUSE``: the base config's ``data.evaluation``, the prefix of its result files."""
        evaluation = self.base_settings()["data"].get("evaluation") or "tofu"
        if evaluation not in ("tofu", "muse"):
            raise ValueError(f"{self.source}: a sequence is measured with data.evaluation tofu or muse, not "
                             f"{evaluation!r} (the per-request table needs their per-sample results).")
        return evaluation.upper()

    def parse_requests(self) -> Requests:
        """The requests, folds cut from the rows of the base config's dataset.

        Raises:
            ValueError, FileNotFoundError: a bad ``requests`` entry, or a split the dataset lacks.
        """
        from ..data.sources import load_rows

        dataset = self.fill(self.base_settings()["data"].get("dataset") or "bundled")
        return parse_requests(self.requests, lambda split: len(load_rows(dataset, split).records),
                              f"{self.source}: requests")

    def series(self) -> list[tuple[str, str]]:
        """``(strategy, mode)`` of every line of the figure, in config order."""
        return [(name, mode) for name, opts in self.strategies.items()
                for mode in opts.get("modes", DEFAULT_MODES[name])]

    def reference_steps(self, requests: Requests) -> list[Step]:
        """``retain`` (with ``retain_model``) and ``before``: test-only evaluations of the models as they are."""
        steps = []
        if self.retain_model:
            steps.append(self._test_only("retain", self.fill(self.retain_model), requests, None))
        start = self.direct.get("small_model") if self.direct else self.offset.get("large_model")
        steps.append(self._test_only("before", self.fill(start), requests, steps[0] if steps else None))
        return steps

    def steps(self, requests: Requests, retain: Step | None = None) -> dict[tuple[str, str], list[Step]]:
        """Every series' steps ``k = 1..K`` in order; ``retain``: the reference step every evaluation reads."""
        out: dict[tuple[str, str], list[Step]] = {}
        for strategy, mode in self.series():
            chain: list[Step] = []
            for k in range(1, len(requests) + 1):
                chain.append(self._step(strategy, mode, k, requests, chain, retain))
            out[(strategy, mode)] = chain
        return out

    # --- commands ---------------------------------------------------------------------------------------------

    def retain_reference_path(self, retain: Step | None) -> str | None:
        if retain is not None:
            return str(retain.folder / f"{self.benchmark()}_EVAL.json")
        return self.fill(self.retain_reference) if self.retain_reference else None

    def _eval_args(self, requests: Requests) -> list[str]:
        forget, holdout = requests.eval_forget_split(), requests.eval_holdout_split()
        return ([] if forget is None else ["--data.eval_forget_split", forget]) + \
               ([] if holdout is None else ["--data.eval_holdout_split", holdout])

    def _general(self) -> list[str]:
        return ["--data.lm_eval_tasks", "[" + ", ".join(self.general_tasks) + "]"] if self.general_tasks else []

    def _test_only(self, series: str, model: str, requests: Requests, retain: Step | None) -> Step:
        folder = self.root / "steps" / series
        test = ["test", "--config", self.config, "--model", "SFT", "--model.small_model", model,
                "--model.large_model", "null", *[self.fill(a) for a in self.args], *self._eval_args(requests),
                "--data.forget_split", _split_arg(requests.union(len(requests))),
                *[self.fill(a) for a in self.test_args], *self._general()]
        reference = None if series == "retain" else self.retain_reference_path(retain)
        test += ["--model.retain_reference", reference or "null"]  # not the base config's: the retain model has none
        test += ["--trainer.callbacks", "null", "--trainer.default_root_dir", str(folder / "test"),
                 "--verbose", "false"]
        return Step(series, series, "reference", 0, folder, None, test, depends=[retain] if retain else [],
                    general_tasks=list(self.general_tasks))

    def _step(self, strategy: str, mode: str, k: int, requests: Requests, chain: list[Step],
              retain: Step | None) -> Step:
        opts = self.strategies[strategy]
        series = strategy if strategy in ("compose", "fuse") else f"{strategy}-{mode}"
        folder = self.root / "steps" / series / f"{k}"
        method = FUSE_METHOD if strategy == "fuse" else self.method
        models = self.offset if mode == "offset" else self.direct
        model_args = ["--model", method]
        for key, value in models.items():
            model_args += [f"--model.{key}", "null" if value is None else str(self.fill(value))]
        reference = self.retain_reference_path(retain)
        model_args += ["--model.retain_reference", reference or "null"]  # none: not the base config's either
        split = requests.union(k) if strategy == "all_at_once" else requests.items[k - 1].split
        budget = {**self.budget, **opts.get("budget", {})}
        budget_args: list[str] = []
        if "max_epochs" in budget:
            epochs = int(budget["max_epochs"]) * (k if strategy == "continue" else 1)
            budget_args += ["--trainer.max_epochs", str(epochs)]
        if "batch_size" in budget:
            budget_args += ["--data.batch_size", str(budget["batch_size"])]
        if "lr" in budget:
            budget_args += ["--model.optimizer.init_args.lr", str(budget["lr"])]
        own = [] if strategy == "fuse" else [self.fill(a) for a in self.method_args]
        common = ["--config", opts.get("config", self.config), *model_args, *[self.fill(a) for a in self.args], *own,
                  *[self.fill(a) for a in opts.get("args", [])], *self._eval_args(requests),
                  "--data.forget_split", _split_arg(split)]
        fit = ["fit", *common, *budget_args, "--trainer.callbacks", "null", "--trainer.limit_val_batches", "0",
               "--trainer.check_val_every_n_epoch", "1", "--trainer.num_sanity_val_steps", "0",
               "--trainer.default_root_dir", str(folder / "fit")]
        if strategy == "compose":
            fit += ["--model.export_dir", str(folder / "export")]
        test: list[str] | None = ["test", *common, *[self.fill(a) for a in self.test_args], *self._general()]
        if strategy == "fuse":
            test += ["--model.adapters", str(folder / "fused")]
        test += ["--trainer.callbacks", "null", "--trainer.default_root_dir", str(folder / "test"),
                 "--verbose", "false"]
        if strategy == "compose":  # the composition is evaluated in-process from these settings (composed.py)
            test = ["compose", *common, *[self.fill(a) for a in self.test_args], *self._general()]
        step = Step(series, strategy, mode, k, folder, fit, test, forget_split=split,
                    general_tasks=list(self.general_tasks))
        if strategy == "continue" and chain:
            step.resume = chain[-1]
        if strategy in ("compose", "fuse"):
            step.parts = [*chain, step]
        step.depends = ([retain] if retain else []) + ([chain[-1]] if chain and strategy != "all_at_once" else [])
        return step


def _split_arg(split: str | list[str]) -> str:
    """A ``data.forget_split`` value on the command line: a name, or a YAML list of quoted names."""
    if isinstance(split, str):
        return split
    return "[" + ", ".join(f"'{s}'" for s in split) + "]"
