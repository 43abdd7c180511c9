"""Deployment: what a trained run leaves behind and how it is used without the trainer.

An export is a directory with the trained small model (or LoRA adapter, or ULD assistant) and a manifest naming
the large and reference models (:mod:`.manifest`); several offset exports against one large model compose.
:class:`~lightning_unlearn.deploy.unlearned.UnlearnedModel` loads one or several back as a single model (scoring,
KV-cached generation, a served large model); ``lightning-unlearn generate`` answers prompts with it.
"""
