"""The LightningCLI behind ``lightning-unlearn fit|validate|test`` (``--model NPO ...``); the one command that
dispatches every subcommand is :mod:`lightning_unlearn.commands`."""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from .lazy_imports import collector_paused

with collector_paused():  # torch, transformers and Lightning: see collector_paused
    import torch
    from jsonargparse import DefaultHelpFormatter, Namespace
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities import rank_zero_only

    from . import modules  # noqa: F401  (registers the loss classes so ``--model NPO`` resolves)
    from .data import UnlearnDataModule
    from .models.files import refuse_export_as_checkpoint
    from .data.datasets import QA_ONLY_PARTS, QuestionsNeeded
    from .distributed.strategy import METADATA, check_checkpoint_strategy, is_distributed_checkpoint
    from .modules import UnlearnModule
    from .modules.registry import UnknownMethod, all_methods, methods_without_parts, resolve
    from .console import no_progress_bars, progress_settings
    from .tracking import SaveConfigToLoggers, finish_runs


def _share_cores() -> None:
    """Give each process its share of the CPU cores.

    Several processes (DDP on CPU, test workers) each running one thread per core slow small models
    down 10-25x. ``LOCAL_WORLD_SIZE`` is set by torchrun (which also sets ``OMP_NUM_THREADS=1``).
    Lightning's own DDP launcher sets neither in the processes it starts: it limits their threads itself
    after launching, to the available cores divided by the devices, but only while ``OMP_NUM_THREADS`` is
    unset; so this function must not set that variable. Cores are counted from this process's CPU
    affinity, which a container or ``taskset`` may restrict below ``os.cpu_count()``.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // processes))


NOTICES = (
    # The frozen models (large, reference) are in eval mode on purpose: UnlearnModule.train keeps them there
    # and puts the trained model in train mode.
    r"Found \d+ module\(s\) in eval mode at the start of training\.",
    # Raised inside Lightning's own pytree code by newer torch; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
"""Warnings Lightning and torch raise on every run that say nothing about the user's run (exact messages)."""

CHECKPOINT_CALLBACKS_NOTICE = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided during "
    r"`Trainer` instantiation\. Please add the following callbacks: "
    r"\[\"ModelCheckpoint\{[^{}]*\}\"(, \"ModelCheckpoint\{[^{}]*\}\")*\]\.$"
)
"""Lightning's notice that a checkpoint holds ModelCheckpoint states that no callback takes: a genuine warning
when resuming a fit (no checkpoint would be written), none when testing (those states are only file paths)."""

CHECKPOINT_DIRPATH_NOTICE = (
    r"The dirpath has changed from .* therefore `best_model_score`, `kth_best_model_path`, `kth_value`, "
    r"`last_model_path` and `best_k_models` won't be reloaded\. Only `best_model_path` will be reloaded\.$"
)
"""ModelCheckpoint's notice that a restored callback writes elsewhere now: it matters when resuming a fit, not
when testing, where no checkpoint is written."""

ADVERTISING = "💡 Tip:"


