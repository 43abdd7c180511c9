"""The evaluation of a composition of offset exports, ``z_L + sum_i alpha_i (z_S_i - z_S0)``, as ``test`` runs it.

``test`` evaluates one trained module; a composition of several requests' offsets is no module but an
:class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel`, so this evaluates it with the same parts ``test``
uses: the data module's evaluation sets and loader (:class:`~lightning_unlearn.data.datamodule.UnlearnDataModule`,
built from the step's ``data`` options), the TOFU or MUSE metric objects fed batch by batch
(:class:`~lightning_unlearn.evaluation.tofu.TofuEvaluation`, :class:`~lightning_unlearn.evaluation.muse.MuseEvaluation`),
greedy generation cut at the model's stop ids, and the lm-eval tasks through
:class:`~lightning_unlearn.harness.model.UnlearnedLM`. It writes ``<BENCHMARK>_SUMMARY.json`` and
``<BENCHMARK>_EVAL.json`` in ``test``'s layout, so a composition's results read like any step's.
``tests/unit/sequence/test_sequence.py`` checks that one export evaluated here gives ``test``'s numbers for its
checkpoint.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json

__all__ = ["evaluate_composition"]


def evaluate_composition(exports: Sequence[str | os.PathLike], data: Mapping[str, Any], model: Mapping[str, Any],
                         out: str | os.PathLike, retain_reference: str | None = None) -> dict[str, Any]:
    """Evaluate the composition of ``exports`` on the data ``test`` would serve with options ``data`` (the
    ``UnlearnDataModule`` arguments, ``lm_eval_*`` included) and write its summary and per-sample report under
    ``out``; returns the summary (with ``all_finite`` and ``non_finite``, as ``test`` writes it).

    ``model``: the step's ``model.init_args`` options; ``max_new_tokens`` (generation length, 0: no ROUGE) and the
    dtypes are read. ``retain_reference``: a retain model's ``*_EVAL.json`` (forget quality, privleak).

    Raises:
        ValueError: exports that do not compose (different large or reference models), an evaluation other than
            ``tofu`` or ``muse``.
        FileNotFoundError: an export or a model it names is missing.
    """
    from ..data.datamodule import UnlearnDataModule
    from ..deploy.unlearned import UnlearnedModel
    from ..evaluation.passes import DEFAULT_TOKEN_BUDGET
    from ..evaluation.report import non_finite
    from ..offset.generation import decode_answers

    accepted = set(inspect.signature(UnlearnDataModule.__init__).parameters) - {"self"}
    options = {k: v for k, v in data.items() if k in accepted}
    datamodule = UnlearnDataModule(**options)
    h = datamodule.hparams
    if h.evaluation not in ("tofu", "muse"):
        raise ValueError(f"a composition is evaluated with data.evaluation tofu or muse, not {h.evaluation!r}.")
    unlearned = UnlearnedModel.from_export(
        [str(e) for e in exports], large_dtype=model.get("large_dtype"), small_dtype=model.get("small_dtype"),
        template=h.template, use_chat_template=h.use_chat_template, max_length=h.max_length,
        trust_remote_code=bool(model.get("trust_remote_code", False)),
        device="cuda" if torch.cuda.is_available() else "cpu")
    datamodule.connect(unlearned.tokenizer)
    datamodule.setup("test")
    specs = datamodule.eval_specs()
    evaluation = _evaluation(h.evaluation, [s.name for s in specs], retain_reference,
                             int(model.get("max_new_tokens", 200)),
                             datamodule.eval_token_budget() or DEFAULT_TOKEN_BUDGET)
    max_new_tokens = int(model.get("max_new_tokens", 200))

    def generate(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str | None]:
        new = unlearned.generate_ids(input_ids, attention_mask, max_new_tokens)
        return list(decode_answers(unlearned.tokenizer, new, unlearned.stop_ids))

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return unlearned.logits(input_ids, attention_mask)

    with torch.no_grad():
        for loader in datamodule.test_dataloader():
            for batch in loader:
                for part in batch["parts"]:
                    evaluation.update(_to(part, unlearned.device), logits, generate if max_new_tokens > 0 else None)
    summary, report = evaluation.compute()
    summary.update(_lm_eval(unlearned, h))
    found = non_finite(summary, report, getattr(evaluation, "sets_of", lambda key: ()))
    summary = {"alpha": unlearned.composition.alphas, **summary, "all_finite": not found["metrics"],
               "non_finite": found}
    name = evaluation.benchmark
    atomic_write_json(Path(out) / f"{name}_SUMMARY.json", summary)
    atomic_write_json(Path(out) / f"{name}_EVAL.json", report)
    return summary


def _evaluation(benchmark: str, sets: list[str], reference: str | None, max_new_tokens: int, budget: int) -> Any:
    if benchmark == "muse":
        from ..evaluation.muse import MuseEvaluation, MuseReference

        return MuseEvaluation(sets, MuseReference.from_file(reference) if reference else None, max_new_tokens, budget)
    from ..evaluation.tofu import RetainReference, TofuEvaluation

    return TofuEvaluation(sets, RetainReference.from_file(reference) if reference else None, token_budget=budget)


def _to(value: Any, device: torch.device) -> Any:
    """A batch part with its tensors on ``device`` (nested dicts and lists kept)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _lm_eval(unlearned: Any, h: Mapping[str, Any]) -> dict[str, float]:
    """The data options' lm-eval tasks on the composition, as ``task/metric`` (``{}`` without tasks)."""
    if not h.get("lm_eval_tasks"):
        return {}
    from ..harness.hooks import LmEvalSettings
    from ..harness.model import UnlearnedLM
    from ..harness.run import evaluate, flat_metrics

    settings = LmEvalSettings.from_datamodule(type("Data", (), {"hparams": h})())
    lm = UnlearnedLM(model=unlearned, batch_size=settings.batch_size)
    results = evaluate(lm, list(settings.tasks), include_path=settings.include_path, limit=settings.limit,
                       num_fewshot=settings.num_fewshot, bootstrap_iters=0)
    return flat_metrics(results)
