"""Loading a tokenizer by Hugging Face id or local directory, and checking that a local one is whole.

A tokenizer is what turns the data's text into ids, so the data module loads it; the models that share it are
checked against it (:func:`lightning_unlearn.models.loading.check_same_tokenizer`). Like the model loaders, a
local folder never reaches the network, and a folder copied in part is refused naming the missing file (Hugging
Face would ask to install sentencepiece or tiktoken instead).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

__all__ = ["TOKENIZER_FILES", "check_tokenizer_files", "load_tokenizer"]

# Any one of these holds a vocabulary: fast tokenizers (tokenizer.json), sentencepiece, BPE and WordPiece files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def check_tokenizer_files(path: str | os.PathLike) -> None:
    """Refuse a local folder that holds no vocabulary file (``tokenizer.json`` for every tokenizer this package
    saves), naming it; a hub id or a non-directory is left to the loader.

    Raises:
        FileNotFoundError: no ``tokenizer.json``, ``*.model``, ``vocab.*`` or ``*.tiktoken`` file is there.
    """
    directory = Path(path)
    if not directory.is_dir() or any((directory / name).is_file() for name in TOKENIZER_FILES):
        return
    if any(f.suffix in TOKENIZER_SUFFIXES or f.name.startswith("vocab.") for f in directory.iterdir() if f.is_file()):
        return
    raise FileNotFoundError(f"{directory} has no tokenizer file ({TOKENIZER_FILES[0]}, or "
                            f"{', '.join(TOKENIZER_FILES[1:])}, *.model, *.tiktoken): the folder was copied in part; "
                            f"copy {TOKENIZER_FILES[0]} (and tokenizer_config.json) from the model it was trained from.")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token.

    Many causal-LM tokenizers (Llama among them) have no pad token; padding positions are always masked
    here, so reusing EOS as the pad id is safe and keeps the vocabulary unchanged.

    Raises:
        FileNotFoundError: a local folder holds no tokenizer file (named; transformers would ask to install
            sentencepiece or tiktoken instead).
        OSError: the tokenizer cannot be loaded otherwise.
    """
    check_tokenizer_files(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, local_files_only=os.path.isdir(name_or_path), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"Could not load a tokenizer from {name_or_path!r}: give a local directory saved with "
            f"save_pretrained() or a Hugging Face hub id reachable from this machine. ({err})"
        ) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {name_or_path!r} has neither a pad nor an EOS token; add one of them.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
