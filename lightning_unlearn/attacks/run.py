"""The three attacks end to end on one export: load, measure, attack, measure again, and the report ``ATTACK.json``.

The report (one JSON object) holds ``attack``, ``export``, ``mode`` (``offset`` or ``direct``), ``settings``,
``data`` (splits and row counts), ``original`` (the forget metrics of the model before unlearning: in offset mode the
large model alone, alpha = 0, which unlearning never changed; in direct mode the ``--original`` model if given, else
None), ``before`` (the unlearned model) and ``after`` (a list: one entry per attacked variant, its forget metrics and
``recovered``: the share of the gap from ``before`` back to ``original`` that the attack closed, per metric).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..deploy.unlearned import UnlearnedModel
from ..evaluation.tofu import RetainReference
from ..models.loading import freeze, load_causal_lm
from .forget import ForgetData, forget_metrics, load_forget_data
from .quantize import BITS, quantize_weights
from .relearn import relearn, trainable_part

__all__ = ["ATTACKS", "AttackSettings", "recovered", "run_attack"]

ATTACKS = ("mia", "quantize", "relearn")
RECOVERY_KEYS = ("forget_Q_A_Prob", "forget_nll", "forget_truth_ratio", "mia_loss", "mia_min_k")


@dataclass
class AttackSettings:
    """What an attack runs on and with (the command's options; see ``lightning-unlearn attack --help``)."""

    dataset: str = "bundled"
    forget_split: str = "forget01_perturbed"
    holdout_split: str = "holdout01"
    limit: int | None = None
    retain_eval: str | None = None
    reference_model: str | None = None
    original: str | None = None
    batch_size: int = 8
    min_k: float = 0.4
    gradnorm_p: float = 2.0
    bits: list[str] = field(default_factory=lambda: list(BITS))
    group_size: int = 32
    relearn_steps: list[int] = field(default_factory=lambda: [1, 5, 20])
    relearn_rows: int = 10
    relearn_lr: float = 1e-3
    relearn_batch_size: int = 4
    seed: int = 0


def recovered(before: dict[str, Any], after: dict[str, Any], original: dict[str, Any] | None) -> dict[str, float]:
    """``(after - before) / (original - before)`` per metric of :data:`RECOVERY_KEYS` present in all three: 0 the
    attack changed nothing, 1 it brought the metric back to the model before unlearning (can exceed 1 or be < 0).
    Metrics whose gap is below 1e-12, or not finite, are left out."""
    if original is None:
        return {}
    out = {}
    for key in RECOVERY_KEYS:
        values = [d.get(key) for d in (before, after, original)]
        if any(v is None or not math.isfinite(v) for v in values):
            continue
        b, a, o = values
        if abs(o - b) > 1e-12:
            out[key] = (a - b) / (o - b)
    return out


class _Run:
    """One export's attack: the model loader, the data, the measure."""

    def __init__(self, export: str, settings: AttackSettings) -> None:
        self.export, self.settings = export, settings
        self.model = self.load()
        self.direct = self.model.composition.is_direct
        self.data = load_forget_data(settings.dataset, settings.forget_split, settings.holdout_split, settings.limit)
        self.retain = RetainReference.from_file(settings.retain_eval) if settings.retain_eval else None
        self.reference: nn.Module | None = (freeze(load_causal_lm(settings.reference_model, "float32",
                                                                  role="the Reference attack's reference model"))
                                            if settings.reference_model else None)

    def load(self) -> UnlearnedModel:
        return UnlearnedModel.from_export(self.export)

    def measure(self, model: UnlearnedModel, data: ForgetData, gradnorm: bool = False) -> dict[str, Any]:
        s = self.settings
        grad = None
        if gradnorm:
            part = trainable_part(model)
            for p in part.parameters():
                p.requires_grad_(True)
            grad = (list(part.parameters()), s.gradnorm_p)
        try:
            return forget_metrics(model, data, logits_fn=(lambda i, m: model.combined(i, m)) if gradnorm else None,
                                  retain=self.retain, reference=self.reference, gradnorm=grad, min_k=s.min_k,
                                  batch_size=s.batch_size)
        finally:
            if grad is not None:
                for p in grad[0]:
                    p.requires_grad_(False)
                    p.grad = None

    def original(self, data: ForgetData) -> dict[str, Any] | None:
        if not self.direct:
            alphas = self.model.composition.alphas
            self.model.set_alphas([0.0] * len(alphas))
            try:
                return self.measure(self.model, data)
            finally:
                self.model.set_alphas(alphas)
        if self.settings.original is None:
            return None
        return self.measure(UnlearnedModel.from_export(self.settings.original), data)

    def report(self, attack: str, data: ForgetData, before: dict[str, Any], after: list[dict[str, Any]],
               original: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        for entry in after:
            entry["recovered"] = recovered(before, entry["metrics"], original)
        return {"attack": attack, "export": self.export, "mode": "direct" if self.direct else "offset",
                "alphas": None if self.direct else self.model.composition.alphas,
                "settings": asdict(self.settings),
                "data": {"dataset": self.settings.dataset, "forget_split": self.settings.forget_split,
                         "holdout_split": self.settings.holdout_split, "forget_rows": len(data.forget),
                         "holdout_rows": len(data.holdout), **(extra or {})},
                "original": original, "before": before, "after": after}


def _mia(run: _Run) -> dict[str, Any]:
    before = run.measure(run.model, run.data, gradnorm=True)
    return run.report("mia", run.data, before, [], run.original(run.data))


def _quantize(run: _Run) -> dict[str, Any]:
    before = run.measure(run.model, run.data)
    after = []
    for bits in run.settings.bits:
        for what in (["model"] if run.direct else ["large", "pair"]):
            model = run.load()
            parts = [model.offsets[0]] if run.direct else [model.large] if what == "large" else \
                [model.large, model.reference, *model.offsets]
            layers: dict[str, int] = {}
            for part in parts:
                if part is None:
                    continue
                for scheme, n in quantize_weights(part, bits, run.settings.group_size).items():
                    layers[scheme] = layers.get(scheme, 0) + n
            after.append({"bits": bits, "quantized": what, "layers": layers,
                          "metrics": run.measure(model, run.data)})
    return run.report("quantize", run.data, before, after, run.original(run.data))


def _relearn(run: _Run) -> dict[str, Any]:
    s = run.settings
    order = list(range(len(run.data.forget)))
    random.Random(s.seed).shuffle(order)
    if not 0 < s.relearn_rows < len(order):
        raise ValueError(f"--relearn-rows must be between 1 and {len(order) - 1} (the forget split has {len(order)} "
                         "rows; the rest measure what comes back).")
    train = [run.data.forget[i] for i in sorted(order[:s.relearn_rows])]
    rest = ForgetData([run.data.forget[i] for i in sorted(order[s.relearn_rows:])], run.data.holdout)
    before = run.measure(run.model, rest)
    after = []
    for target in (["direct"] if run.direct else ["offset", "combined"]):
        model = run.load()
        curve = relearn(model, train, s.relearn_steps, lambda m=model: run.measure(m, rest), target=target,
                        lr=s.relearn_lr, batch_size=s.relearn_batch_size, seed=s.seed)
        after += [{"target": target, "steps": point.pop("steps"), "train_loss": point.pop("train_loss"),
                   "metrics": point} for point in curve]
    return run.report("relearn", rest, before, after, run.original(rest),
                      {"relearn_rows": len(train), "measured_on": "the forget rows not trained on"})


def run_attack(attack: str, export: str, settings: AttackSettings) -> dict[str, Any]:
    """Run ``attack`` (``mia``, ``quantize`` or ``relearn``) on the export at ``export``; returns the report.

    Raises:
        ValueError: an unknown attack, or bad settings (named); FileNotFoundError: a missing export, split or file.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}.")
    run = _Run(export, settings)
    return {"mia": _mia, "quantize": _quantize, "relearn": _relearn}[attack](run)
