"""lightning-unlearn: offset (delta) unlearning of LLMs with PyTorch Lightning."""

import os

from .lazy_imports import defer_nltk, defer_scipy_optimize, defer_torchmetrics

# Before anything imports Lightning, transformers' models or rouge_score: see lazy_imports for what this saves
# and what it changes. LIGHTNING_UNLEARN_EAGER_IMPORTS=1 keeps the ordinary imports (for a program that embeds
# this package and would rather pay the start-up than have third-party package __init__s run late).
if os.environ.get("LIGHTNING_UNLEARN_EAGER_IMPORTS", "") not in ("1", "true", "yes"):
    defer_torchmetrics()
    defer_nltk()
    defer_scipy_optimize()
