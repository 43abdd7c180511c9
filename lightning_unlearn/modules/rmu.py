"""RMU (Li et al. 2024, the WMDP paper): representation misdirection for unlearning, white-box (direct mode).

The forget data's activations at one layer are pushed towards a fixed random vector of large norm, which
scrambles what the later layers read from them; the retain data's activations at the same layer are held at
the frozen model's. Only a few weight matrices at or below that layer are trained.

Offset mode is refused: RMU acts on the hidden states of the model that holds the knowledge, and in offset
unlearning that is the large model, frozen and possibly served as a black box. Steering the small model's
hidden states instead would move ``z_S`` but say nothing about where the large model's representation of the
forget data goes; an offset version would need the large model's activations (white-box), i.e. direct RMU on
the large model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..losses.representation import activation_mse, answer_positions, control_vector
from .base import PartOutput, RetainLoss, UnlearnModule, with_step_loss

DEFAULT_PARAMS = r"mlp\.down_proj\.weight"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: the first ``ModuleList`` as long as ``config.num_hidden_layers``
    (``model.layers`` in Llama, Gemma, Mistral, Phi; ``transformer.h`` in GPT-2; ``gpt_neox.layers``).

    Raises:
        ValueError: if no such list exists.
    """
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"Found no list of {count} decoder layers in {type(model).__name__}: RMU needs a transformer "
                     "whose blocks are an nn.ModuleList of length config.num_hidden_layers.")


