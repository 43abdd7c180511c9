"""Forget/retain data: sources (bundled TOFU, folders, hub, MUSE's layout), the tokenizer, prompt formatting, the
TOFU and MUSE evaluation sets, the data module."""

from .datamodule import UnlearnDataModule
from .formatting import IGNORE_INDEX, PromptFormatter
from .sources import available_splits, bundled_dir, load_split

__all__ = ["IGNORE_INDEX", "PromptFormatter", "UnlearnDataModule", "available_splits", "bundled_dir", "load_split"]
