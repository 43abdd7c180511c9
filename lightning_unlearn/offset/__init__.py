"""Offset machinery beyond the models themselves: where the large model's logits come from (a local model or a
served one, :mod:`.sources`), the vLLM client (:mod:`.vllm_client`) and the top-k fill (:mod:`.topk`)."""
