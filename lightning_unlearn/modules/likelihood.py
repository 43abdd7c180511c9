"""The methods that lower the forget answers' likelihood, one small class each: gradient ascent (GA, GD, KL) and
preference optimisation (NPO, SimNPO, DPO); ``--model NPO`` on the command line picks one. (Their loss functions are
:mod:`lightning_unlearn.losses`; this module only wires them to the data parts.)

Each class only says how the forget term is computed and which retain term it uses; the base class
runs the models (offset or direct) and adds the terms. A new loss is one more class like these.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..losses.functional import dpo_loss, nll_mean, npo_loss, sequence_logp, simnpo_loss
from .base import MeanOver, PartOutput, RetainLoss, UnlearnModule
from .divergence import ForgetNLLBound


class GA(ForgetNLLBound, UnlearnModule):
    """Gradient ascent: ``L = -NLL_mean(forget)``, no retain term.

    Args:
        stop_forget_nll: stop training once the forget NLL of an optimizer step (mean over its forget answer
            tokens) exceeds this, instead of ascending without bound (see :class:`.divergence.ForgetNLLBound`);
            ``null``: run to ``max_steps``/``max_epochs``.
    """

    aliases = ("GradAscent",)
    retain_loss: RetainLoss = "none"

    def __init__(self, stop_forget_nll: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        forget = out["forget"]
        nll = nll_mean(forget.logits, forget.labels)
        self.note_forget_nll(forget, nll)
        return -nll


class GD(GA):
    """Gradient difference: ``L = -NLL_mean(forget) + retain_weight * NLL_mean(retain)``; ``stop_forget_nll``
    as in :class:`GA`."""

    aliases = ("GradDiff",)

    retain_loss: RetainLoss = "nll"


class KL(GA):
    """Gradient ascent with ``KL(p_ref || p)`` on retain data, averaged over answer tokens; ``stop_forget_nll``
    as in :class:`GA`."""

    retain_loss: RetainLoss = "kl"


class _WithRetainChoice(UnlearnModule):
    """Base of the losses whose retain term is a choice (none / nll / kl)."""

    def __init__(self, retain_loss: RetainLoss = "nll", **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(**kwargs)
        self.retain_loss = retain_loss


class NPO(_WithRetainChoice):
    """Negative preference optimisation (Zhang et al. 2024).

    ``L_forget = -(2/beta) * mean_i logsigmoid(-beta * (logp(y_i|x_i) - logp_ref(y_i|x_i)))`` with
    per-sequence summed log-probabilities; bounded below, unlike gradient ascent, which it approaches
    as beta -> 0.

    Args:
        beta: inverse temperature.
        retain_loss: retain term: ``none``, ``nll`` or ``kl``.
    """

    needs_reference = True
    forget_mean: ClassVar[MeanOver] = "sequences"

    def __init__(self, beta: float = 0.1, retain_loss: RetainLoss = "nll", **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, **kwargs)
        self.beta = beta

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        f = out["forget"]
        logp, _ = sequence_logp(f.logits, f.labels)
        ref_logp, _ = sequence_logp(f.ref_logits, f.labels)
        return npo_loss(logp, ref_logp, self.beta)


class DPO(_WithRetainChoice):
    """IdkDPO: prefer a random refusal ("I don't know") to the real answer of each forget question.

    ``L_forget = -(2/beta) * mean logsigmoid(beta * ((logp - logp_ref)(y_idk) - (logp - logp_ref)(y)))``.

    Args:
        beta: inverse temperature.
        retain_loss: retain term: ``none``, ``nll`` or ``kl``.
    """

    aliases = ("IdkDPO",)

    needs_reference = True
    extra_parts = ("forget_idk",)
    forget_mean: ClassVar[MeanOver] = "sequences"  # of the forget part, as many as refusals

    def __init__(self, beta: float = 0.1, retain_loss: RetainLoss = "nll", **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, **kwargs)
        self.beta = beta

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        real, idk = out["forget"], out["forget_idk"]
        return dpo_loss(
            sequence_logp(idk.logits, idk.labels)[0],
            sequence_logp(idk.ref_logits, idk.labels)[0],
            sequence_logp(real.logits, real.labels)[0],
            sequence_logp(real.ref_logits, real.labels)[0],
            self.beta,
        )


class SimNPO(_WithRetainChoice):
    """SimNPO (Fan et al. 2024): NPO without a reference model, length-normalised.

    ``L_forget = -(2/beta) * mean logsigmoid(-(beta/|y|) * logp(y|x) - margin)``.

    Args:
        beta: inverse temperature (4.5 in the paper).
        margin: the reward margin gamma_m (open-unlearning writes it as delta = gamma_m / beta).
        retain_loss: retain term: ``none``, ``nll`` or ``kl``.
    """

    forget_mean: ClassVar[MeanOver] = "sequences"

    def __init__(self, beta: float = 4.5, margin: float = 0.0, retain_loss: RetainLoss = "nll", **kwargs: Any) -> None:  # pragma: no mutate block
        super().__init__(retain_loss=retain_loss, **kwargs)
        self.beta, self.margin = beta, margin

    def forget_loss(self, out: dict[str, PartOutput]) -> Tensor:
        f = out["forget"]
        logp, lengths = sequence_logp(f.logits, f.labels)
        return simnpo_loss(logp, lengths, self.beta, self.margin)