@contextmanager
def captured_output(layer: nn.Module, into: list[Tensor]) -> Iterator[None]:
    """Append ``layer``'s output hidden states ``[B, T, d]`` (the first element of a tuple output) to ``into``."""
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        into.append(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class RMU(UnlearnModule):
    """RMU: ``L = gamma * mse(h_l(forget), c u) + retain_weight * mse(h_l(retain), h_l^frozen(retain))``.

    ``h_l`` is the output of decoder layer ``layer_id`` at the answer tokens, ``u`` a fixed random unit vector
    (entries uniform on [0, 1), normalised; drawn once from ``control_seed``), ``c`` the steering coefficient, and
    ``mse`` the squared error averaged over the hidden size and over answer tokens
    (:func:`~lightning_unlearn.losses.representation.activation_mse`). Only the parameters of layers
    ``update_layers`` whose names (inside the layer) match ``param_pattern`` are trained; the frozen copy gives
    the retain targets. Source: Li et al. 2024, WMDP, section 5 and its code ``rmu/unlearn.py`` (layer 7, layers
    5-7's ``mlp.down_proj``, c = 6.5 and alpha = 1200 for Zephyr-7B; its script defaults c = 20, alpha = 100);
    open-unlearning's TOFU config uses c = 2, alpha = 1 and trains every parameter. Defaults here: the WMDP
    paper's Zephyr setting, which needs re-tuning per model (the norm of ``h_l`` sets the scale of ``c``).
    Direct mode only (see the module docstring).

    Args:
        layer_id: decoder layer whose output is steered (0-based).
        update_layers: layers whose parameters train; ``null``: ``layer_id`` and the two below it.
        param_pattern: regular expression a parameter's name inside its layer must fully match to train
            (``.*``: all of them).
        steering_coeff: ``c``, the norm of the forget target.
        retain_weight: alpha, weight of the retain activation loss.
        gamma: weight of the forget activation loss.
        control_seed: seed of the random direction ``u`` (kept in the hyper-parameters, so a resumed run and
            every process use the same one).
        large_model: must stay ``null``.
    """

    modes = ("direct",)  # it steers the hidden states of the one model it unlearns

    retain_loss: RetainLoss = "none"
    needs_reference = True  # the frozen copy gives the retain targets

    def __init__(
        self,
        layer_id: int = 7,
        update_layers: list[int] | None = None,
        param_pattern: str = DEFAULT_PARAMS,
        steering_coeff: float = 6.5,
        retain_weight: float = 1200.0,
        gamma: float = 1.0,
        control_seed: int = 0,
        large_model: str | None = None,
        **kwargs: Any,
    ) -> None:  # pragma: no mutate block
        if large_model is not None:
            raise ValueError(
                f"RMU runs in direct mode only (large_model={large_model!r} given): it steers the hidden states of the "
                "model that holds the knowledge, which offset mode keeps frozen. Set --model.large_model null (to "
                "unlearn the large model itself, pass it as --model.small_model)."
            )
        unsupported = sorted(k for k in ("lora_rank", "logit_cache", "large_device") if kwargs.get(k) is not None)
        if unsupported:
            raise ValueError(f"RMU does not take {unsupported}: it trains the parameters param_pattern selects and "
                             "reads hidden states, not cached logits.")
        super().__init__(retain_weight=retain_weight, gamma=gamma, large_model=None, **kwargs)
        self._control: Tensor | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        return ("forget", "retain")

    def configure_model(self) -> None:
        """Build the model and its frozen copy, then freeze every parameter but the selected ones."""
        if self.model is not None:
            return
        super().configure_model()
        self.model.requires_grad_(False)
        selected = self.selected_parameters()
        for param in selected.values():
            param.requires_grad_(True)

    def selected_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters: ``param_pattern`` in ``update_layers``, by qualified name.

        Raises:
            ValueError: if a layer index is out of range or nothing matches.
        """
        h = self.hparams
        layers = decoder_layers(self.model)
        if not 0 <= h.layer_id < len(layers):
            raise ValueError(f"layer_id={h.layer_id} but the model has {len(layers)} decoder layers (0-"
                             f"{len(layers) - 1}): set --model.layer_id.")
        indices = h.update_layers if h.update_layers is not None else range(max(0, h.layer_id - 2), h.layer_id + 1)
        bad = [i for i in indices if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"update_layers {bad} out of range for {len(layers)} decoder layers.")
        pattern = re.compile(h.param_pattern)
        selected = {f"{i}.{name}": p for i in indices for name, p in layers[i].named_parameters()
                    if pattern.fullmatch(name)}
        if not selected:
            names = sorted(name for name, _ in layers[indices[0]].named_parameters())
            raise ValueError(f"param_pattern {h.param_pattern!r} matches no parameter of layers {list(indices)}; their "
                             f"names are {names}.")
        return selected

    def control(self, dim: int, device: torch.device) -> Tensor:
        """The fixed forget target ``c u`` ``[dim]``, drawn once from ``control_seed``."""
        if self._control is None or self._control.shape[0] != dim:
            generator = torch.Generator().manual_seed(self.hparams.control_seed)
            self._control = control_vector(dim, self.hparams.steering_coeff, generator)
        return self._control.to(device)

    def _activations(self, model: nn.Module, part: dict[str, Tensor]) -> Tensor:
        captured: list[Tensor] = []
        with captured_output(decoder_layers(model)[self.hparams.layer_id], captured):
            model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False)
        return captured[0]

    def compute_losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """``forget_loss`` and ``retain_loss`` (token means of this micro-batch) and their weighted ``loss``; while
        training also ``step_loss`` with the token means taken over the optimizer step."""
        h = self.hparams
        forget, retain = batch["forget"], batch["retain"]
        h_forget = self._activations(self.model, forget)
        h_retain = self._activations(self.model, retain)
        with torch.no_grad():
            h_frozen = self._activations(self.reference, retain)
        target = self.control(h_forget.shape[-1], h_forget.device)
        forget_loss = activation_mse(h_forget, target, answer_positions(forget["labels"]))
        retain_loss = activation_mse(h_retain, h_frozen, answer_positions(retain["labels"]))
        losses = {"loss": h.gamma * forget_loss + h.retain_weight * retain_loss, "forget_loss": forget_loss,
                  "retain_loss": retain_loss}
        parts = {name: PartOutput(hidden, None, batch[name]["labels"], *self.step_scales(batch[name]))
                 for name, hidden in (("forget", h_forget), ("retain", h_retain))}
        return with_step_loss(losses, [(h.gamma * forget_loss, parts["forget"], "tokens"),
                                       (h.retain_weight * retain_loss, parts["retain"], "tokens")])
