"""A quiet console: a command prints its results and the warnings that concern the run, not Lightning's
notices, advertising or deprecations of its own code."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_unlearn.cli import main, quiet_known_notices
from lightning_unlearn.demo import quiet_console

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
NOTICES = (
    "LightningCLI's args parameter is intended",  # args given while sys.argv holds the demo's own arguments
    "💡 Tip", "litlogger", "litmodels",  # Lightning's advertising
    "module(s) in eval mode",  # the frozen large model and reference
    "LeafSpec",  # a torch deprecation inside Lightning's code
    "callbacks used to create the checkpoint",  # ModelCheckpoint states, testing a checkpoint without them
)
TRUNCATION = "longer than max_length=64"


@pytest.fixture
def lightning_log() -> Iterator[io.StringIO]:
    """Everything Lightning logs (its info lines and tips go through ``logging``, not ``warnings``)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in loggers:
        logger.addHandler(handler)
    yield stream
    for logger in loggers:
        logger.removeHandler(handler)


def everything_shown(capsys: pytest.CaptureFixture, recwarn: pytest.WarningsRecorder, log: io.StringIO) -> str:
    printed = capsys.readouterr()
    text = "\n".join([printed.out, printed.err, log.getvalue(), *(str(w.message) for w in recwarn)])
    recwarn.clear()
    log.truncate(0)
    return text


def test_a_run_shows_real_warnings_and_none_of_lightnings_notices(
    tiny_world: dict, tmp_cwd: Path, capsys: pytest.CaptureFixture, recwarn: pytest.WarningsRecorder,
    lightning_log: io.StringIO, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--root", "runs/demo"])  # as the demo: the CLI beside other args
    common = ["--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
              "--model.large_model", tiny_world["large"], "--data.max_length", "64"]
    fit = main(["fit", *common, "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor",
                "val/forget_nll", "--trainer.callbacks.dirpath", str(tmp_cwd / "ckpt")])
    checkpoint = tmp_cwd / "run.ckpt"
    fit.trainer.save_checkpoint(checkpoint)
    main(["test", *common, "--trainer.callbacks", "null", "--ckpt_path", str(checkpoint)])
    shown = everything_shown(capsys, recwarn, lightning_log)
    assert [notice for notice in NOTICES if notice in shown] == []
    assert TRUNCATION in shown, "a warning about the user's data still shows"
    assert "test/forget_nll" in shown, "and so do the results"



def test_the_checkpoint_callbacks_notice_is_dropped_only_outside_fit() -> None:
    """Resuming a fit without the checkpoint's ModelCheckpoint writes no checkpoints: there the notice is
    genuine; another callback's state missing is genuine at test time too."""
    notice = ("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided "
              "during `Trainer` instantiation. Please add the following callbacks: {}.")
    checkpoints = notice.format(["ModelCheckpoint{'monitor': 'val/forget_quality', 'mode': 'max', "
                                 "'every_n_train_steps': 0, 'every_n_epochs': 1, 'train_time_interval': None}"])
    other = notice.format(["ModelCheckpoint{'monitor': None}", "EMA{'decay': 0.999}"])
    shown = {}
    for fitting in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_notices(fitting)
            for message in (checkpoints, other, "Found 3 module(s) in eval mode at the start of training."):
                warnings.warn(message, UserWarning)
        shown[fitting] = [str(w.message) for w in caught]
    assert shown == {True: [checkpoints, other], False: [other]}


def test_the_demo_keeps_lightnings_info_lines_off_its_console(
    tiny_world: dict, tmp_cwd: Path, capsys: pytest.CaptureFixture, recwarn: pytest.WarningsRecorder,
    lightning_log: io.StringIO,
) -> None:
    command = ["fit", "--config", FAST, "--model", "GA", "--model.small_model", tiny_world["small"],
               "--data.max_length", "64"]
    main(command)
    assert "Seed set to 0" in everything_shown(capsys, recwarn, lightning_log)
    level = logging.getLogger("lightning.pytorch").level
    with quiet_console():
        main(command)
    shown = everything_shown(capsys, recwarn, lightning_log)
    assert "Seed set to 0" not in shown and "GPU available" not in shown
    assert TRUNCATION in shown
    assert logging.getLogger("lightning.pytorch").level == level, "the levels are restored afterwards"
