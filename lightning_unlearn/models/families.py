"""Tiny models of the chat families users run, each with a tokenizer in that family's format.

Real chat models differ in exactly the places where an unlearning framework can silently go wrong: which
token ends an assistant turn (often not ``eos_token``), whether the template writes BOS itself, which ids
``generation_config.json`` lists as stops, whether there is a pad token, and whether the embedding has
more rows than the tokenizer has tokens. The builders here reproduce those traits at a few thousand
parameters, offline: a byte-level BPE tokenizer trained on the given text, carrying the family's special
tokens and a chat template written in the family's format, and a random-weight model built from the
family's ``transformers`` config class, saved together as an ordinary Hugging Face directory.

Formats (as the families document them; the templates are written here, not copied), as
``family: end of the assistant turn / eos_token; other traits``:

- ``llama3``: ``<|eot_id|>`` / ``<|end_of_text|>``; ``<|start_header_id|>role<|end_header_id|>`` headers, the
  template writes BOS and the tokenizer would add another, ``generation_config`` lists three stop ids, no pad.
- ``gemma``: ``<end_of_turn>`` / ``<eos>``; ``<start_of_turn>user``, ``<start_of_turn>model``, template BOS.
- ``chatml`` (Qwen2.5): ``<|im_end|>`` / ``<|endoftext|>``; ``<|im_start|>role``, no BOS.
- ``phi3`` (Phi-3.5): ``<|end|>`` / ``<|endoftext|>``; ``<|user|>``, ``<|assistant|>``, EOS after the conversation.
- ``mistral`` (Llama-2/Mistral): ``</s>`` / ``</s>``; ``[INST] ... [/INST]``, template BOS, no pad.
- ``gpt2``: no chat template / ``<|endoftext|>``; BOS = EOS, no pad.
- ``neox``: no chat template / ``<|endoftext|>``; an embedding with more rows than the tokenizer has tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = ["FAMILIES", "Family", "build_family_model", "build_family_tokenizer", "make_family_pair"]

_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_GEMMA = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_PHI3 = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
_INST = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }}"
    " [/INST]{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """The format of one model family.

    Attributes:
        name: short name (``llama3``, ``gemma``, ...).
        specials: special tokens, in id order (they get the first ids of the vocabulary).
        bos, eos, pad: the tokenizer's special tokens; ``None`` where the family has none.
        prepend_bos: whether tokenizing text adds BOS in front (as the family's tokenizer does).
        chat_template: Jinja template, ``None`` for base models.
        end_of_turn: the token ending an assistant turn, ``None`` without a chat template.
        stops: the tokens ``generation_config.json`` lists as ``eos_token_id``.
        config: ``(vocab_size, hidden, layers, heads, ids) -> config`` with ``ids`` the bos/eos/pad ids.
        embedding_rows: ``vocab -> rows`` of the embedding (GPT-NeoX pads it to a multiple of 128, plus more).
    """

    name: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    prepend_bos: bool
    chat_template: str | None
    end_of_turn: str | None
    stops: tuple[str, ...]
    config: Callable[[int, int, int, int, dict[str, int | None]], PretrainedConfig]
    embedding_rows: Callable[[int], int] = field(default=lambda vocab: vocab)


def _llama_like(cls: type[PretrainedConfig], **extra: object) -> Callable[..., PretrainedConfig]:
    def build(vocab: int, hidden: int, layers: int, heads: int, ids: dict[str, int | None]) -> PretrainedConfig:
        return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                   tie_word_embeddings=False, **ids, **extra)
    return build


def _gpt2(vocab: int, hidden: int, layers: int, heads: int, ids: dict[str, int | None]) -> PretrainedConfig:
    return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **ids)


def _neox(vocab: int, hidden: int, layers: int, heads: int, ids: dict[str, int | None]) -> PretrainedConfig:
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=512, tie_word_embeddings=False, **ids)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>"),
           "<|begin_of_text|>", "<|end_of_text|>", None, True, _LLAMA3, "<|eot_id|>",
           ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), _llama_like(LlamaConfig)),
    Family("gemma", ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
           "<bos>", "<eos>", "<pad>", True, _GEMMA, "<end_of_turn>", ("<eos>",),
           _llama_like(GemmaConfig, head_dim=8, hidden_activation="gelu_pytorch_tanh")),
    Family("chatml", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           None, "<|endoftext|>", "<|endoftext|>", False, _CHATML, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"),
           _llama_like(Qwen2Config)),
    Family("phi3", ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           "<s>", "<|endoftext|>", "<|endoftext|>", False, _PHI3, "<|end|>", ("<|end|>", "<|endoftext|>"),
           _llama_like(Phi3Config)),
    Family("mistral", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, True, _INST, "</s>", ("</s>",),
           _llama_like(MistralConfig, head_dim=None)),
    Family("gpt2", ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None, False, None, None,
           ("<|endoftext|>",), _gpt2),
    Family("neox", ("<|endoftext|>", "<|padding|>"), "<|endoftext|>", "<|endoftext|>", "<|padding|>", False, None,
           None, ("<|endoftext|>",), _neox, lambda vocab: 128 * (vocab // 128 + 2)),
)}


def _family(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"Unknown model family {name!r}: use one of {sorted(FAMILIES)}.") from None


def build_family_tokenizer(
    family: str | Family, texts: Iterable[str], vocab_size: int = 400, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` with the family's special tokens and chat template.

    Raises:
        ValueError: an unknown family name.
    """
    fam = _family(family)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if fam.prepend_bos:
        assert fam.bos is not None
        bos = (fam.bos, tok.token_to_id(fam.bos))
        tok.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                                                           special_tokens=[bos])
    named = {"bos_token": fam.bos, "eos_token": fam.eos, "pad_token": fam.pad}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None})
    if fam.chat_template is not None:
        fast.chat_template = fam.chat_template
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_family_model(
    family: str | Family, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path | None = None, hidden: int = 32,
    layers: int = 2, heads: int = 2, seed: int = 0,
) -> PreTrainedModel:
    """A random-weight model of the family for ``tokenizer``, saved with it and a ``generation_config.json``.

    The generation config lists the family's stop tokens as ``eos_token_id`` (one id as an int, several as a
    list, as the families publish them).
    """
    fam = _family(family)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = fam.config(fam.embedding_rows(len(tokenizer)), hidden, layers, heads, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    stops = [tokenizer.convert_tokens_to_ids(t) for t in fam.stops]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stops[0] if len(stops) == 1 else stops,
        pad_token_id=tokenizer.pad_token_id,
    )
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


