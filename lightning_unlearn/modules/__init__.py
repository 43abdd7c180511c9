"""LightningModules: the offset/direct unlearning base, one class per loss, and EUL's unlearning layers."""

from .base import PartOutput, UnlearnModule
from .distillation import CEU, UNDIAL
from .eul import EUL
from .finetune import SFT
from .llmu import LLMU
from .logit_arithmetic import ULD, WHP
from .likelihood import DPO, GA, GD, KL, NPO, SimNPO
from .pdu import PDU
from .rmu import RMU
from .token_weighted import WGA, SatImp

__all__ = ["CEU", "DPO", "EUL", "GA", "GD", "KL", "LLMU", "NPO", "PDU", "PartOutput", "RMU", "SFT", "SatImp", "SimNPO",
           "UNDIAL", "ULD", "UnlearnModule", "WGA", "WHP"]
