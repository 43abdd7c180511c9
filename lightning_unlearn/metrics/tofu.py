"""TOFU metrics as ``torchmetrics.Metric`` objects whose per-sample values gather across DDP ranks.

Each metric keeps its per-sample values, and the dataset index of each sample, in ``cat`` list states.
``compute()`` gathers them from every rank, keeps one value per index (the first gathered) in index
order, and aggregates those; ``per_sample()`` and ``sample_index()`` return what it aggregated.

Why the index: under DDP the distributed sampler pads an evaluation set that the number of processes
does not divide by repeating samples, so that every rank runs as many batches. Without the index the
repeats would enter every mean and the forget-quality KS sample (issue 10 reports, on 15 samples and 2
processes, a forget truth ratio of 0.351 instead of 0.305). De-duplicating by index makes every result equal the
single-process one whatever the number of devices and however the sampler pads or orders. Updates
without ``index`` keep every value in arrival order (single-process use, where nothing is repeated).

All states are float64 (indices are exact up to 2**53), also the empty one torchmetrics substitutes
on a rank that saw no sample, so every rank gathers the same dtype.

A per-sample value that is not finite (a sample scored from non-finite logits: NaN) makes the aggregate NaN:
no aggregate here skips or ranks a NaN as a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_unlearn.metrics import functional as F


def first_occurrences(keys: Tensor) -> Tensor:
    """Positions of the first row of each distinct key, ordered by key, shape [U].

    ``keys`` is [N] or [N, K] (compared row-wise, ordered lexicographically). Used to drop the
    samples a distributed sampler repeated and to put the rest in dataset order.
    """
    rows = keys.reshape(keys.shape[0], -1)
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    positions = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((unique.shape[0],), rows.shape[0], dtype=positions.dtype, device=rows.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A gathered ``cat`` state as one float64 tensor; empty when no rank saw a sample."""
    if isinstance(state, list) and not state:
        return torch.zeros(0, dtype=torch.float64)
    return dim_zero_cat(state).to(torch.float64)


class PerSampleMean(Metric):
    """One float per sample, keyed by dataset index; ``compute`` is the mean over distinct samples (NaN if a
    value is NaN).

    ``update(values, index=None)``: ``values`` [B] (any float dtype), ``index`` [B] integer dataset
    indices. Subclasses turn their inputs into per-sample values and may change the aggregate.

    Raises:
        ValueError: ``index`` does not match ``values`` in size, or some updates had an index and
            others had none.
    """

    is_differentiable = False
    higher_is_better: bool | None = None
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)
        self._per_sample: Tensor | None = None
        self._index: Tensor | None = None

    def update(self, values: Tensor, index: Tensor | None = None) -> None:
        self._append(values, index)

    def _append(self, values: Tensor, index: Tensor | None) -> None:
        values = values.detach().to(torch.float64).flatten()
        if index is None:
            index = torch.full_like(values, float("nan"))
        else:
            index = torch.as_tensor(index).detach().to(device=values.device, dtype=torch.float64).flatten()
            if index.shape != values.shape:
                raise ValueError(f"{values.numel()} values but {index.numel()} indices")
        self.values.append(values)
        self.index.append(index)

    def _keep(self, index: Tensor, extra_key: Tensor | None = None) -> Tensor:
        """Positions to aggregate: all when no sample has an index, else one per distinct key."""
        missing = torch.isnan(index)
        if bool(missing.all()):
            return torch.arange(index.numel(), device=index.device)
        if bool(missing.any()):
            raise ValueError(f"{type(self).__name__}: give an index with every update or with none")
        keys = index if extra_key is None else torch.stack([extra_key, index], dim=-1)
        return first_occurrences(keys)

    def _aggregate(self, values: Tensor) -> Tensor:
        return values.mean()

    def compute(self) -> Tensor:
        values, index = _cat(self.values), _cat(self.index)
        keep = self._keep(index)
        self._per_sample, self._index = values[keep], index[keep]
        return self._aggregate(self._per_sample)

    def per_sample(self) -> Tensor:
        """Per-sample values behind the current ``compute()``: gathered over ranks, one per index."""
        self.compute()
        assert self._per_sample is not None
        return self._per_sample

    def sample_index(self) -> list[int | None]:
        """Dataset index of each entry of ``per_sample()`` (None for updates without an index)."""
        self.compute()
        assert self._index is not None
        return [None if i != i else int(i) for i in self._index.tolist()]


class AnswerProbability(PerSampleMean):
    """``*_Q_A_Prob``: mean over samples of ``exp(-mean_nll)`` (NaN for an NLL that is not finite)."""

    def update(self, mean_nll: Tensor, index: Tensor | None = None) -> None:
        nll = mean_nll.to(torch.float64)
        self._append(torch.exp(-nll).masked_fill(~torch.isfinite(nll), float("nan")), index)


class NormalisedAnswerProbability(PerSampleMean):
    """``*_Q_A_Prob_normalised``: mean of ``p_true / (p_true + sum_k p_perturbed_k + 1e-10)``."""

    higher_is_better = True

    def update(self, true_mean_nll: Tensor, perturbed_mean_nll: Tensor, index: Tensor | None = None) -> None:
        p_true = torch.exp(-true_mean_nll.to(torch.float64))
        p_perturbed = torch.exp(-perturbed_mean_nll.to(torch.float64))
        self._append(F.normalised_probability(p_true, p_perturbed), index)


