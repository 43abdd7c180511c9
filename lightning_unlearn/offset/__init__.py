"""The offset machinery, ``z = z_L + alpha * (z_S - z_S0)``, apart from the models themselves.

Where the large model's logits come from (a local model, on its own device or not, or a model served by vLLM:
:mod:`.sources`, :mod:`.placement`, :mod:`.vllm_client`, :mod:`.topk`), how they are kept between epochs
(:mod:`.logit_cache`), how the offset is computed in place during training (:mod:`.logits`) and how several
models decode together with one KV cache each (:mod:`.generation`, ULD's filtered variant :mod:`.filtered`).
"""
