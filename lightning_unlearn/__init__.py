"""lightning-unlearn: offset (delta) unlearning of LLMs with PyTorch Lightning.

The package is built in layers. Each name below is a subpackage or module of ``lightning_unlearn``; a layer imports
only from the layers under it (names on one line are peers: they may import each other, never in a circle), so a
reader can start at the bottom and meet nothing that is explained later. ``tests/integration/test_layers.py`` reads
this list and every import in the package, function-level ones included, and fails on an import that runs up or goes
round.

Layers, from the top down:

    commands -- the one command, ``lightning-unlearn SUBCOMMAND``: the subcommand table, export, generate, serve, fuse
    sequence -- a stream of deletion requests: each strategy's steps run as the comparison's cells, then tables
    compare -- the comparison of methods, offset and direct: runs the commands below for each cell, then tables
    demo -- the offline demo: a tiny TOFU world fine-tuned, unlearned and evaluated, stage by stage
    sweep -- the offset strength alpha swept at test time (runs ``test`` once per alpha)
    cli -- the training command line (LightningCLI: ``fit``, ``test``, ``validate``); no library code imports it
    modules -- the unlearning methods as LightningModules: the base, one small class per method, their callbacks
    attacks -- attacks on an unlearned export: relearning, weight quantization, membership inference
    harness -- lm-evaluation-harness over any model the framework makes (named so as not to shadow ``lm_eval``)
    deploy -- what a run leaves behind and how it is used without the trainer: exports, composition, generation, serving
    evaluation -- the TOFU, MUSE and loss evaluations, their teacher-forced passes, references, reports
    distributed -- FSDP2: sharding the models over devices, the ``fsdp2`` strategy, sharded checkpoints and exports
    models -- loading weights, LoRA, EUL's unlearning layers, the memory plan, tiny models for offline runs
    offset -- the offset machinery z = z_L + alpha (z_S - z_S0): logits, caches, KV-cached decoding, served models
    data -- splits and where they come from, the tokenizer, prompt formatting, evaluation sets, the data module
    losses metrics -- pure tensor functions: the unlearning losses, the evaluation metrics
    __init__ lazy_imports numbers atomic tracking console -- tools that know nothing of unlearning
"""

import os

from .lazy_imports import defer_nltk, defer_scipy_optimize, defer_torchmetrics

# Before anything imports Lightning, transformers' models or rouge_score: see lazy_imports for what this saves
# and what it changes. LIGHTNING_UNLEARN_EAGER_IMPORTS=1 keeps the ordinary imports (for a program that embeds
# this package and would rather pay the start-up than have third-party package __init__s run late).
if os.environ.get("LIGHTNING_UNLEARN_EAGER_IMPORTS", "") not in ("1", "true", "yes"):
    defer_torchmetrics()
    defer_nltk()
    defer_scipy_optimize()
