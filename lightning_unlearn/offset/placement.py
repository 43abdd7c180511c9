"""Running the frozen large model on its own device (``model.large_device``), beside the small pair.

The large model is the biggest of the three and never trains, so it often belongs on another GPU than
the pair being trained. Inputs go to its device and its logits come back to the caller's; nothing else
changes. (The module keeps such a model out of its registered submodules, so that Lightning moving the
module to its device does not move the large model back.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from .generation import CausalLMComponent, LogitsComponent

__all__ = ["DeviceComponent"]


class DeviceComponent(LogitsComponent):
    """A causal LM living on ``device`` as a generation component: inputs moved there, logits moved back.

    Its KV cache is written by the model, so it stays on the model's device.
    """

    def __init__(self, model: nn.Module, device: str | torch.device) -> None:
        super().__init__()
        self.inner = CausalLMComponent(model)
        self.device = torch.device(device)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None,
        past_key_values: DynamicCache | None,
    ) -> Tensor:
        """Logits on the inputs' device; ``position_ids`` None lets the model number the positions (teacher forcing)."""
        device = self.device
        positions = position_ids.to(device) if position_ids is not None else None
        logits = self.inner(input_ids.to(device), attention_mask.to(device), positions, past_key_values)
        return logits.to(input_ids.device)

    def new_cache(self) -> DynamicCache:
        return self.inner.new_cache()

    def continues_cache(self) -> bool:
        return True

    def next_logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                    cache: DynamicCache) -> Tensor:
        device = self.device
        logits = self.inner.next_logits(input_ids.to(device), attention_mask.to(device), position_ids.to(device), cache)
        return logits.to(input_ids.device)
