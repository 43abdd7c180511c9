"""lightning-unlearn: offset (delta) unlearning of LLMs with PyTorch Lightning."""

from .lazy_imports import defer_nltk, defer_scipy_optimize, defer_torchmetrics

# Before anything imports Lightning, transformers' models or rouge_score: see lazy_imports for what this saves
# and what it changes.
defer_torchmetrics()
defer_nltk()
defer_scipy_optimize()
