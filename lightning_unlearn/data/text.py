"""Raw-text corpora: splits of documents cut into training sequences in which every token is labelled.

MUSE (news articles, books) and LLMU's copyright scenario unlearn text, not question/answer pairs. A split is
a text corpus when its rows hold a ``text`` field and no question: JSON Lines rows ``{"text": ...}``, a
``<split>.txt`` file (one document) or a ``<split>/`` folder of ``.txt`` files (one document each; see
:mod:`lightning_unlearn.data.sources`). Each document is tokenized once, with the tokenizer's usual special tokens (Llama's BOS),
and cut into windows of at most ``max_length`` tokens starting every ``stride`` tokens (the convention of
sliding-window perplexity). Each token is labelled in exactly one window: with ``stride < max_length`` a
window's first ``max_length - stride`` tokens repeat the previous window's end and serve as context only
(``-100``); with ``stride == max_length`` (the default) windows do not overlap, as MUSE's and
open-unlearning's pretraining-style datasets cut their corpora. There is no prompt: every new token of a
window is a target.

Documents are cut one by one (a window never spans two of them); MUSE's reference code joins the corpus
into one stream first, which differs only at document boundaries.

Training items are the windows, so forget/retain pairing, DDP sharding, resumption, the step plan
(:mod:`.steps`) and the frozen-logit cache (keyed by token ids) treat a window as they treat an encoded
question/answer row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .formatting import IGNORE_INDEX, Encoded
from .rows import Record, Rows
from .sources import describe

TEXT_FIELD = "text"


@dataclass
class TextCorpus:
    """The documents of one text split, with where each comes from (for error messages).

    Attributes:
        texts: the documents, as read.
        source: the file, folder or hub configuration they were read from.
        places: where each document is in ``source`` (``line 3``, ``row 0``, ``chapter1.txt``).
    """

    texts: list[str]
    source: str
    places: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def is_text(records: Sequence[Record], question_key: str = "question") -> bool:
    """Whether a split's rows are text documents: every row an object with ``text`` and without the question.

    Raises:
        ValueError: when some rows are text documents and others are not (a mixed file).
    """
    kinds = {isinstance(r, dict) and TEXT_FIELD in r and question_key not in r for r in records}
    if len(kinds) > 1:
        raise ValueError(f"A split mixes text documents (rows with {TEXT_FIELD!r} and no {question_key!r}) with other "
                         "rows: put question/answer rows and text documents in separate splits.")
    return kinds == {True}


def text_corpus(rows: Rows) -> TextCorpus:
    """The documents of text rows, checked: each ``text`` is a string.

    Raises:
        ValueError: naming the file and row, for a ``text`` that is not a string; or when the split is empty.
    """
    if not rows.records:
        raise ValueError(f"{rows.source}: the text corpus is empty (no document): add documents or choose another "
                         "split.")
    for record, place in zip(rows.records, rows.places):
        if not isinstance(record[TEXT_FIELD], str):
            raise ValueError(f"{rows.source}, {place}: field {TEXT_FIELD!r} is {describe(record[TEXT_FIELD])}, not "
                             "text. Write it as a JSON string, or remove the row.")
    return TextCorpus([r[TEXT_FIELD] for r in rows.records], rows.source, list(rows.places))


def windows(ids: Sequence[int], max_length: int, stride: int | None = None) -> list[Encoded]:
    """Cut one document's token ids into training windows, every token after the first labelled once.

    Windows start at ``0, stride, 2 stride, ...`` and are at most ``max_length`` long; the last one ends at
    the document's end. In a window other than the first, the ``max_length - stride`` tokens that the previous
    window already labelled are context (``-100``). A window's first token is never a target (nothing
    predicts it), so with overlap it keeps context for the next-token loss; without overlap the first token of
    each window after the first is not trained on, as in MUSE's chunking.

    Args:
        ids: the document's token ids, at least 2 (one input and one target).
        max_length: longest window in tokens (at least 2).
        stride: tokens between window starts, ``1 <= stride <= max_length``; ``None``: ``max_length``.

    Raises:
        ValueError: for a bad ``max_length`` or ``stride``, or fewer than 2 ids.
    """
    stride = max_length if stride is None else stride
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"Text windows need max_length >= 2 and 1 <= stride <= max_length, got max_length="
                         f"{max_length}, stride={stride}: set data.max_length and data.text_stride.")
    if len(ids) < 2:
        raise ValueError(f"A document of {len(ids)} token(s) has no token to predict.")
    out: list[Encoded] = []
    labelled_until = 0  # ids[:labelled_until] are targets of earlier windows (or the document's first token)
    for start in range(0, len(ids), stride):
        end = min(start + max_length, len(ids))
        if end <= labelled_until:
            break
        window = list(ids[start:end])
        context = max(labelled_until - start, 1 if start == 0 else 0)
        out.append(Encoded(window, [IGNORE_INDEX] * context + window[context:]))
        labelled_until = end
        if end == len(ids):
            break
    return out


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A document's ids with the tokenizer's usual special tokens (BOS), without an EOS some tokenizers append:
    a window must not teach the model that text ends where a window does."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


def chunk_corpus(corpus: TextCorpus, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 stride: int | None = None) -> list[Encoded]:
    """Every document of ``corpus`` tokenized and cut into :func:`windows`, in document order.

    Raises:
        ValueError: naming the file and row of a document with no token to learn (empty, or only spaces
            some tokenizers drop): fill or remove it.
    """
    out: list[Encoded] = []
    for text, place in zip(corpus.texts, corpus.places):
        ids = encode_document(tokenizer, text)
        text_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if text_tokens < 1 or len(ids) < 2:
            raise ValueError(f"{corpus.source}, {place}: the document is shorter than one token ({text[:40]!r}), so "
                             "there is nothing to learn or unlearn in it: fill or remove it.")
        out.extend(windows(ids, max_length, stride))
    return out
