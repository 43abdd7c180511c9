"""The paper's comparison in one command: every method, offset and direct, on one budget.

``python -m lightning_unlearn.compare --world tiny`` (the demo's quick tiny world, CPU) or
``python -m lightning_unlearn.compare --config configs/compare/tofu_llama3.yaml`` (real models). Parts:
:mod:`.spec` (the compare config, the methods, the cells), :mod:`.runner` (each cell as a ``main.py fit`` and
``test``, skipped when done), :mod:`.table` (``COMPARE.md``, ``COMPARE.json``, ``COMPARE.png``), :mod:`.main`
(the command line, the world, the memory plans).
"""
