"""The LightningDataModule for forget/retain unlearning data."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .tofu_eval import (
    AnswerDataset,
    EvalCollection,
    EvalDataset,
    EvalSetSpec,
    collate_answers,
    collate_collection,
    tofu_eval_specs,
)
from .muse_eval import MuseEvalDataset, MuseSetSpec, collate_muse, muse_eval_specs
from .tokenizer import load_tokenizer
from .datasets import PairedDataset
from .formatting import DEFAULT_TEMPLATE, Encoded, PromptFormatter, collate_parts
from .steps import StepDataset, StepSampler, collate_steps
from .rows import Record
from .sources import BUNDLED, load_refusals, load_rows, load_split, require_fields
from .muse_sources import BUILD_HINT, is_muse
from .text import TextCorpus, chunk_corpus, is_text, text_corpus


class UnlearnDataModule(L.LightningDataModule):
    """Forget and retain data, question/answer rows or raw text, from TOFU, MUSE or any folder of JSON Lines files.

    An epoch is one pass over the forget set; each forget example comes with the parts the loss asks
    for (a random retain example, a random refusal, random answers). The tokenizer normally arrives
    from the model through :meth:`connect`, so both always use the same one.

    Args:
        forget_split: split to forget, e.g. ``forget01``, ``forget05``, ``forget10``; a list is concatenated
            (for fine-tuning, where this is the training data); ``name[a:b]`` takes rows a to b.
        retain_split: split to keep, e.g. ``retain99`` (goes with ``forget01``); ``null`` for none.
        dataset: ``bundled`` (the TOFU files shipped with the package), a local folder of
            ``<split>.jsonl`` files (question/answer rows, or text documents ``{"text": ...}``; also
            ``<split>.txt`` or a ``<split>/`` folder of ``.txt`` files), a Hugging Face hub dataset id such as
            ``locuslab/TOFU``, or MUSE: ``muse-bench/MUSE-News``, ``muse-bench/MUSE-Books`` or a folder in
            their layout (``<folder>/<config>/<split>.jsonl``; the training splits are ``raw`` ones:
            ``forget``, ``retain1``, ...; see :mod:`~lightning_unlearn.data.muse_sources`).
        tokenizer: tokenizer name or path; ``null`` takes the model's (the usual case).
        batch_size: forget examples per step and device (each brings its retain partner).
        eval_batch_size: samples per evaluation batch (validation and ``test``): the rows generated together for
            ROUGE, and the answer variants pooled into teacher-forced passes (those are cut by
            ``eval_token_budget``, so the batch does not set their size). ``null`` uses ``batch_size``. The default,
            32 (open-unlearning's), evaluated 1.4x faster than 8 on memorised tiny models (fewer decoding steps);
            64 gained 2-13% more at twice the generation memory (KV caches), so it is not the default. Every
            batch gives the same values up to float rounding (``docs/results/benchmarks.md``).
        max_length: longest sequence in tokens; longer answers are truncated with a warning, text documents are
            cut into windows of this many tokens.
        text_stride: tokens between the starts of a text document's windows; ``null`` means ``max_length`` (no
            overlap). Shorter strides give each window context from the previous one; every token is still a
            target once (see :mod:`~lightning_unlearn.data.text`).
        question_key: field holding the question.
        answer_key: field holding the answer.
        template: plain prompt template, used when the tokenizer has no chat template.
        use_chat_template: ``null`` uses the tokenizer's chat template when it has one.
        evaluation: what validation and ``test`` run: ``tofu`` (the full TOFU evaluation on the
            ``*_perturbed`` sets, real authors, world facts and holdout), ``muse`` (MUSE's verbatim and
            knowledge memorization, privacy leakage and extraction strength, on a MUSE dataset) or ``loss``
            (forget and retain NLL only, for data without either benchmark's evaluation files).
        eval_forget_split: forget evaluation split; ``null`` means ``<forget_split>_perturbed``.
        eval_holdout_split: holdout split for membership inference; ``null`` means ``holdoutXX`` matching
            the forget split's number.
        eval_subset: evaluate only the first N samples of each set, for speed (``null``: all).
        eval_token_budget: most padded tokens (rows x longest row) per teacher-forced evaluation pass: the answer
            variants of an evaluation batch are sorted by length and cut into passes of at most this many tokens
            (:mod:`~lightning_unlearn.evaluation.passes`), so a larger ``eval_batch_size`` (fewer, larger generation
            batches) costs no padding; ``null``: 2048 (``passes.DEFAULT_TOKEN_BUDGET``).
        answer_pool_split: split whose answers LLMU pairs with the forget questions as random answers
            (``null``: the retain split's answers).
        num_workers: DataLoader workers.
        seed: seed of the shuffling and of the forget/retain pairing.
        lm_eval_tasks: lm-evaluation-harness tasks run beside the evaluation above in validation and ``test``,
            logged as ``val/<task>/<metric>`` (e.g. ``[arc_easy, hellaswag]``; ``tofu_general`` is the package's
            offline pair of multiple-choice tasks); ``null``: none. See :mod:`lightning_unlearn.harness.hooks`.
        lm_eval_include_path: extra folder of lm-eval task YAML (lm-eval's ``--include_path``).
        lm_eval_limit: documents per lm-eval task (a fraction when below 1); ``null``: all.
        lm_eval_num_fewshot: few-shot examples per lm-eval prompt; ``null``: each task's default.
        lm_eval_batch_size: requests per forward pass in lm-eval; ``null`` uses ``eval_batch_size``.
    """

    def __init__(
        self,
        forget_split: str | list[str] = "forget10",
        retain_split: str | None = "retain90",
        dataset: str = BUNDLED,
        tokenizer: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = 32,
        max_length: int = 512,
        text_stride: int | None = None,
        question_key: str = "question",
        answer_key: str = "answer",
        template: str = DEFAULT_TEMPLATE,
        use_chat_template: bool | None = None,
        evaluation: Literal["tofu", "muse", "loss"] = "tofu",
        eval_forget_split: str | None = None,
        eval_holdout_split: str | None = None,
        eval_subset: int | None = None,
        eval_token_budget: int | None = None,
        answer_pool_split: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        lm_eval_tasks: list[str] | None = None,
        lm_eval_include_path: str | None = None,
        lm_eval_limit: float | None = None,
        lm_eval_num_fewshot: int | None = None,
        lm_eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if eval_token_budget is not None and eval_token_budget < 1:
            raise ValueError(f"eval_token_budget must be at least 1 token (or null), got {eval_token_budget}.")
        self.save_hyperparameters()
        self.parts: tuple[str, ...] = ("forget", "retain")
        self.formatter: PromptFormatter | None = None
        self._sources: dict[str, list[list[Record] | TextCorpus]] = {}
        self.forget: list[Record | Encoded] = []  # question/answer rows, and the windows of text corpora
        self.retain: list[Record | Encoded] = []
        self.refusals: list[str] = []
        self.answer_pool: list[str] = []
        self.num_random_answers = 5
        self.sampler: StepSampler | None = None
        self._resume: tuple[int, int] | None = None
        self._eval_sets: tuple[Any, ...] | None = None

    def connect(
        self, tokenizer: PreTrainedTokenizerBase | None = None, parts: Sequence[str] | None = None,
        num_random_answers: int | None = None,
    ) -> None:
        """Receive the run's tokenizer and the data parts the loss needs; called by the model's ``setup``.

        ``num_random_answers`` is how many random answers the ``forget_random`` part carries per forget
        question: the loss's hyper-parameter (LLMU's K), hence set by the model rather than in ``data``.
        """
        if parts is not None:
            self.parts = tuple(parts)
        if num_random_answers is not None:
            self.num_random_answers = num_random_answers
        if tokenizer is not None and self.hparams.tokenizer is None:
            self._set_formatter(tokenizer)

    def _set_formatter(self, tokenizer: PreTrainedTokenizerBase) -> None:
        h = self.hparams
        self.formatter = PromptFormatter(tokenizer, h.max_length, h.template, use_chat_template=h.use_chat_template)
        self._materialise()

    def setup(self, stage: str | None = None) -> None:
        """Read and check the splits (cheap: tokenization happens per item; text corpora are cut into windows
        once the tokenizer is known, see :meth:`_materialise`)."""
        h = self.hparams
        if not self._sources:
            splits = [h.forget_split] if isinstance(h.forget_split, str) else list(h.forget_split)
            self._sources["forget"] = [self._read(split) for split in splits]
            if not any(len(part) for part in self._sources["forget"]):
                raise ValueError(f"The forget split {h.forget_split!r} of {h.dataset!r} is empty: nothing to unlearn.")
            self._sources["retain"] = [self._read(h.retain_split)] if h.retain_split else []
        if h.tokenizer is not None and self.formatter is None:
            self._set_formatter(load_tokenizer(h.tokenizer))
        self._materialise()

    def _read(self, split: str) -> list[Record] | TextCorpus:
        """One split: question/answer rows (fields checked with their file and line) or a text corpus."""
        h = self.hparams
        rows = load_rows(h.dataset, split)
        if rows.records and is_text(rows.records, h.question_key):
            return text_corpus(rows)
        require_fields(rows.records, (h.question_key, h.answer_key), rows.source, places=rows.places)
        return rows.records

    def _materialise(self) -> None:
        """Fill ``forget`` and ``retain``: question/answer rows as read, text corpora as their windows, which needs
        the tokenizer (until it arrives a text split stays unread here)."""
        for name in ("forget", "retain"):
            sources = self._sources.get(name, [])
            has_text = any(isinstance(s, TextCorpus) for s in sources)
            if getattr(self, name) or (has_text and self.formatter is None):
                continue
            examples: list[Record | Encoded] = []
            for source in sources:
                if isinstance(source, TextCorpus):
                    examples.extend(chunk_corpus(source, self.formatter.tokenizer, self.hparams.max_length,
                                                 self.hparams.text_stride))
                else:
                    examples.extend(source)
            setattr(self, name, examples)

    def _formatter(self) -> PromptFormatter:
        if self.formatter is None:
            raise RuntimeError(
                "The data module has no tokenizer: set data.tokenizer, or train through a model that calls "
                "datamodule.connect(tokenizer)."
            )
        return self.formatter

    def _loader(self, dataset, batch_size: int, sampler=None, collate=collate_parts) -> DataLoader:
        formatter = self._formatter()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate, pad_token_id=formatter.tokenizer.pad_token_id),
            persistent_workers=self.hparams.num_workers > 0,
            generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        """A loader's own generator: creating an iterator then draws no number from the global RNG, so the
        global RNG (dropout) does not depend on when loaders are iterated, which differs after resumption."""
        return torch.Generator().manual_seed(self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        self._formatter()
        self._materialise()
        if "forget_idk" in self.parts and not self.refusals:
            self.refusals = load_refusals(h.dataset)
        if "forget_random" in self.parts and not self.answer_pool:
            pool = load_split(h.dataset, h.answer_pool_split, (h.answer_key,)) if h.answer_pool_split else self.retain
            self.answer_pool = [row[h.answer_key] for row in pool if isinstance(row, dict)]  # no text windows
        dataset = PairedDataset(
            self.forget, self.retain, self._formatter(), self.parts, self.refusals, h.question_key, h.answer_key,
            self.answer_pool, self.num_random_answers,
        )
        # Each batch carries the label counts of its whole optimizer step (all micro-batches and processes), so
        # that token and sequence means are taken over the step, however it is split (see data/steps.py).
        trainer = self.trainer
        replicas, rank, accumulate, limit = (1, 0, 1, 1.0) if trainer is None else (
            trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches, trainer.limit_train_batches)
        self.sampler = StepSampler(
            dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=h.seed, batch_size=h.batch_size,
            accumulate_grad_batches=accumulate, limit_train_batches=limit,
        )
        self._apply_resume()
        return self._loader(StepDataset(dataset), h.batch_size, self.sampler, collate_steps)

    # --- resumption: Lightning saves and restores these with the checkpoint ---------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the batches of it already trained, for an exact mid-epoch resumption.

        Lightning restores its loop counters but gives a resumed run a fresh iterator (our plain DataLoader
        is not a stateful loader); without this the run would replay the epoch's first batches.
        """
        trainer = self.trainer
        if self.sampler is None or trainer is None:
            return {}
        epoch, done = self.sampler.epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        return {"train_epoch": epoch, "train_batches_done": done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next training pass start where the checkpointed run stopped (once)."""
        if "train_epoch" in state_dict:
            self._resume = (int(state_dict["train_epoch"]), int(state_dict["train_batches_done"]))
            self._apply_resume()
            # Lightning warns that a plain DataLoader cannot resume mid-epoch; this data module does.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def _apply_resume(self) -> None:
        if self._resume is not None and self.sampler is not None:
            epoch, done = self._resume
            self.sampler.resume_at(epoch, done * self.hparams.batch_size)
            self._resume = None

    def eval_specs(self) -> list[EvalSetSpec] | list[MuseSetSpec]:
        """The TOFU or MUSE evaluation sets this data module serves (empty in ``loss`` mode).

        Raises:
            ValueError: ``evaluation: muse`` on a dataset that is not MUSE's.
        """
        h = self.hparams
        if h.evaluation == "muse":
            if not is_muse(h.dataset):
                raise ValueError(f"data.evaluation: muse needs a MUSE dataset (muse-bench/MUSE-News, muse-bench/MUSE-Books "
                                 f"or a folder in their layout with a raw/ folder), not {h.dataset!r}; {BUILD_HINT}.")
            return muse_eval_specs(h.dataset)
        if h.evaluation != "tofu":
            return []
        if not isinstance(h.forget_split, str) and h.eval_forget_split is None:
            raise ValueError("With several training splits, name the forget evaluation split: data.eval_forget_split.")
        forget = h.forget_split if isinstance(h.forget_split, str) else h.eval_forget_split
        return tofu_eval_specs(forget, h.eval_forget_split, h.eval_holdout_split)

    def eval_token_budget(self) -> int | None:
        """Padded tokens per teacher-forced evaluation pass: ``eval_token_budget``; ``None``: the evaluation's
        default, :data:`~lightning_unlearn.evaluation.passes.DEFAULT_TOKEN_BUDGET` (the data come before the
        evaluation that batches them into passes, so the default lives there)."""
        return self.hparams.eval_token_budget or None

    def _eval_loaders(self) -> list[DataLoader]:
        """The evaluation loaders; each item carries its index in its set.

        TOFU, MUSE: one loader over every set. ``loss``: one loader per set (forget, retain), so that a limit on
        validation batches still reaches both. Under DDP Lightning gives each loader a distributed sampler that
        pads it by repeating items so that every rank runs as many batches (no rank waits in a collective); the
        evaluation keeps one value per (set, index), so the repeats change no result.
        """
        h = self.hparams
        size = h.eval_batch_size or h.batch_size
        formatter = self._formatter()
        pad = formatter.tokenizer.pad_token_id
        # a limit on evaluation batches (an int, or a fraction below 1.0) means "the first samples": they are
        # served in dataset order then, not longest first
        limits = [getattr(self.trainer, name, None) for name in ("limit_val_batches", "limit_test_batches")]
        limited = any(v is not None and not (isinstance(v, float) and v == 1.0) for v in limits)
        key = (id(formatter), h.evaluation, h.eval_subset, len(self.forget), len(self.retain), not limited)
        if self._eval_sets is None or self._eval_sets[0] != key:
            self._eval_sets = (key, *self._eval_collections(formatter, pad, sort_by_length=not limited))
        collections, collate = self._eval_sets[1:]
        return [DataLoader(c, batch_size=size, num_workers=h.num_workers, collate_fn=collate,
                           generator=self._generator()) for c in collections]

    def _eval_collections(self, formatter: PromptFormatter, pad: int,
                          sort_by_length: bool) -> tuple[list[EvalCollection], Any]:
        """The evaluation sets, read (once per run: :meth:`_eval_loaders` keeps them) and, with ``sort_by_length``,
        tokenized once and each set's items served longest first
        (:class:`~lightning_unlearn.data.tofu_eval.EvalCollection`)."""
        h = self.hparams
        if h.evaluation == "muse":
            collection = EvalCollection([
                MuseEvalDataset.load(spec, h.dataset, formatter.tokenizer, h.max_length, h.eval_subset)
                for spec in self.eval_specs()
            ], sort_by_length=sort_by_length)
            collections, collate = [collection], partial(collate_muse, pad_token_id=pad)
        elif h.evaluation == "tofu":
            collection = EvalCollection([
                EvalDataset.load(spec, h.dataset, formatter, h.eval_subset, h.question_key, h.answer_key)
                for spec in self.eval_specs()
            ], sort_by_length=sort_by_length)
            collections, collate = [collection], partial(collate_collection, pad_token_id=pad)
        else:
            collections = [
                EvalCollection([AnswerDataset(name, records[: h.eval_subset] if h.eval_subset else records, formatter,
                                              h.question_key, h.answer_key)], sort_by_length=sort_by_length)
                for name, records in (("forget", self.forget), ("retain", self.retain)) if records
            ]
            collate = partial(collate_answers, pad_token_id=pad)
        return collections, collate

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()
