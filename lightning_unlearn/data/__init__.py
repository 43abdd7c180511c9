"""Forget/retain data: sources (bundled TOFU, folders, hub), prompt formatting, the data module."""

from .datamodule import UnlearnDataModule
from .formatting import IGNORE_INDEX, PromptFormatter
from .sources import available_splits, bundled_dir, load_split

__all__ = ["IGNORE_INDEX", "PromptFormatter", "UnlearnDataModule", "available_splits", "bundled_dir", "load_split"]
