"""Experiment trackers (Weights & Biases, MLflow...): the resolved config and the TOFU summary reach them too.

TensorBoard and CSV logs sit beside the ``config.yaml`` that LightningCLI writes, so a run's settings are
next to its curves. A tracker's run lives on a server, where that file is not: the config is logged to it
as the run config, and the TOFU summary as the W&B run summary, which is what its run table shows and sorts.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

LOCAL_LOGGERS = (TensorBoardLogger, CSVLogger)


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes ``config.yaml`` as usual and logs the same resolved config to every tracker, under ``config``.

    Lightning already logs the model's and data module's arguments; the trainer, optimizer, callbacks and
    seed are only in the full config, and a run is reproducible only with all of them.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        trackers = [logger for logger in trainer.loggers if not isinstance(logger, LOCAL_LOGGERS)]
        if trackers:
            # Through YAML so that paths, namespaces and class paths become plain values.
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in trackers:
                logger.log_hyperparams({"config": config})


def publish_summary(loggers: Iterable[Logger], summary: dict[str, Any], files: Iterable[Path] = (),
                    prefix: str = "tofu") -> None:
    """Put the benchmark's summary in each W&B run summary (keys ``<prefix>/<metric>``: ``tofu/...``,
    ``muse/...``) and upload the report ``files`` with the run.

    ``None`` values stay: they say a metric could not be computed (forget quality without a reference).
    The files are copied into the run's folder first: ``run.save`` would link to them, and an offline run
    synced later would upload whatever the next run wrote at the same place.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.summary.update({f"{prefix}/{k}": v for k, v in summary.items()})
            for path in files:
                copy = Path(shutil.copy(path, run.dir))
                run.save(str(copy), base_path=run.dir, policy="now")


def finish_runs(loggers: Iterable[Logger]) -> None:
    """End each W&B run of the command when the command ends, and wait until its records are written.

    Lightning leaves the run open, for a ``trainer.test`` later in the same script; a second command run in
    the same process (tests, notebooks) would otherwise log into the first one's run instead of its own.
    Each logger's own run is finished (not ``wandb.run``, which names the latest run of the process), so an
    offline run's file holds its summary once the command returns.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
