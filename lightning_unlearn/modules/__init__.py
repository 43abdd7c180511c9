"""LightningModules: the offset/direct unlearning base and one class per loss."""

from .base import PartOutput, UnlearnModule
from .losses import DPO, GA, GD, KL, NPO, SimNPO

__all__ = ["DPO", "GA", "GD", "KL", "NPO", "PartOutput", "SimNPO", "UnlearnModule"]
