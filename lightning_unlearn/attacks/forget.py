"""The forget metrics an attack is judged by, measured the same way before and after it.

Per forget sample: the mean answer NLL (nats per token), ``Q_A_Prob = exp(-NLL)``, the truth ratio (paraphrased vs
perturbed answers, when the split has them) and, with the retain model's ``TOFU_EVAL.json``, forget quality (the KS
test of the truth ratios against the retain model's). Forget vs holdout: the AUC of each membership-inference score
(LOSS, ZLib, Min-K%, Min-K%++; Reference with a reference model; GradNorm where gradients are asked for). The
definitions are :mod:`lightning_unlearn.metrics.functional`'s (open-unlearning's), computed here on the
:class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel` of an export, with its prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data.sources import load_split
from ..deploy.unlearned import UnlearnedModel
from ..evaluation.tofu import RetainReference
from ..metrics import functional as F
from .mia import gradnorm_scores, reference_scores

__all__ = ["ForgetData", "LogitsFn", "forget_metrics", "load_forget_data"]

LogitsFn = Callable[[Tensor, Tensor], Tensor]
"""``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``."""


@dataclass(frozen=True)
class ForgetData:
    """The rows an attack is measured on: forget rows (``question``, ``answer``, and ``paraphrased_answer`` /
    ``perturbed_answer`` for the truth ratio when present) and holdout rows (``question``, ``answer``)."""

    forget: list[dict[str, Any]]
    holdout: list[dict[str, Any]]

    @property
    def has_truth_ratio(self) -> bool:
        return all("paraphrased_answer" in r and "perturbed_answer" in r for r in self.forget)


def load_forget_data(dataset: str, forget_split: str, holdout_split: str, limit: int | None = None) -> ForgetData:
    """Load the forget and holdout rows (``limit``: the first rows of each).

    Raises:
        FileNotFoundError, ValueError: as :func:`~lightning_unlearn.data.sources.load_split` (the split or field
            is named).
    """
    forget = load_split(dataset, forget_split, ("question", "answer"))
    holdout = load_split(dataset, holdout_split, ("question", "answer"))
    if limit is not None:
        forget, holdout = forget[:limit], holdout[:limit]
    if not forget or not holdout:
        raise ValueError(f"{forget_split if not forget else holdout_split} has no rows: the attacks need forget and "
                         "holdout rows.")
    return ForgetData(forget, holdout)


def _answer_scores(model: UnlearnedModel, logits_fn: LogitsFn, questions: Sequence[str], answers: Sequence[str],
                   batch_size: int, min_k: float, reference: nn.Module | None,
                   gradnorm: tuple[Sequence[nn.Parameter], float] | None) -> dict[str, Tensor]:
    """Per-sample scores of ``answers`` given ``questions``: mean NLL, Min-K%, Min-K%++ (and Reference, GradNorm)."""
    out: dict[str, list[Tensor]] = {}
    for start in range(0, len(questions), batch_size):
        batch = model.encode(questions[start:start + batch_size], answers[start:start + batch_size])
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        labels = batch["labels"].to(model.device)
        # open-unlearning's token-wise log-probs (Min-K%, Min-K%++, GradNorm) leave the final answer token (the
        # end of turn or EOS) out; LOSS, ZLib and Reference keep it (``functional.drop_last_answer_token``).
        trimmed = F.drop_last_answer_token(labels)
        with torch.set_grad_enabled(gradnorm is not None):
            logits = logits_fn(ids, mask)
            stats = F.answer_token_stats(logits, labels)
            if gradnorm is not None:
                params, p = gradnorm
                grad_losses = F.answer_token_stats(logits, trimmed).mean_nll
        part = {"nll": stats.mean_nll.detach(),
                "min_k": F.min_k_score(stats.token_logprobs.detach(), trimmed[:, 1:] != F.IGNORE_INDEX, min_k),
                "min_k_plus_plus": F.min_k_plus_plus_score(logits.detach(), trimmed, min_k)}
        if gradnorm is not None:
            part["gradnorm"] = gradnorm_scores(list(grad_losses), params, p)
        if reference is not None:
            with torch.no_grad():
                ref_logits = reference(input_ids=ids, attention_mask=mask).logits[..., :model.vocab_size]
            part["reference"] = reference_scores(part["nll"], F.answer_token_stats(ref_logits, labels).mean_nll)
        for key, value in part.items():
            out.setdefault(key, []).append(value.detach().cpu())
    return {key: torch.cat(values) for key, values in out.items()}


def forget_metrics(
    model: UnlearnedModel,
    data: ForgetData,
    *,
    logits_fn: LogitsFn | None = None,
    retain: RetainReference | None = None,
    reference: nn.Module | None = None,
    gradnorm: tuple[Sequence[nn.Parameter], float] | None = None,
    min_k: float = 0.4,
    batch_size: int = 8,
) -> dict[str, float | None]:
    """The forget metrics of ``model`` (or of ``logits_fn`` with ``model``'s prompts and tokenizer).

    Args:
        model: gives the prompts, tokenizer and, without ``logits_fn``, the logits.
        data: forget and holdout rows.
        logits_fn: the combined logits to score, with a graph when ``gradnorm`` is given (``model.logits`` runs
            without one).
        retain: the retain model's evaluation, for forget quality.
        reference: a causal LM for the Reference attack (open-unlearning's: the retain model).
        gradnorm: the parameters GradNorm differentiates and its p; None leaves ``mia_gradnorm`` out.
        min_k: the fraction of Min-K% and Min-K%++ (open-unlearning's 0.4).
        batch_size: rows per forward pass.

    Returns ``forget_nll``, ``forget_Q_A_Prob``, ``forget_truth_ratio`` and ``forget_quality`` (None without
    paraphrased/perturbed answers, resp. without ``retain``), ``holdout_nll``, and ``mia_loss``, ``mia_zlib``,
    ``mia_min_k``, ``mia_min_k_plus_plus``, ``mia_reference``, ``mia_gradnorm`` (AUCs, forget 0 vs holdout 1; the
    last two only when asked for). Floats; NaN where the model's logits are not finite.
    """
    logits_fn = logits_fn or model.logits
    score = lambda qs, ans, grad: _answer_scores(model, logits_fn, qs, ans, batch_size, min_k, reference,  # noqa: E731
                                                 gradnorm if grad else None)
    f_q, f_a = [r["question"] for r in data.forget], [r["answer"] for r in data.forget]
    h_q, h_a = [r["question"] for r in data.holdout], [r["answer"] for r in data.holdout]
    forget, holdout = score(f_q, f_a, True), score(h_q, h_a, True)
    result: dict[str, float | None] = {
        "forget_nll": float(forget["nll"].mean()),
        "forget_Q_A_Prob": float(torch.exp(-forget["nll"]).mean()),
        "holdout_nll": float(holdout["nll"].mean()),
    }
    ratios = None
    if data.has_truth_ratio:
        correct = score(f_q, [r["paraphrased_answer"] for r in data.forget], False)["nll"]
        perturbed_rows = [r["perturbed_answer"] for r in data.forget]
        k = min(len(p) for p in perturbed_rows)
        flat_q = [q for q in f_q for _ in range(k)]
        flat_a = [a for p in perturbed_rows for a in p[:k]]
        perturbed = score(flat_q, flat_a, False)["nll"].reshape(len(f_q), k)
        ratios = F.truth_ratio(correct, perturbed)
        result["forget_truth_ratio"] = float(F.truth_ratio_forget(ratios))
    else:
        result["forget_truth_ratio"] = None
    result["forget_quality"] = (F.forget_quality(ratios, retain.forget_truth_ratios)
                                if retain is not None and ratios is not None else None)
    result["mia_loss"] = F.mia_auc(forget["nll"], holdout["nll"])
    result["mia_zlib"] = F.mia_auc(F.zlib_score(forget["nll"], f_a), F.zlib_score(holdout["nll"], h_a))
    result["mia_min_k"] = F.mia_auc(forget["min_k"], holdout["min_k"])
    result["mia_min_k_plus_plus"] = F.mia_auc(forget["min_k_plus_plus"], holdout["min_k_plus_plus"])
    if reference is not None:
        result["mia_reference"] = F.mia_auc(forget["reference"], holdout["reference"])
    if gradnorm is not None:
        result["mia_gradnorm"] = F.mia_auc(forget["gradnorm"], holdout["gradnorm"])
    return result
