"""LLMU (Yao, Xu & Liu, "Large Language Model Unlearning", 2023): ascent, random mismatch, KL to the original.

Gradient ascent alone drives the model anywhere that makes the forget answers unlikely, often to
gibberish; LLMU adds a *random mismatch* term (learn the forget questions paired with answers taken from
normal data, so the model answers them with something unrelated rather than degenerating) and a KL term
that keeps the model's distribution on normal data close to the original. Training stops early once the
forget NLL exceeds a bound (the paper's stopping rule), since ascent is unbounded.

Differences from the public code (kevinyaobytedance/llm_unlearn), on purpose:

- the random-answer NLL is taken on the answer tokens only: the public code's answer start is
  ``len()`` of a tokenizer output (its number of fields), so it trains on the question too;
- each forget question draws its own K distinct answers (the public code draws K for the whole batch);
- NLLs are token means over the optimizer step as for every loss here (the public code averages per-sequence
  means), and the KL is ``kl_on_labelled`` on retain answer tokens (the public code's cross-entropy to
  the original, same gradient, averages over every position, prompt and padding included);
- the stop bound is checked after every optimizer step, on the step's forget NLL: the public loop compares
  the *negated* NLL with it and only between passes over the data, so it never stops there.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from ..losses.functional import kl_on_labelled, nll_mean
from .base import PartOutput, RetainLoss, UnlearnModule, with_step_loss
from .divergence import ForgetNLLBound


def llmu_objective(
    forget: PartOutput, mismatch: PartOutput, retain: PartOutput, eps1: float = 0.5, eps2: float = 1.0,
    eps3: float = 1.0,
) -> dict[str, Tensor]:
    """``eps1 * (-NLL(forget)) + eps2 * NLL(mismatch) + eps3 * KL(p_ref || p)_retain``.

    ``forget`` holds the forget examples, ``mismatch`` the forget questions with random answers and
    ``retain`` normal data with the reference logits. NLLs are means over labelled (answer) tokens, the
    KL is averaged over the retain answer tokens. Returns the total ``loss`` and its unweighted terms:
    ``forget_loss = -NLL(forget)`` (as in GA), ``forget_nll`` (what the stop bound reads),
    ``random_loss`` and ``retain_loss``.
    """
    forget_nll = nll_mean(forget.logits, forget.labels)
    random_nll = nll_mean(mismatch.logits, mismatch.labels)
    retain_kl = kl_on_labelled(retain.ref_logits, retain.logits, retain.labels)
    return {
        "loss": -eps1 * forget_nll + eps2 * random_nll + eps3 * retain_kl,
        "forget_loss": -forget_nll,
        "forget_nll": forget_nll,
        "random_loss": random_nll,
        "retain_loss": retain_kl,
    }


class LLMU(ForgetNLLBound, UnlearnModule):
    """LLMU: ``L = gamma * (-NLL(forget)) + random_weight * NLL(forget q, random a) + retain_weight * KL``.

    The paper's ``eps1, eps2, eps3`` are ``gamma`` (the base's forget weight, 0.5 here),
    ``random_weight`` and ``retain_weight`` (the base's retain weight); the KL is
    ``KL(p_ref || p)`` on retain answer tokens, ``p_ref`` being the large model in offset mode and the
    frozen copy in direct mode, i.e. the original model in both. The random answers come from the data
    module's answer pool (the retain split's answers unless ``data.answer_pool_split`` names another),
    ``num_random_answers`` distinct ones per forget question, and only their tokens are labelled.

    Args:
        gamma: eps1, weight of the negated NLL on forget answers.
        random_weight: eps2, weight of the NLL of forget questions paired with random answers.
        retain_weight: eps3, weight of the KL to the original model on retain data.
        num_random_answers: K, random answers per forget question (each is one more sequence per step).
        stop_forget_nll: stop training once the forget NLL of an optimizer step (mean over its forget answer
            tokens on every device) exceeds this, as the paper does; the step that reaches it still applies its
            update (:class:`.divergence.ForgetNLLBound`, shared with GA, GD, KL and EUL). ``null``: run to
            ``max_steps``/``max_epochs``.
    """

    needs_reference: ClassVar[bool] = True
    extra_parts: ClassVar[tuple[str, ...]] = ("forget_random",)
    retain_loss: RetainLoss = "kl"

    def __init__(
        self,
        gamma: float = 0.5,
        random_weight: float = 1.0,
        retain_weight: float = 1.0,
        num_random_answers: int = 5,
        stop_forget_nll: float | None = None,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if num_random_answers < 1:
            raise ValueError(f"num_random_answers must be at least 1, got {num_random_answers}.")
        super().__init__(gamma=gamma, retain_weight=retain_weight, **kwargs)

    @property
    def data_options(self) -> dict[str, Any]:
        return {"num_random_answers": self.hparams.num_random_answers}

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The three LLMU terms from one forward pass over forget, random-answer and retain rows, each a token
        mean of its part; while training also ``step_loss``, the objective with token means over the step."""
        h = self.hparams
        out = self.run_parts(batch, with_reference=True)
        forget, mismatch, retain = out["forget"], out["forget_random"], out["retain"]
        losses = llmu_objective(forget, mismatch, retain, h.gamma, h.random_weight, h.retain_weight)
        self.note_forget_nll(forget, losses["forget_nll"])
        terms = [(-h.gamma * losses["forget_nll"], forget, "tokens"),
                 (h.random_weight * losses["random_loss"], mismatch, "tokens"),
                 (h.retain_weight * losses["retain_loss"], retain, "tokens")]
        return with_step_loss(losses, terms)
