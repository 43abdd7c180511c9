"""The LightningDataModule for forget/retain unlearning data."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..evaluation.data import EvalCollection, EvalDataset, EvalSetSpec, collate_collection, tofu_eval_specs
from ..models.loading import load_tokenizer
from .datasets import PairedDataset, PairingSampler, RecordDataset
from .formatting import DEFAULT_TEMPLATE, PromptFormatter, collate_parts
from .sources import BUNDLED, Record, load_refusals, load_split, require_fields


class UnlearnDataModule(L.LightningDataModule):
    """Forget and retain question/answer data, from TOFU or any folder of JSON Lines files.

    An epoch is one pass over the forget set; each forget example comes with the parts the loss asks
    for (a random retain example, a random refusal). The tokenizer normally arrives from the model
    through :meth:`connect`, so both always use the same one.

    Args:
        forget_split: split to forget, e.g. ``forget01``, ``forget05``, ``forget10``.
        retain_split: split to keep, e.g. ``retain99`` (goes with ``forget01``); ``null`` for none.
        dataset: ``bundled`` (the TOFU files shipped with the package), a local folder of
            ``<split>.jsonl`` files, or a Hugging Face hub dataset id such as ``locuslab/TOFU``.
        tokenizer: tokenizer name or path; ``null`` takes the model's (the usual case).
        batch_size: forget examples per step and device (each brings its retain partner).
        eval_batch_size: batch size of the validation loaders; ``null`` uses ``batch_size``.
        max_length: longest sequence in tokens; longer answers are truncated with a warning.
        question_key: field holding the question.
        answer_key: field holding the answer.
        template: plain prompt template, used when the tokenizer has no chat template.
        use_chat_template: ``null`` uses the tokenizer's chat template when it has one.
        evaluation: what validation and ``test`` run: ``tofu`` (the full TOFU evaluation on the
            ``*_perturbed`` sets, real authors, world facts and holdout) or ``loss`` (forget and retain NLL only,
            for data without TOFU's evaluation files).
        eval_forget_split: forget evaluation split; ``null`` means ``<forget_split>_perturbed``.
        eval_holdout_split: holdout split for membership inference; ``null`` means ``holdoutXX`` matching
            the forget split's number.
        eval_subset: evaluate only the first N samples of each set, for speed (``null``: all).
        num_workers: DataLoader workers.
        seed: seed of the shuffling and of the forget/retain pairing.
    """

    def __init__(
        self,
        forget_split: str = "forget10",
        retain_split: str | None = "retain90",
        dataset: str = BUNDLED,
        tokenizer: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        question_key: str = "question",
        answer_key: str = "answer",
        template: str = DEFAULT_TEMPLATE,
        use_chat_template: bool | None = None,
        evaluation: Literal["tofu", "loss"] = "tofu",
        eval_forget_split: str | None = None,
        eval_holdout_split: str | None = None,
        eval_subset: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.save_hyperparameters()
        self.parts: tuple[str, ...] = ("forget", "retain")
        self.formatter: PromptFormatter | None = None
        self.forget: list[Record] = []
        self.retain: list[Record] = []
        self.refusals: list[str] = []

    def connect(self, tokenizer: PreTrainedTokenizerBase | None = None, parts: Sequence[str] | None = None) -> None:
        """Receive the run's tokenizer and the data parts the loss needs; called by the model's ``setup``."""
        if parts is not None:
            self.parts = tuple(parts)
        if tokenizer is not None and self.hparams.tokenizer is None:
            self._set_formatter(tokenizer)

    def _set_formatter(self, tokenizer: PreTrainedTokenizerBase) -> None:
        h = self.hparams
        self.formatter = PromptFormatter(tokenizer, h.max_length, h.template, use_chat_template=h.use_chat_template)

    def setup(self, stage: str | None = None) -> None:
        """Read and check the splits (cheap: the JSON is small; tokenization happens per item)."""
        h = self.hparams
        keys = (h.question_key, h.answer_key)
        if not self.forget:
            self.forget = load_split(h.dataset, h.forget_split)
            if not self.forget:
                raise ValueError(f"The forget split {h.forget_split!r} of {h.dataset!r} is empty: nothing to unlearn.")
            require_fields(self.forget, keys, f"forget split {h.forget_split!r}")
        if h.retain_split and not self.retain:
            self.retain = load_split(h.dataset, h.retain_split)
            require_fields(self.retain, keys, f"retain split {h.retain_split!r}")
        if h.tokenizer is not None and self.formatter is None:
            self._set_formatter(load_tokenizer(h.tokenizer))

    def _formatter(self) -> PromptFormatter:
        if self.formatter is None:
            raise RuntimeError(
                "The data module has no tokenizer: set data.tokenizer, or train through a model that calls "
                "datamodule.connect(tokenizer)."
            )
        return self.formatter

    def _loader(self, dataset, batch_size: int, sampler=None) -> DataLoader:
        formatter = self._formatter()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate_parts, pad_token_id=formatter.tokenizer.pad_token_id),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if "forget_idk" in self.parts and not self.refusals:
            self.refusals = load_refusals(h.dataset)
        dataset = PairedDataset(
            self.forget, self.retain, self._formatter(), self.parts, self.refusals, h.question_key, h.answer_key
        )
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = PairingSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=h.seed)
        return self._loader(dataset, h.batch_size, sampler)

    def eval_specs(self) -> list[EvalSetSpec]:
        """The TOFU evaluation sets this data module serves (empty in ``loss`` mode)."""
        h = self.hparams
        if h.evaluation != "tofu":
            return []
        return tofu_eval_specs(h.forget_split, h.eval_forget_split, h.eval_holdout_split)

    def _eval_loaders(self) -> list[DataLoader]:
        h = self.hparams
        size = h.eval_batch_size or h.batch_size
        formatter = self._formatter()
        if h.evaluation == "tofu":
            collection = EvalCollection([
                EvalDataset.load(spec, h.dataset, formatter, h.eval_subset, h.question_key, h.answer_key)
                for spec in self.eval_specs()
            ])
            collate = partial(collate_collection, pad_token_id=formatter.tokenizer.pad_token_id)
            return [DataLoader(collection, batch_size=size, num_workers=h.num_workers, collate_fn=collate)]
        loaders = []
        for name, records in (("forget", self.forget), ("retain", self.retain)):
            if records:
                subset = records[: h.eval_subset] if h.eval_subset else records
                dataset = RecordDataset(subset, formatter, name, h.question_key, h.answer_key)
                loaders.append(self._loader(dataset, size))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()
