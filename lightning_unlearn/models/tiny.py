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
