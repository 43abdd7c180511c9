"""The console with and without a terminal: progress as lines for logs, no third-party progress bars in them.

On a terminal a progress bar redraws one line in place; in a log (CI, ``| tee log``, a batch job) the same bar is
either nothing for minutes or hundreds of carriage-return fragments. So where standard output is not a terminal:

* :class:`ProgressLines` prints one plain line at a steady interval (every :data:`INTERVAL_S` seconds, or what
  ``LIGHTNING_UNLEARN_PROGRESS_S`` says; 0: every step): the stage, epoch and step, the training loss, the
  elapsed time; and after each validation its headline metrics. The command line adds it to every ``fit``,
  ``validate`` and ``test`` whose Lightning progress bar is off (:mod:`lightning_unlearn.cli`).
* :func:`no_progress_bars` turns off the bars of other packages for the duration of a command: lm-eval's
  (request building, loglikelihood loops), transformers' weight loading, datasets' and huggingface_hub's. They all
  draw with ``tqdm``; its ``disable`` is forced on, since lm-eval passes ``disable=False`` explicitly, which
  ``tqdm``'s own ``TQDM_DISABLE`` does not override.

On a terminal nothing changes: Lightning's bar and the others draw as usual.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback

INTERVAL_S = 30.0
"""Default seconds between two progress lines."""
INTERVAL_ENV = "LIGHTNING_UNLEARN_PROGRESS_S"
"""Environment variable setting the seconds between two progress lines (a number >= 0)."""
HEADLINE = ("forget_quality", "model_utility", "forget_Q_A_ROUGE", "forget_verbmem_ROUGE", "retain_knowmem_ROUGE",
            "forget_nll", "retain_nll")
"""The validation metrics a progress line shows after each validation, where logged (``val/`` + name)."""


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (standard output by default) is a terminal; False for a stream without ``isatty``."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interval_from_env(default: float = INTERVAL_S) -> float:
    """Seconds between progress lines from :data:`INTERVAL_ENV`, else ``default``.

    Raises:
        ValueError: when the variable is set to something other than a finite number >= 0.
    """
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r}: give the seconds between progress lines, a number >= 0 "
                         "(0: a line every step).")
    return value


def _duration(seconds: float) -> str:
    """``75.2`` -> ``1m15s``; under a minute ``42s``; over an hour ``1h02m``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _epoch(trainer: L.Trainer) -> str:
    """``epoch 3 (4/12)``: Lightning's epoch index, as ``TOFU_HISTORY.json``, checkpoints and the per-epoch figure
    name it (from 0), then how many of how many epochs that is."""
    total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else "?"
    return f"epoch {trainer.current_epoch} ({trainer.current_epoch + 1}/{total})"


def _number(value: float) -> str:
    """Four decimals, or three significant digits in exponent form for small p-values (``1.33e-06``)."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 or not math.isfinite(value) else f"{value:.3g}"


def _loss(outputs: Any) -> float | None:
    """The training step's loss from what ``training_step`` returned (a tensor or a dict with ``loss``)."""
    value = outputs.get("loss") if isinstance(outputs, dict) else outputs
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