def make_family_pair(
    family: str | Family, out_dir: str | Path, texts: Iterable[str], vocab_size: int = 400,
    large: tuple[int, int] = (32, 2), small: tuple[int, int] = (16, 1), seed: int = 0,
) -> dict[str, Path]:
    """A large and a small model of one family sharing one tokenizer: an offset-unlearning pair.

    ``large`` and ``small`` are (hidden size, layers). Returns the ``tokenizer``, ``large`` and ``small``
    directories.
    """
    out = Path(out_dir)
    tokenizer = build_family_tokenizer(family, texts, vocab_size, out / "tokenizer")
    paths = {"tokenizer": out / "tokenizer"}
    for offset, (name, (hidden, layers)) in enumerate((("large", large), ("small", small))):
        build_family_model(family, tokenizer, out / name, hidden=hidden, layers=layers, heads=2, seed=seed + offset)
        paths[name] = out / name
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_unlearn.models.families FAMILY OUT_DIR``: a tokenizer and a large/small pair."""
    import argparse

    from ..data.sources import load_split

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir", help="folder to create tokenizer/, large/ and small/ in")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = load_split("bundled", "full") + load_split("bundled", "real_authors") + load_split("bundled", "world_facts")
    texts = (f"{r['question']} {r['answer']}" for r in rows)
    for name, path in make_family_pair(args.family, args.out_dir, texts, args.vocab_size, seed=args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
