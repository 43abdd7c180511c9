"""LightningModules: the offset/direct unlearning base, one class per loss, and EUL's unlearning layers."""

from .base import PartOutput, UnlearnModule
from .eul import EUL
from .finetune import SFT
from .llmu import LLMU
from .logit_arithmetic import ULD, WHP
from .losses import DPO, GA, GD, KL, NPO, SimNPO
from .rmu import RMU

__all__ = ["DPO", "EUL", "GA", "GD", "KL", "LLMU", "NPO", "PartOutput", "RMU", "SFT", "SimNPO", "ULD", "UnlearnModule",
           "WHP"]
