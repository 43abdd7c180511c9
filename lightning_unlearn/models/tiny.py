"""Tiny Llama-style models and a locally trained tokenizer.

Nothing can be downloaded on an offline machine, yet users (and the tests) want to see unlearning work
end to end. These builders make a byte-level BPE tokenizer from any text and Llama models of a few
hundred thousand parameters from config, saved as ordinary Hugging Face directories so every other part
of the framework loads them exactly like a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (BOS prepended, EOS and PAD as special tokens).

    Byte-level BPE never produces an unknown token, so any prompt can be encoded by the tiny models.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 2,
) -> LlamaConfig:
    """A Llama config scaled down; the feed-forward width defaults to the usual ~2.7x hidden."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or (8 * hidden_size) // 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path | None = None,
    seed: int = 0,
    **config_kwargs: int,
) -> LlamaForCausalLM:
    """Build a randomly initialised tiny Llama for ``tokenizer`` and optionally save it with the tokenizer.

    Saving the tokenizer beside the weights makes the folder a complete model directory, as on the hub.
    """
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


def make_tiny_pair(
    out_dir: str | Path, vocab_size: int = 2048, large: tuple[int, int] = (128, 4), small: tuple[int, int] = (64, 2),
    seed: int = 0,
) -> dict[str, Path]:
    """Train a tokenizer on the bundled TOFU text and save a ``large`` and a ``small`` model sharing it.

    ``large`` and ``small`` are (hidden size, layers). Returns the three directories.
    """
    from ..data.sources import load_split

    out = Path(out_dir)
    rows = load_split("bundled", "full") + load_split("bundled", "real_authors") + load_split("bundled", "world_facts")
    tokenizer = train_tokenizer((f"{r['question']} {r['answer']}" for r in rows), vocab_size, out / "tokenizer")
    paths = {"tokenizer": out / "tokenizer"}
    for offset, (name, (hidden, layers)) in enumerate((("large", large), ("small", small))):
        build_tiny_llama(tokenizer, out / name, seed=seed + offset, hidden_size=hidden, num_layers=layers,
                         num_heads=max(1, hidden // 32))
        paths[name] = out / name
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_unlearn.models.tiny OUT_DIR``: make a tokenizer and two tiny model folders."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", help="folder to create tokenizer/, large/ and small/ in")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--large", type=int, nargs=2, default=(128, 4), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--small", type=int, nargs=2, default=(64, 2), metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in make_tiny_pair(args.out_dir, args.vocab_size, tuple(args.large), tuple(args.small), args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