class ProgressLines(Callback):
    """Plain progress lines at a steady interval, for a console that is not a terminal.

    Each line starts with the stage and says where it is and for how long it has run, e.g.::

        [fit] epoch 2 (3/12), step 40/64 (global 168), loss 1.2345, elapsed 1m05s
        [validation] epoch 2 (3/12): batch 2/5, elapsed 1m20s
        [validation] epoch 2 (3/12) done in 11s: forget_quality 0.0412, model_utility 0.5831
        [test] batch 3/5, elapsed 12s
        [fit] done: 12 epochs, 768 steps in 2m37s

    A line is printed when at least ``every_s`` seconds have passed since the last one (0: at every step), so a
    log shows a heartbeat however long a step or an evaluation takes, and not thousands of lines when steps are
    fast. The validation summary line and the final line are printed always. Only the global-zero process prints.

    Args:
        every_s: seconds between two lines (>= 0).
        stream: where to print (standard output when None, looked up at each line).

    Raises:
        ValueError: ``every_s`` negative or not finite.
    """

    def __init__(self, every_s: float = INTERVAL_S, stream: TextIO | None = None) -> None:
        if not (isinstance(every_s, (int, float)) and math.isfinite(every_s) and every_s >= 0):
            raise ValueError(f"ProgressLines: every_s must be a number of seconds >= 0, got {every_s!r}.")
        self.every_s, self.stream = float(every_s), stream
        self._start: dict[str, float] = {}
        self._last = -math.inf

    # --- printing ------------------------------------------------------------------------------------------

    def _say(self, trainer: L.Trainer, stage: str, text: str) -> None:
        if trainer.is_global_zero:
            print(f"[{stage}] {text}", file=self.stream or sys.stdout, flush=True)
        self._last = time.monotonic()

    def _due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def _elapsed(self, stage: str) -> str:
        return _duration(time.monotonic() - self._start.get(stage, time.monotonic()))

    # --- fit -----------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start["fit"] = self._last = time.monotonic()
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else "?"
        self._say(trainer, "fit", f"start: {epochs} epochs of {trainer.num_training_batches} steps; a line every "
                                  f"{self.every_s:g} s ({INTERVAL_ENV})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._due():
            return
        loss = _loss(outputs)
        self._say(trainer, "fit", f"{_epoch(trainer)}, step {batch_idx + 1}/"
                                  f"{trainer.num_training_batches} (global {trainer.global_step})"
                                  + (f", loss {loss:.4f}" if loss is not None else "")
                                  + f", elapsed {self._elapsed('fit')}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._say(trainer, "fit", f"done: {trainer.current_epoch} epochs, {trainer.global_step} steps in "
                                  f"{self._elapsed('fit')}")

    # --- validation and test -------------------------------------------------------------------------------

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start["validation"] = time.monotonic()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not self._due():
            return
        counts = trainer.num_val_batches
        total = counts[dataloader_idx] if dataloader_idx < len(counts) else "?"
        where = f"{_epoch(trainer)}: " if trainer.state.fn == "fit" else ""
        loader = f"loader {dataloader_idx + 1}/{len(counts)} " if len(counts) > 1 else ""
        self._say(trainer, "validation", f"{where}{loader}batch {batch_idx + 1}/{total}, elapsed "
                                         f"{self._elapsed('fit' if 'fit' in self._start else 'validation')}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = [f"{name} {_number(float(metrics[f'val/{name}']))}" for name in HEADLINE if f"val/{name}" in metrics]
        where = f"{_epoch(trainer)} " if trainer.state.fn == "fit" else ""
        self._say(trainer, "validation", f"{where}done in {self._elapsed('validation')}"
                                         + (f": {', '.join(shown)}" if shown else ""))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start["test"] = self._last = time.monotonic()
        self._say(trainer, "test", f"start: {sum(trainer.num_test_batches)} batches; a line every {self.every_s:g} s")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due():
            counts = trainer.num_test_batches
            total = counts[dataloader_idx] if dataloader_idx < len(counts) else "?"
            loader = f"loader {dataloader_idx + 1}/{len(counts)} " if len(counts) > 1 else ""
            self._say(trainer, "test", f"{loader}batch {batch_idx + 1}/{total}, elapsed {self._elapsed('test')}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._say(trainer, "test", f"done in {self._elapsed('test')}")


def progress_settings(config: dict[str, Any], terminal: bool | None = None) -> dict[str, Any]:
    """A trainer's keyword arguments ``config`` with its progress display fitted to the console; a new dict.

    Not on a terminal (``terminal`` None: :func:`on_terminal`), Lightning's bar is turned off (a progress bar
    callback in ``callbacks`` is dropped with it). Whenever the bar is off, by this or by ``enable_progress_bar:
    false``, a :class:`ProgressLines` (interval from :func:`interval_from_env`) is added unless ``callbacks``
    already holds one, so a long stage is never silent. On a terminal with the bar on, nothing changes.

    Raises:
        ValueError: :data:`INTERVAL_ENV` set to something other than a number >= 0.
    """
    from lightning.pytorch.callbacks import ProgressBar

    config = dict(config)
    terminal = on_terminal() if terminal is None else terminal
    callbacks = config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if not terminal:
        config["enable_progress_bar"] = False
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if config.get("enable_progress_bar") is False and not any(isinstance(c, ProgressLines) for c in callbacks):
        callbacks.append(ProgressLines(interval_from_env()))
    config["callbacks"] = callbacks
    return config


_PATCHED = False


@contextmanager
def no_progress_bars(active: bool | None = None) -> Iterator[None]:
    """Within the block, no ``tqdm`` bar draws (lm-eval's, transformers', datasets', huggingface_hub's), and
    transformers, datasets and huggingface_hub are told so too. ``active`` None: only when standard output is not
    a terminal (:func:`on_terminal`). Nested blocks are fine; the outermost restores everything on exit."""
    global _PATCHED
    if active is None:
        active = not on_terminal()
    if not active or _PATCHED:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    @functools.wraps(original)
    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > 10:  # disable given by position (iterable, desc, total, ..., ascii, disable)
            args = (*args[:10], True, *args[11:])
        else:
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    saved_env = {name: os.environ.get(name) for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS",
                                                         "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ.update({name: "1" for name in saved_env})  # for packages imported inside the block
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    tqdm.std.tqdm.__init__ = disabled
    _PATCHED = True
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
        _PATCHED = False
        if bars:
            hf_logging.enable_progress_bar()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
