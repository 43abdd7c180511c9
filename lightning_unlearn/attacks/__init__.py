"""Attacks on an unlearned model: relearning, weight quantization, membership inference (``lightning-unlearn attack``).

Each attack takes an export (offset or direct), measures the forget metrics of :mod:`.forget`, attacks, and measures
them again. What the attacker can change differs by mode: in offset mode the large model ``L`` is untouched by
unlearning and only the small offset ``S`` (with its frozen reference ``S0``) carries the forgetting, so relearning
trains ``S``, and quantization is applied to ``L`` alone or to the whole pair (:mod:`.quantize`).
"""
