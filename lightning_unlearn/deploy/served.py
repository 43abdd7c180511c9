"""Serving an unlearned model with vLLM: the offset computed inside the engine, for every sequence of its batch.

``lightning-unlearn serve EXPORT [EXPORT ...]`` writes a *serving folder* and starts vLLM's OpenAI-compatible server
on it, in vLLM's own environment (``make vllm``) with the plugin folder :data:`PLUGIN_DIR` on its ``PYTHONPATH``.
The plugin (``vllm_plugin/lightning_unlearn_vllm``, importable without this package) registers the model class
``UnlearnedOffsetForCausalLM`` through vLLM's ``vllm.general_plugins`` entry point; that class builds the large
model, the reference and each offset as vLLM's own implementation of their architecture, each layer with its own
paged KV cache, runs all of them on the engine's batch and returns ``z_L + sum_i alpha_i (z_S_i - z_S0)`` (ULD:
``z_L + keep(z_L) * sum_i alpha_i z_S_i``) as the model's logits. Everything after the logits (sampling,
``logprobs``, stop tokens, streaming, continuous batching, chat templates) is vLLM's.

Why a model and not a logits processor: vLLM's V1 logits processors see only the logits of the one model the
engine runs, so the pair's logits would have to be computed outside the engine, step by step, without a KV cache
of the engine's; a model class is where vLLM lets several networks share the scheduler's batch and block tables.

The serving folder holds:

- ``config.json``: the large model's, with ``architectures: ["UnlearnedOffsetForCausalLM"]`` and a
  ``lightning_unlearn_offset`` entry naming the large model, the reference and the offsets with their alphas
  (vLLM sizes the context, the vocabulary and the memory plan from the large model's fields);
- the export's tokenizer files (its chat template included), checked equal to every model's tokenizer here, before
  vLLM starts;
- ``generation_config.json`` whose ``eos_token_id`` lists the ids in-process generation stops at
  (:func:`~lightning_unlearn.data.formatting.stop_token_ids`: EOS, every model's generation config, the chat
  template's end of turn), so the server stops where ``UnlearnedModel`` stops;
- links to the large model's weight files (vLLM's loader reads its primary weights from the served folder).

Alpha is fixed per server (the manifests', or ``--alphas``); a new deletion request is served by restarting with
one more export. LoRA offsets are refused (the adapter would first have to be merged into a whole small model:
``lightning-unlearn export`` of a full fine-tune, or peft's ``merge_and_unload``), as are direct exports, which
are whole models vLLM serves as they are (``make serve MODEL=EXPORT``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.formatting import stop_token_ids
from ..data.tokenizer import load_tokenizer
from ..models.loading import check_same_tokenizer
from .manifest import Composition, compose

__all__ = ["ARCHITECTURE", "PLUGIN_DIR", "SPEC_KEY", "plugin_environment", "serving_spec", "write_serving_folder"]

PLUGIN_DIR = Path(__file__).resolve().parent / "vllm_plugin"
"""The folder the vLLM server gets on its ``PYTHONPATH``: the plugin package and its entry-point metadata."""
ARCHITECTURE = "UnlearnedOffsetForCausalLM"
SPEC_KEY = "lightning_unlearn_offset"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def serving_spec(composition: Composition, vocab_size: int) -> dict[str, Any]:
    """The ``lightning_unlearn_offset`` entry of a serving folder's ``config.json`` (read by the plugin's
    ``read_spec``): absolute model folders, one alpha per offset, ULD's ``relative_top``, the tokenizer's size.

    Raises:
        ValueError: a direct export, a LoRA offset, or a large or reference model that is not a local folder.
    """
    if composition.is_direct:
        raise ValueError(f"{composition.offsets[0].path!r} is a directly unlearned model, a whole model on its own: "
                         "serve it with vLLM as it is (`make serve MODEL=EXPORT`), not with `serve`.")
    lora = [o.path for o in composition.offsets if o.adapter]
    if lora:
        raise ValueError(f"{lora} {'is a LoRA offset' if len(lora) == 1 else 'are LoRA offsets'}: the served model "
                         "runs whole small models inside vLLM, and vLLM's LoRA applies one adapter to the whole "
                         "served model per request, not to one of its parts. Merge the adapter into the reference "
                         "first (peft's merge_and_unload, saved with the export's offset.json), or unlearn without "
                         "LoRA.")
    for role, name in (("large model", composition.large_model), ("reference model", composition.reference_model)):
        if name is not None and not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"The {role} {name!r} is not a local model folder: give where it is with "
                             f"--{role.split()[0]}-model DIR (the server loads every model from disk).")
    return {"large_model": os.path.abspath(composition.large_model),
            "reference_model": (os.path.abspath(composition.reference_model)
                                if composition.reference_model is not None else None),
            "offsets": [{"path": os.path.abspath(o.path), "alpha": o.alpha} for o in composition.offsets],
            "relative_top": composition.relative_top, "vocab_size": vocab_size}


def write_serving_folder(
    exports: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    alphas: Sequence[float] | None = None,
    *,
    large_model: str | None = None,
    reference_model: str | None = None,
) -> tuple[Path, Composition]:
    """Write the serving folder of ``exports`` (composed as :func:`~.manifest.compose` does) into ``out_dir``,
    replacing it atomically; returns it and the composition.

    Every model's tokenizer is checked against the export's here, so a mismatch stops ``serve`` before vLLM starts.

    Raises:
        FileNotFoundError: an export or one of its files is missing.
        ValueError: exports that do not compose, a direct or LoRA export, models that are not local folders, or
            tokenizers that differ.
    """
    composition = compose(exports, alphas, source="--alphas").with_models(large_model, reference_model)
    first = composition.offsets[0].path
    tokenizer = load_tokenizer(first)
    spec = serving_spec(composition, len(tokenizer))
    for path in [spec["large_model"], spec["reference_model"], *(o["path"] for o in spec["offsets"][1:])]:
        if path is not None:
            check_same_tokenizer(tokenizer, load_tokenizer(path), first, path)
    large = Path(spec["large_model"])
    config = json.loads((large / "config.json").read_text(encoding="utf-8"))
    config.update({"architectures": [ARCHITECTURE], SPEC_KEY: spec})
    parts = [large] + ([Path(spec["reference_model"])] if spec["reference_model"] else [])
    stop = stop_token_ids(tokenizer, [str(p) for p in parts] + [o["path"] for o in spec["offsets"]])
    generation = {"eos_token_id": stop, "bos_token_id": tokenizer.bos_token_id,
                  "pad_token_id": tokenizer.pad_token_id}
    weights = [f for f in sorted(large.iterdir()) if f.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise FileNotFoundError(f"The large model {str(large)!r} has no safetensors weights, which vLLM's loader "
                                "reads from the serving folder: save it with save_pretrained(safe_serialization=True).")
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (Path(first) / name).is_file():
                shutil.copyfile(Path(first) / name, staging / name)
        for file in weights:
            (staging / file.name).symlink_to(file)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target, composition


def plugin_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with :data:`PLUGIN_DIR` as the vLLM server's ``PYTHONPATH`` (alone: the
    server imports its own environment's packages, not this checkout's) and the plugin allowed by
    ``VLLM_PLUGINS`` if that list is set."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(PLUGIN_DIR)
    if env.get("VLLM_PLUGINS"):
        env["VLLM_PLUGINS"] += ",lightning_unlearn_offset"
    return env
