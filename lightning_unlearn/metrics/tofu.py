"""TOFU metrics as ``torchmetrics.Metric`` objects, so per-sample values gather across DDP ranks.

Each metric keeps its per-sample values in a ``cat`` list state. ``compute()`` returns the
aggregate; ``per_sample()`` returns the gathered per-sample tensor that produced it (needed to
write per-sample results and, for the truth ratio, to compute forget quality). Across ranks the
per-sample order is rank by rank, not dataset order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_unlearn.metrics import functional as F


class _PerSampleMean(Metric):
    """Collects one float per sample; ``compute`` is their mean unless a subclass says otherwise."""

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self._per_sample: Tensor | None = None

    def _append(self, values: Tensor) -> None:
        self.values.append(values.detach().to(torch.float64).flatten())

    def _aggregate(self, values: Tensor) -> Tensor:
        return values.mean()

    def compute(self) -> Tensor:
        values = dim_zero_cat(self.values)
        self._per_sample = values
        return self._aggregate(values)

    def per_sample(self) -> Tensor:
        """Per-sample values behind the current ``compute()`` (gathered over ranks)."""
        self.compute()
        assert self._per_sample is not None
        return self._per_sample


class AnswerProbability(_PerSampleMean):
    """``*_Q_A_Prob``: mean over samples of ``exp(-mean_nll)``."""

    def update(self, mean_nll: Tensor) -> None:
        self._append(torch.exp(-mean_nll.to(torch.float64)))


class NormalisedAnswerProbability(_PerSampleMean):
    """``*_Q_A_Prob_normalised``: mean of ``p_true / (p_true + sum_k p_perturbed_k)``."""

    higher_is_better = True

    def update(self, true_mean_nll: Tensor, perturbed_mean_nll: Tensor) -> None:
        p_true = torch.exp(-true_mean_nll.to(torch.float64))
        p_perturbed = torch.exp(-perturbed_mean_nll.to(torch.float64))
        self._append(F.normalised_probability(p_true, p_perturbed))


class TruthRatio(_PerSampleMean):
    """``*_Truth_Ratio``; ``per_sample()`` gives the raw ratios R that forget quality compares.

    ``aggregation="forget"``: mean(min(R, 1/R)); ``"true_better"``: mean(max(0, 1 - R)).
    """

    def __init__(self, aggregation: Literal["forget", "true_better"], **kwargs: object) -> None:
        if aggregation not in ("forget", "true_better"):
            raise ValueError(f"aggregation must be 'forget' or 'true_better', got {aggregation!r}")
        super().__init__(**kwargs)
        self.aggregation = aggregation

    def update(self, correct_mean_nll: Tensor, perturbed_mean_nll: Tensor) -> None:
        self._append(
            F.truth_ratio(correct_mean_nll.to(torch.float64), perturbed_mean_nll.to(torch.float64))
        )

    def _aggregate(self, values: Tensor) -> Tensor:
        if self.aggregation == "forget":
            return F.truth_ratio_forget(values)
        return F.truth_ratio_true_better(values)


class RougeLRecall(_PerSampleMean):
    """``*_Q_A_ROUGE``: mean ROUGE-L recall of generations against reference answers."""

    def update(self, preds: Sequence[str], refs: Sequence[str]) -> None:
        self._append(torch.tensor(F.rouge_l_recall(preds, refs), dtype=torch.float64, device=self.device))


class ExactMemorization(_PerSampleMean):
    """Mean of per-sample exact memorization values (see ``functional.exact_memorization``)."""

    def update(self, values: Tensor) -> None:
        self._append(values)


class ExtractionStrength(_PerSampleMean):
    """Mean of per-sample extraction strengths (see ``functional.extraction_strength``)."""

    def update(self, values: Tensor) -> None:
        self._append(values)


class MembershipInferenceAUC(_PerSampleMean):
    """AUC of loss-like attack scores, forget samples (label 0) against holdout samples (label 1).

    ``per_sample()`` gives the scores and ``holdout_mask()`` which of them are holdout samples.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("is_holdout", default=[], dist_reduce_fx="cat")
        self._holdout_mask: Tensor | None = None

    def update(self, scores: Tensor, is_holdout: Tensor) -> None:
        """Add attack scores; labels are kept as floats as not every backend gathers bools."""
        if scores.shape != is_holdout.shape:
            raise ValueError(
                f"scores {tuple(scores.shape)} vs is_holdout {tuple(is_holdout.shape)}"
            )
        self._append(scores)
        self.is_holdout.append(is_holdout.detach().to(torch.float64).flatten())

    def compute(self) -> Tensor:
        scores = dim_zero_cat(self.values)
        holdout = dim_zero_cat(self.is_holdout) > 0.5
        self._per_sample, self._holdout_mask = scores, holdout
        auc = F.mia_auc(scores[~holdout], scores[holdout])
        return torch.tensor(auc, dtype=torch.float64, device=scores.device)

    def holdout_mask(self) -> Tensor:
        """Boolean tensor aligned with ``per_sample()``: True for holdout samples."""
        self.compute()
        assert self._holdout_mask is not None
        return self._holdout_mask
