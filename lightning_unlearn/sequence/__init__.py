"""Sequential unlearning: a stream of deletion requests, each strategy measured after every request.

``lightning-unlearn sequence --world tiny`` (the demo's quick world, CPU) or
``lightning-unlearn sequence --config configs/sequence/tofu_llama2.yaml``. Parts: :mod:`.requests` (the requests:
folds, nested or named splits, and each one's evaluation samples), :mod:`.spec` (the sequence config, its strategies
and steps), :mod:`.composed` (a composition of offsets evaluated as ``test`` does), :mod:`.runner` (each step as
``fit`` then an evaluation, cached and recorded with the comparison's machinery), :mod:`.table` (``SEQUENCE.md``,
``SEQUENCE.json``, ``SEQUENCE.png``), :mod:`.main` (the command line).
"""
