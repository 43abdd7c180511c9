"""The command line: ``lightning-unlearn fit --model NPO ...`` (also ``python main.py``)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from . import modules  # noqa: F401  (registers the loss classes so ``--model NPO`` resolves)
from .data import UnlearnDataModule
from .modules import UnlearnModule
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


class UnlearnCLI(LightningCLI):
    """LightningCLI with the model's losses as subclasses and the data module fixed."""


def _commented_print_config(args: list[str]) -> list[str]:
    """Make a bare ``--print_config`` print the commented config, so a saved config documents itself."""
    return ["--print_config=comments" if a == "--print_config" else a for a in args]


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> UnlearnCLI:
    """Entry point; ``args`` lets tests drive the CLI in-process, ``run=False`` only builds the objects."""
    _share_cores()
    if args is None:
        args = sys.argv[1:]
        # Lightning warns when args are given beside a command line; here they *are* the command line.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    if isinstance(args, list):
        args = _commented_print_config(args)
    cli = UnlearnCLI(
        UnlearnModule,
        UnlearnDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "lightning-unlearn: offset (delta) unlearning of LLMs and white-box "
                                      "baselines. Losses: --model GA|GD|KL|NPO|DPO|SimNPO|LLMU|EUL|SFT."},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
    if run:
        finish_runs(cli.trainer.loggers)
    return cli


if __name__ == "__main__":
    main()
