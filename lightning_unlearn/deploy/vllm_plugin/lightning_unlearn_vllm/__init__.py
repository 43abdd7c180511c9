"""vLLM plugin: the unlearned model of lightning-unlearn offset exports, served by vLLM as one model.

This folder is put on the vLLM server's ``PYTHONPATH`` by ``lightning-unlearn serve``; vLLM finds the plugin
through the ``vllm.general_plugins`` entry point of the ``lightning_unlearn_vllm-1.0.dist-info`` beside it and calls
:func:`register` in every process it starts (API server, engine core, workers). It imports only vLLM, torch and
transformers, which the vLLM environment has, and nothing of ``lightning_unlearn`` (whose dependencies it has not).
"""

from __future__ import annotations

ARCHITECTURE = "UnlearnedOffsetForCausalLM"
"""The ``architectures`` entry of a serving folder's ``config.json`` that selects :mod:`.model`'s class."""


def register() -> None:
    """Register the offset model with vLLM's model registry (lazily, by name: vLLM imports it when a serving folder
    asks for it, so that registering costs no import in processes that never build a model)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "lightning_unlearn_vllm.model:UnlearnedOffsetForCausalLM")