class TruthRatio(PerSampleMean):
    """``*_Truth_Ratio``; ``per_sample()`` gives the ratios R that forget quality compares.

    ``aggregation="forget"``: mean(min(R, 1/(R + 1e-10))); ``"true_better"``: mean(max(0, 1 - R)).
    ``exact=False`` is open-unlearning's R (``functional.truth_ratio``, with its 1e-10), under
    open-unlearning's names; ``exact=True`` the ratio without it (``functional.truth_ratio_exact``).
    """

    def __init__(
        self, aggregation: Literal["forget", "true_better"], exact: bool = False, **kwargs: object
    ) -> None:
        if aggregation not in ("forget", "true_better"):
            raise ValueError(f"aggregation must be 'forget' or 'true_better', got {aggregation!r}")
        super().__init__(**kwargs)
        self.aggregation, self.exact = aggregation, exact

    def update(self, correct_mean_nll: Tensor, perturbed_mean_nll: Tensor, index: Tensor | None = None) -> None:
        ratio = F.truth_ratio_exact if self.exact else F.truth_ratio
        self._append(ratio(correct_mean_nll.to(torch.float64), perturbed_mean_nll.to(torch.float64)), index)

    def _aggregate(self, values: Tensor) -> Tensor:
        if self.aggregation == "forget":
            return F.truth_ratio_forget(values)
        return F.truth_ratio_true_better(values)


class RougeLRecall(PerSampleMean):
    """``*_Q_A_ROUGE``: mean ROUGE-L recall of generations against reference answers; a generation ``None`` (it
    read non-finite logits) scores NaN."""

    def update(self, preds: Sequence[str | None], refs: Sequence[str], index: Tensor | None = None) -> None:
        scores = torch.tensor(F.rouge_l_recall(preds, refs), dtype=torch.float64, device=self.device)
        self._append(scores, index)


class ExactMemorization(PerSampleMean):
    """Mean of per-sample exact memorization values (see ``functional.exact_memorization``).

    ``update(values, index=None, has_answer=None)``: ``has_answer`` [B] bool marks the samples that have answer
    tokens; the others (their value is NaN: EM is undefined without tokens) are left out of the mean, as
    open-unlearning's None. Every other NaN, a sample scored from non-finite logits, makes the mean NaN: a
    ``nanmean`` would drop it and report the broken samples' absence as a clean number. Without ``has_answer``
    every sample counts.

    Raises:
        ValueError: ``has_answer`` does not match ``values`` in size.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("has_answer", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)
        self._has_answer: Tensor | None = None

    def update(self, values: Tensor, index: Tensor | None = None, has_answer: Tensor | None = None) -> None:
        if has_answer is None:
            has_answer = torch.ones(values.shape, dtype=torch.bool)
        if has_answer.numel() != values.numel():
            raise ValueError(f"{values.numel()} values but {has_answer.numel()} has_answer flags")
        self._append(values, index)
        self.has_answer.append(has_answer.detach().to(device=self.values[-1].device, dtype=torch.float64).flatten())

    def compute(self) -> Tensor:
        values, index, has_answer = _cat(self.values), _cat(self.index), _cat(self.has_answer) > 0.5
        keep = self._keep(index)
        self._per_sample, self._index, self._has_answer = values[keep], index[keep], has_answer[keep]
        return self._per_sample[self._has_answer].mean()

    def defined(self) -> Tensor:
        """Boolean tensor aligned with ``per_sample()``: True for the samples with answer tokens (EM defined)."""
        self.compute()
        assert self._has_answer is not None
        return self._has_answer


class ExtractionStrength(PerSampleMean):
    """Mean of per-sample extraction strengths (see ``functional.extraction_strength``)."""


class MembershipInferenceAUC(PerSampleMean):
    """AUC of loss-like attack scores, forget samples (label 0) against holdout samples (label 1).

    ``per_sample()`` gives the scores (forget samples first, each group in index order when indexed)
    and ``holdout_mask()`` which of them are holdout samples. A sample is identified by its group and
    index, since forget and holdout indices overlap.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("is_holdout", default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)
        self._holdout_mask: Tensor | None = None

    def update(self, scores: Tensor, is_holdout: Tensor, index: Tensor | None = None) -> None:
        """Add attack scores; labels are kept as floats as not every backend gathers bools."""
        if scores.shape != is_holdout.shape:
            raise ValueError(
                f"scores {tuple(scores.shape)} vs is_holdout {tuple(is_holdout.shape)}"
            )
        self._append(scores, index)
        self.is_holdout.append(is_holdout.detach().to(device=self.values[-1].device, dtype=torch.float64).flatten())

    def compute(self) -> Tensor:
        scores, index = _cat(self.values), _cat(self.index)
        holdout = _cat(self.is_holdout)
        keep = self._keep(index, extra_key=holdout)
        scores, holdout = scores[keep], holdout[keep] > 0.5
        self._per_sample, self._index, self._holdout_mask = scores, index[keep], holdout
        auc = F.mia_auc(scores[~holdout], scores[holdout])
        return torch.tensor(auc, dtype=torch.float64, device=scores.device)

    def holdout_mask(self) -> Tensor:
        """Boolean tensor aligned with ``per_sample()``: True for holdout samples."""
        self.compute()
        assert self._holdout_mask is not None
        return self._holdout_mask