class _DropAdvertising(logging.Filter):
    """Drops Lightning's log lines that advertise its cloud products (litlogger, litmodels)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTISING)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    if not any(isinstance(f, _DropAdvertising) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_DropAdvertising())


def quiet_known_notices(fitting: bool) -> None:
    """Ignore the warnings in :data:`NOTICES` (and, unless ``fitting``, the ModelCheckpoint notices
    :data:`CHECKPOINT_CALLBACKS_NOTICE` and :data:`CHECKPOINT_DIRPATH_NOTICE`), matched by exact message so
    that every other warning of the same category still shows. Call it inside ``warnings.catch_warnings()``
    to keep the change to one run."""
    for message in NOTICES:
        warnings.filterwarnings("ignore", message=message)
    if not fitting:
        for message in (CHECKPOINT_CALLBACKS_NOTICE, CHECKPOINT_DIRPATH_NOTICE):
            warnings.filterwarnings("ignore", message=message)


class UnlearnCLI(LightningCLI):
    """LightningCLI with the model's losses as subclasses and the data module fixed, where the values a user
    gives (on the command line or in a ``--config`` file) are the values used.

    Two behaviours of LightningCLI and jsonargparse are changed for that:

    * With ``--ckpt_path FILE``, LightningCLI parses the checkpoint's model hyper-parameters over the whole
      configuration, command line included, so ``test --model.large_model NEW --ckpt_path CKPT`` loaded the
      large model named in the checkpoint. Here the order is: parser defaults, then the checkpoint's model
      and data hyper-parameters, then everything the user gave; a checkpoint fills only what the user left
      unset (a run is tested with the settings it was trained with unless told otherwise). A stored key the
      chosen class does not accept (a checkpoint of an older version or another loss) is skipped with a
      warning.
    * Choosing a class for an argument whose default is an instance of another class
      (``--model.optimizer torch.optim.SGD``, default AdamW) kept the default's values that the new class
      also accepts (SGD got AdamW's ``weight_decay`` 0.01, RMSprop AdamW's ``lr`` 1e-3 instead of its 1e-2;
      jsonargparse issue #460). Here a chosen class gets its own defaults plus the values the user gave.

    ``--print_config`` prints the configuration after both; the subcommand runs with Lightning's notices
    that do not concern the user filtered out (see :func:`quiet_known_notices`). A ``ValueError`` a model or data
    class raises on its arguments (``alpha (--model.alpha) must be a finite number``) is raised as it is, not
    inside jsonargparse's "Does not validate against any of the Union subtypes" with the whole namespace.
    """

    def instantiate_classes(self) -> None:
        """Build the model, data module and trainer; re-raise a refusal of this package's classes unwrapped."""
        try:
            with no_progress_bars():  # without a terminal, weight loading draws no bar (console.py)
                super().instantiate_classes()
        except ValueError as err:
            own = _package_error(err)
            if own is None or own is err:
                raise
            raise own.with_traceback(own.__traceback__) from None

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (``sys.argv[1:]`` if None), then what the user gave alone, with no defaults.

        Unlike LightningCLI's, this does not warn when ``args`` are given while ``sys.argv`` holds other
        arguments: in-process runs (the demo, notebooks) pass the command line they mean on purpose.
        """
        if args is None:
            args = sys.argv[1:]
        self._print_config_flags: tuple[str, bool] | None = None
        if isinstance(args, list):
            args, self._print_config_flags = _take_print_config(args)
            args = canonical_method_names(args)
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            self._given = parser.parse_object(args, defaults=False)
        else:
            self.config = parser.parse_args(args)
            self._given = parser.parse_args(args, defaults=False)

    def _parse_ckpt_path(self) -> None:
        """Merge the checkpoint's hyper-parameters under the user's values, give chosen classes their own
        defaults, then print the configuration if ``--print_config`` asked for it."""
        self._merge_checkpoint_hparams()
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        given = self._given[subcommand] if subcommand else self._given
        for key in ("model", "data"):
            section, user = config.get(key), given.get(key)
            if isinstance(user, Namespace) and "class_path" in user:  # the section's class: no default to inherit
                section, user = section.get("init_args"), user.get("init_args")
            if isinstance(section, Namespace) and isinstance(user, Namespace):
                _own_class_defaults(section, user)
        _default_run_folder(config)
        if self._print_config_flags is not None:
            flags, in_subcommand = self._print_config_flags
            parser = self._parser(subcommand) if subcommand and in_subcommand else self.parser
            dumped = config if subcommand and in_subcommand else self.config
            sys.stdout.write(parser.dump(dumped, **_dump_options(flags)))
            raise SystemExit(0)

    def _merge_checkpoint_hparams(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        sharded = bool(ckpt_path) and is_distributed_checkpoint(ckpt_path)  # fsdp2: hyper-parameters in meta.pt
        if not sharded:
            check_ckpt_path(ckpt_path)
        if not ckpt_path or not (Path(ckpt_path).is_file() or sharded):
            return
        try:
            checkpoint = torch.load(Path(ckpt_path) / METADATA if sharded else ckpt_path, weights_only=True,
                                    map_location="cpu")
        except Exception as err:  # a config, an export's weights...: say so, not the unpickler's message
            raise ValueError(f"--ckpt_path {ckpt_path} is not a checkpoint written by fit ({type(err).__name__}); "
                             "give <run folder>/checkpoints/*.ckpt.") from err
        config, given = self.config[subcommand], self._given[subcommand]
        update: dict[str, Any] = {}
        model = _checkpoint_model(checkpoint.get("hyper_parameters") or {}, given.get("model"), config.get("model"),
                                  ckpt_path)
        if model:
            update["model"] = model
        data = _unset_values(checkpoint.get("datamodule_hyper_parameters") or {}, given.get("data"),
                             config.get("data"), f"data module {self._datamodule_class.__name__}", ckpt_path)
        if data:
            update["data"] = data
        if update:
            try:
                self.config = self.parser.parse_object({subcommand: update}, self.config)
            except SystemExit:
                sys.stderr.write(f"The hyper-parameters stored in {ckpt_path} do not parse (see above).\n")
                raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        """The trainer, with its progress display fitted to the console: without a terminal no bar, and progress
        lines at a steady interval instead (:func:`~lightning_unlearn.console.progress_settings`)."""
        return super()._instantiate_trainer(progress_settings(config), callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in ("fit", "validate", "test") and isinstance(self.model, UnlearnModule):
            _print_mode(self.model)
        if subcommand in ("fit", "validate", "test"):  # a sharded checkpoint needs fsdp2: say so before any loading
            check_checkpoint_strategy(self.config[subcommand].get("ckpt_path"), self.trainer.strategy)
        if subcommand == "test" and self._given[subcommand].get("verbose") is None and getattr(
                getattr(self.datamodule, "hparams", None), "evaluation", None) in ("tofu", "muse"):
            self.config_init[subcommand]["verbose"] = False  # the TOFU/MUSE table is printed: not Lightning's too
        with warnings.catch_warnings(), no_progress_bars():  # no lm-eval or transformers bars in a log
            quiet_known_notices(fitting=subcommand == "fit")
            try:
                super()._run_subcommand(subcommand)
            except QuestionsNeeded as err:  # the data layer does not know the methods: name those that fit
                text = ", ".join(m.name for m in methods_without_parts(QA_ONLY_PARTS))
                raise QuestionsNeeded(f"{err} Methods that run on text: {text}.").with_traceback(
                    err.__traceback__) from None


RUNS = "runs"
"""The folder (relative to the working directory) that holds a run's folder when ``trainer.default_root_dir`` is
not given: ``runs/<method>`` (``runs/npo``)."""


def _default_run_folder(config: Namespace) -> None:
    """Give a run without ``trainer.default_root_dir`` the folder ``runs/<method>``, in place in ``config``, and a
    logger left without a folder (``save_dir`` unset or W&B's ``"."``) that run folder.

    Lightning's default is the working directory: the TensorBoard logs went to ``./lightning_logs`` and, where no
    logger writes a version folder (``fast_dev_run`` replaces the loggers), ``TOFU_HISTORY.json`` and the other result
    files into whatever folder the command was started from, the repository root included. Set here, before
    ``--print_config`` and the saved ``config.yaml``, so a saved config names the folder its run used.
    """
    trainer = config.get("trainer")
    if not isinstance(trainer, Namespace):
        return
    if trainer.get("default_root_dir") is None:
        model = config.get("model")
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        name = class_path.rsplit(".", 1)[-1].lower() if isinstance(class_path, str) else "run"
        trainer.default_root_dir = f"{RUNS}/{name}"
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
        if isinstance(init_args, Namespace) and "save_dir" in init_args and init_args.save_dir in (None, "."):
            init_args.save_dir = str(trainer.default_root_dir)


LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself (``last``: the run's last checkpoint...)."""


def check_ckpt_path(ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` that cannot be a checkpoint before anything is built: a folder (an export or a run
    folder; the message gives the command that evaluates an export) or a path where nothing is.

    Raises:
        ValueError: a folder (:func:`~lightning_unlearn.models.files.refuse_export_as_checkpoint`).
        FileNotFoundError: nothing at the path (Lightning's own names and URLs are left to Lightning).
    """
    if not ckpt_path or ckpt_path in LIGHTNING_CKPT_NAMES or ckpt_path.startswith(LIGHTNING_CKPT_NAMES[3] + ":") \
            or "://" in ckpt_path:
        return
    refuse_export_as_checkpoint(ckpt_path)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file. Give a checkpoint written by fit "
                                "(<run folder>/checkpoints/*.ckpt), or --ckpt_path last.")


def mode_line(model: UnlearnModule) -> str:
    """The run's mode in one line: ``offset: large=..., small=..., reference=..., alpha=...`` or
    ``direct: model=...``, so that a run without ``--model.large_model`` does not unlearn directly unnoticed."""
    h = model.hparams
    if h.get("large_model") is None:
        return f"direct: model={h.small_model}"
    reference = f"{h.small_model} (LoRA adapter off)" if model.uses_lora else h.small_model
    return f"offset: large={h.large_model}, small={h.small_model}, reference={reference}, alpha={model.alpha:g}"


@rank_zero_only
def _print_mode(model: UnlearnModule) -> None:
    """Write :func:`mode_line` to standard error, once (rank zero), at the start of fit, validate and test."""
    sys.stderr.write(mode_line(model) + "\n")
    sys.stderr.flush()


class RawDescriptionFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, with the description's lines kept (the list of methods, one a line)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


MODEL_FLAGS = ("--model", "--model.class_path")
"""The flags whose value names a method."""


def canonical_method_names(args: list[str]) -> list[str]:
    """``args`` with each method name after ``--model`` replaced by its class name (``npo``, ``GradAscent`` become
    ``NPO``, ``GA``), so that jsonargparse, which resolves class names exactly, finds the class and ``--print_config``
    and the saved config show the canonical name. Dotted class paths and YAML or JSON values are left as they are.

    Raises:
        SystemExit: a name no method answers to; the message (a few lines, on standard error) names the closest.
    """
    out = list(args)
    for i, arg in enumerate(out):
        flag, equals, value = arg.partition("=")
        if flag not in MODEL_FLAGS:
            continue
        if not equals:
            if i + 1 >= len(out):
                continue
            value = out[i + 1]
        if not value or any(c in value for c in "./{}:[] \n") or value.lower() in ("null", "none"):
            continue
        try:
            name = resolve(value).name
        except UnknownMethod as err:
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None
        if equals:
            out[i] = f"{flag}={name}"
        else:
            out[i + 1] = name
    return out


def methods_help() -> str:
    """One line per method for ``--help``: its names and modes."""
    lines = []
    for method in all_methods():
        modes = "/".join(method.modes) if method.unlearns else "fine-tuning, evaluation"
        lines.append(f"  {method.label()}: {modes}")
    return "\n".join(lines)


def _package_error(err: BaseException) -> BaseException | None:
    """The first exception in ``err``'s chain raised by this package's own code (a class refusing its arguments)."""
    package = os.path.dirname(os.path.abspath(__file__))
    seen: BaseException | None = err
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        if frames and os.path.abspath(frames[-1].filename).startswith(package + os.sep):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _take_print_config(args: list[str]) -> tuple[list[str], tuple[str, bool] | None]:
    """Remove ``--print_config[=flags]`` from ``args``; return the rest and (flags, whether it came after the
    subcommand), so that the configuration is printed once it is complete."""
    subcommands = set(LightningCLI.subcommands())
    found: tuple[str, bool] | None = None
    rest: list[str] = []
    seen_subcommand = False
    for arg in args:
        if arg == "--print_config" or arg.startswith("--print_config="):
            found = (arg.partition("=")[2], seen_subcommand)
            continue
        seen_subcommand = seen_subcommand or arg in subcommands
        rest.append(arg)
    return rest, found


def _dump_options(flags: str) -> dict[str, bool]:
    """``parser.dump`` options of ``--print_config=flags`` (flags as jsonargparse takes them)."""
    names = {"comments": "with_comments", "skip_default": "skip_default", "skip_unset": "skip_unset",
             "skip_null": "skip_unset"}
    options = {"skip_unset": False}
    for flag in filter(None, flags.split(",")):
        if flag not in names:
            raise SystemExit(f"--print_config: unknown flag {flag!r}; use one or more of {sorted(names)}.")
        options[names[flag]] = True
    return options


def _import(path: str) -> Any:
    """The object at a dotted import path (``torch.optim.SGD``)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _signature_default(target: Any, name: str) -> Any:
    """Default of parameter ``name`` of a class (its ``__init__``, or a base class's ``__init__`` reached through
    ``**kwargs``, as jsonargparse resolves them) or of a function; ``inspect.Parameter.empty`` if it has none."""
    functions = [k.__dict__["__init__"] for k in inspect.getmro(target) if "__init__" in k.__dict__] \
        if inspect.isclass(target) else [target]
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            break
        if name in parameters:
            return parameters[name].default
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return inspect.Parameter.empty


def _own_class_defaults(config: Namespace, given: Namespace) -> None:
    """Where ``given`` (what the user set) chooses a class, reset every argument of that class the user did not
    set to the class's own default, in place in ``config``; recurse into nested values."""
    if "class_path" in given and isinstance(config.get("init_args"), Namespace):
        user = given.get("init_args") or Namespace()
        try:
            target = _import(config["class_path"])
        except (ImportError, AttributeError, ValueError):
            target = None
        init_args = config["init_args"]
        for key in list(vars(init_args)):
            if key in user or target is None:
                continue
            default = _signature_default(target, key)
            if default is not inspect.Parameter.empty:
                init_args[key] = default
        config, given = init_args, user
    for key, value in vars(given).items():
        if isinstance(value, Namespace) and isinstance(config.get(key), Namespace):
            _own_class_defaults(config[key], value)


def _user_keys(given: Namespace | None) -> set[str]:
    """Top-level argument names the user set in one section (``init_args`` and ``dict_kwargs`` of a subclass)."""
    if not isinstance(given, Namespace):
        return set()
    if "class_path" in given or "init_args" in given:
        return {k for part in ("init_args", "dict_kwargs") for k in vars(given.get(part) or Namespace())}
    return set(vars(given))


def _unset_values(stored: dict[str, Any], given: Namespace | None, current: Namespace | None, owner: str,
                  ckpt_path: str) -> dict[str, Any]:
    """The stored hyper-parameters the user did not set, among those ``current`` (the parsed section) accepts."""
    stored = {k: v for k, v in stored.items() if not k.startswith("_")}
    user = _user_keys(given)
    accepted = set(vars(current)) if isinstance(current, Namespace) else set(stored)
    unknown = sorted(set(stored) - accepted - user)
    if unknown:
        warnings.warn(f"{ckpt_path} stores hyper-parameters {unknown} that {owner} does not take: they are ignored.",
                      stacklevel=3)
    return {k: v for k, v in stored.items() if k in accepted and k not in user}


def _checkpoint_model(stored: dict[str, Any], given: Namespace | None, current: Namespace | None,
                      ckpt_path: str) -> dict[str, Any]:
    """The model section a checkpoint contributes: its loss class unless the user chose one, and its stored
    arguments that the user did not set and the class takes."""
    stored = dict(stored)
    class_path = (given.get("class_path") if isinstance(given, Namespace) else None) or stored.get("_class_path")
    if class_path is None:
        return {}
    current_args = current.get("init_args") if isinstance(current, Namespace) else None
    same_class = isinstance(current, Namespace) and current.get("class_path") == class_path
    kwargs = _unset_values(stored, given, current_args if same_class else None, class_path, ckpt_path)
    return {"class_path": class_path, "init_args": kwargs}


def _commented_print_config(args: list[str]) -> list[str]:
    """Make a bare ``--print_config`` print the commented config, so a saved config documents itself."""
    return ["--print_config=comments" if a == "--print_config" else a for a in args]


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> UnlearnCLI:
    """Entry point; ``args`` lets tests drive the CLI in-process, ``run=False`` only builds the objects.

    From the command line (``args`` None) the objects the imports made (some 700,000: modules, classes, functions)
    are frozen out of the garbage collector's passes for the rest of the process (``gc.freeze``): each full pass
    over them cost about 0.25 s of CPU and found nothing to free. In-process callers (tests, the demo's stages)
    are left as they are: there the frozen objects could include an earlier run's garbage.
    """
    _share_cores()
    if args is None:
        gc.freeze()
        args = sys.argv[1:]
    if isinstance(args, list):
        args = _commented_print_config(args)
    help_kwargs = {"description": "lightning-unlearn: offset (delta) unlearning of LLMs and white-box baselines.\n"
                                  "Methods (--model NAME; names and aliases match in any case):\n" + methods_help()
                                  + "\nA mistake in the arguments prints what to change; LIGHTNING_UNLEARN_TRACEBACK=1 "
                                    "shows its traceback.",
                   "formatter_class": RawDescriptionFormatter}
    cli = UnlearnCLI(
        UnlearnModule,
        UnlearnDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**help_kwargs, **{name: help_kwargs for name in LightningCLI.subcommands()}},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
    if run:
        finish_runs(cli.trainer.loggers)
    return cli


if __name__ == "__main__":
    main()
