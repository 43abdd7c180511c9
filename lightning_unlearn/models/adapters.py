"""EUL "unlearning layers": bottleneck adapters after each feed-forward block, and their closed-form fusion.

Chen & Yang ("Unlearn What You Want to Forget", EMNLP 2023) train one small set of layers per deletion
request inside a frozen model and merge the sets of several requests without the data, from each
request's Gram matrices of the layer inputs. This module is the model side of that:

* :func:`insert_adapters` adds ``x + up(act(down(x)))`` after the MLP of every decoder layer through a
  forward hook, so the base model's modules and state-dict keys stay untouched; ``up`` starts at zero,
  so the model is exactly unchanged until training moves it. The adapters live in one
  :class:`UnlearningLayers` container at ``model.unlearning_layers``.
* :func:`adapters_disabled` turns them off, which gives back the frozen model: EUL's teacher ``F`` is the
  same module, not a second copy in memory.
* :func:`recording_grams` accumulates, for each linear layer of each adapter, the Gram matrix of *its own*
  inputs in float64: the MLP output for ``down``, the activations after the non-linearity for ``up``.
  Inputs are augmented with a constant 1, ``[x, 1]``, so the bias is fused exactly like a weight row;
  the last diagonal entry of every Gram matrix is therefore the number of tokens recorded.
* :func:`fuse` solves ``W_m = (sum_i G_i)^-1 sum_i G_i W_i`` per linear layer (the least-squares fit of
  every request's outputs on every request's inputs).

Fusing the two layers separately is the paper's recipe, and an approximation: the fused ``up`` sees the
fused ``down``'s activations, not any request's own. It only makes sense when the bottleneck units of
different requests correspond, so every request starts from the same seeded ``down`` initialisation
(``seed`` of :func:`insert_adapters`), as models merged from a common start do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

Activation = Literal["gelu", "relu", "silu"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
ATTRIBUTE = "unlearning_layers"
FILENAME = "unlearning_layers.safetensors"
LINEARS = ("down", "up")
_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
_FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of one adapter set; two sets can only be fused when their configs are equal."""

    hidden_size: int
    bottleneck: int
    num_layers: int
    activation: Activation = "gelu"


def _augmented_gram(x: Tensor) -> Tensor:
    """``[x, 1]^T [x, 1]`` in float64 for rows ``x`` [N, d]: the bias column makes biases fuse like weights."""
    a = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    return a.T @ a


class UnlearningLayer(nn.Module):
    """``x + up(act(down(x)))`` with ``up`` zero at start, plus the Gram matrices of its two inputs."""

    def __init__(self, hidden_size: int, bottleneck: int, activation: Activation = "gelu") -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True
        self.record_mask: Tensor | None = None
        # Plain attributes, not buffers: a module-wide ``.to(bfloat16)`` must never round them, and
        # checkpoints and saved sets carry them explicitly. Allocated on the first recorded batch's device.
        self.gram_down: Tensor | None = None
        self.gram_up: Tensor | None = None

    def grams(self) -> dict[str, Tensor]:
        """The two Gram matrices ``[x, 1]^T [x, 1]`` and ``[h, 1]^T [h, 1]`` (zeros before any recording)."""
        sizes = {"down": self.down.in_features + 1, "up": self.up.in_features + 1}
        out = {}
        for name, size in sizes.items():
            gram = getattr(self, f"gram_{name}")
            out[name] = gram if gram is not None else torch.zeros(size, size, dtype=torch.float64)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Computed in the adapter's dtype (float32 adapters in a bfloat16 model train well), returned in x's."""
        a = x.to(self.down.weight.dtype)
        h = self.act(self.down(a))
        if self.record_mask is not None:
            self._record(a, h)
        return (a + self.up(h)).to(x.dtype)

    @torch.no_grad()
    def _record(self, x: Tensor, h: Tensor) -> None:
        mask = self.record_mask
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"The recording mask has shape {tuple(mask.shape)}, the adapter input {tuple(x.shape)}.")
        keep = mask.to(x.device).bool()
        for name, value in (("down", x), ("up", h)):
            gram = _augmented_gram(value.detach()[keep])
            old = getattr(self, f"gram_{name}")
            setattr(self, f"gram_{name}", gram if old is None else old.to(gram.device) + gram)

    def hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of the feed-forward block: adds the adapter to its output when enabled."""
        if not self.enabled:
            return output
        if isinstance(output, tuple):  # blocks that also return e.g. router logits
            return (self(output[0]),) + output[1:]
        return self(output)


class UnlearningLayers(nn.ModuleList):
    """One request's adapters, one per decoder layer, with the hooks that apply them."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(UnlearningLayer(config.hidden_size, config.bottleneck, config.activation)
                         for _ in range(config.num_layers))
        self.config = config
        self.handles: list[torch.utils.hooks.RemovableHandle] = []


def feed_forward_blocks(model: nn.Module) -> list[nn.Module]:
    """The feed-forward block of each decoder layer (``model.layers[i].mlp`` for Llama-style models)."""
    for path in _LAYER_LISTS:
        layers: Any = model
        for name in path.split("."):
            layers = getattr(layers, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            for name in _FEED_FORWARD_NAMES:
                if all(isinstance(getattr(layer, name, None), nn.Module) for layer in layers):
                    return [getattr(layer, name) for layer in layers]
            raise ValueError(
                f"The decoder layers of {type(model).__name__} ({path}) have no feed-forward block named one of "
                f"{_FEED_FORWARD_NAMES}: EUL's unlearning layers go after it, so this architecture is not supported."
            )
    raise ValueError(
        f"Cannot find the decoder layers of {type(model).__name__} (looked for {_LAYER_LISTS}): EUL's unlearning "
        "layers need a transformer whose layers each end in a feed-forward block."
    )


def default_bottleneck(model: nn.Module, hidden_size: int, num_layers: int, fraction: float = 0.005) -> int:
    """Bottleneck width making the adapters about ``fraction`` of the model's parameters (at least 1).

    One adapter has ``r * (2d + 1) + d`` parameters (two weights, two biases).
    """
    total = sum(p.numel() for p in model.parameters())
    return max(1, round((fraction * total / num_layers - hidden_size) / (2 * hidden_size + 1)))


def insert_adapters(
    model: nn.Module, bottleneck: int | None = None, fraction: float = 0.005, activation: Activation = "gelu",
    seed: int = 0, dtype: torch.dtype | None = None,
) -> UnlearningLayers:
    """Add trainable unlearning layers after every feed-forward block of ``model``.

    Args:
        model: a Hugging Face causal LM (Llama-style ``model.model.layers[i].mlp`` or similar).
        bottleneck: width of the adapters; ``None`` sizes them to ``fraction`` of the parameters.
        fraction: target share of parameters when ``bottleneck`` is ``None``.
        activation: non-linearity between the two projections.
        seed: seed of the ``down`` initialisation; keep it equal across requests that will be fused.
        dtype: dtype of the adapters; ``None`` takes the model's. Exactness at initialisation holds either way.
    """
    if hasattr(model, ATTRIBUTE):
        raise ValueError(f"{type(model).__name__} already has unlearning layers; remove_adapters() first.")
    blocks = feed_forward_blocks(model)
    reference = next(model.parameters())
    hidden = model.config.hidden_size
    width = bottleneck or default_bottleneck(model, hidden, len(blocks), fraction)
    config = AdapterConfig(hidden, width, len(blocks), activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = UnlearningLayers(config)
    layers.to(device=reference.device, dtype=dtype or reference.dtype)
    layers.requires_grad_(True)
    model.add_module(ATTRIBUTE, layers)
    layers.handles = [block.register_forward_hook(layer.hook) for block, layer in zip(blocks, layers)]
    return layers


def get_adapters(model: nn.Module) -> UnlearningLayers:
    layers = getattr(model, ATTRIBUTE, None)
    if not isinstance(layers, UnlearningLayers):
        raise ValueError(f"{type(model).__name__} has no unlearning layers: call insert_adapters() first.")
    return layers


def remove_adapters(model: nn.Module) -> None:
    """Take the adapters and their hooks out, leaving the original model."""
    layers = get_adapters(model)
    for handle in layers.handles:
        handle.remove()
    delattr(model, ATTRIBUTE)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in get_adapters(model):
        layer.enabled = enabled


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the original model (EUL's frozen teacher ``F``) inside the block."""
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        set_adapters_enabled(model, True)


@contextmanager
def recording_grams(model: nn.Module, token_mask: Tensor | None) -> Iterator[None]:
    """Accumulate the adapters' input Gram matrices over the tokens where ``token_mask`` [B, T] is 1.

    ``None`` records nothing. The mask is cleared on exit, so a recomputation during backward (gradient
    checkpointing) never counts a token twice.
    """
    layers = get_adapters(model)
    for layer in layers:
        layer.record_mask = token_mask
    try:
        yield
    finally:
        for layer in layers:
            layer.record_mask = None


def reset_grams(model: nn.Module) -> None:
    for layer in get_adapters(model):
        layer.gram_down = layer.gram_up = None


# --- one request's set, on disk -------------------------------------------------------------------------


@dataclass
class AdapterSet:
    """One request's adapter weights (``"{i}.down.weight"``...) and Gram matrices (``"{i}.down"``...)."""

    config: AdapterConfig
    weights: dict[str, Tensor]
    grams: dict[str, Tensor]

    @property
    def tokens(self) -> int:
        """Tokens recorded (the constant column's self-product in the first Gram matrix)."""
        return int(self.grams["0.down"][-1, -1].item()) if self.grams else 0


def collect_grams(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter's Gram matrices, keyed ``"{layer}.down"`` and ``"{layer}.up"``."""
    return {f"{i}.{name}": gram for i, layer in enumerate(get_adapters(model)) for name, gram in layer.grams().items()}


def load_grams(model: nn.Module, grams: dict[str, Tensor]) -> None:
    """Set the adapters' Gram matrices (to resume recording from a checkpoint or a saved set)."""
    for i, layer in enumerate(get_adapters(model)):
        layer.gram_down = grams[f"{i}.down"].double().clone()
        layer.gram_up = grams[f"{i}.up"].double().clone()


def extract_adapter_set(model: nn.Module, grams: dict[str, Tensor] | None = None) -> AdapterSet:
    """Copy the model's adapters (and their Gram matrices, or the given ones) to the CPU."""
    layers = get_adapters(model)
    weights = {k: v.detach().cpu().clone() for k, v in layers.state_dict().items()}
    grams = collect_grams(model) if grams is None else grams
    return AdapterSet(layers.config, weights, {k: v.detach().cpu().clone() for k, v in grams.items()})


def apply_adapter_set(
    model: nn.Module, adapters: AdapterSet, with_grams: bool = False, dtype: torch.dtype | None = None
) -> UnlearningLayers:
    """Load a set into ``model``, inserting adapters of its shape (in ``dtype``, else the set's) if it has none."""
    if not hasattr(model, ATTRIBUTE):
        c = adapters.config
        dtype = dtype or adapters.weights["0.down.weight"].dtype
        insert_adapters(model, c.bottleneck, activation=c.activation, dtype=dtype)
    layers = get_adapters(model)
    if layers.config != adapters.config:
        raise ValueError(f"The adapter set has shape {adapters.config}, the model's adapters {layers.config}.")
    layers.load_state_dict(adapters.weights)
    if with_grams:
        load_grams(model, adapters.grams)
    return layers


def save_adapter_set(adapters: AdapterSet, out_dir: str | Path) -> Path:
    """Write ``OUT_DIR/unlearning_layers.safetensors`` atomically (temporary file, then ``os.replace``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights.{k}": v.contiguous() for k, v in adapters.weights.items()}
    tensors |= {f"grams.{k}": v.contiguous() for k, v in adapters.grams.items()}
    path, tmp = out / FILENAME, out / f".{FILENAME}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"config": json.dumps(asdict(adapters.config))})
    os.replace(tmp, path)
    return path


def load_adapter_set(path: str | Path) -> AdapterSet:
    """Read a set saved by :func:`save_adapter_set` (a directory holding the file, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"No adapter set at {path}: expected a directory containing {FILENAME}.")
    weights, grams = {}, {}
    with safe_open(str(path), framework="pt") as f:
        config = AdapterConfig(**json.loads(f.metadata()["config"]))
        for key in f.keys():
            kind, name = key.split(".", 1)
            (weights if kind == "weights" else grams)[name] = f.get_tensor(key)
    return AdapterSet(config, weights, grams)


# --- fusion -----------------------------------------------------------------------------------------------


def fuse_linear(thetas: Sequence[Tensor], grams: Sequence[Tensor], ridge: float = 1e-6) -> Tensor:
    """``(sum_i G_i)^-1 sum_i G_i Theta_i`` for weights ``Theta_i`` [in, out] acting as ``x @ Theta``.

    This minimises ``sum_i ||X_i Theta - X_i Theta_i||^2``. ``ridge > 0`` adds ``lam * ||Theta - mean_i
    Theta_i||^2`` with ``lam = ridge * mean(diag(sum_i G_i))``: directions no request's data ever spanned
    keep the average weight instead of going to zero, and equal ``Theta_i`` fuse to themselves exactly.
    ``ridge = 0`` takes the least-squares (minimum-norm when singular) solution.
    """
    gram = torch.stack([g.double() for g in grams]).sum(0)
    rhs = sum(g.double() @ t.double() for g, t in zip(grams, thetas))
    if ridge <= 0:
        return torch.linalg.lstsq(gram, rhs).solution
    lam = ridge * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    mean = torch.stack([t.double() for t in thetas]).mean(0)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(gram + lam * eye, rhs + lam * mean)


def fuse(sets: Sequence[AdapterSet], ridge: float = 1e-6) -> AdapterSet:
    """One adapter set from several requests' sets, each linear layer fused with its own inputs' Grams.

    The result carries the summed Gram matrices, so it can be fused again with later requests.
    """
    if not sets:
        raise ValueError("Nothing to fuse: give at least one adapter set.")
    config = sets[0].config
    for s in sets:
        if s.config != config:
            raise ValueError(f"Adapter sets of different shapes cannot be fused: {config} and {s.config}.")
        if s.tokens == 0:
            raise ValueError("An adapter set has no recorded Gram matrices (0 tokens), so it cannot be fused.")
    weights, grams = {}, {}
    for i in range(config.num_layers):
        for name in LINEARS:
            key = f"{i}.{name}"
            thetas = [torch.cat([s.weights[f"{key}.weight"].T, s.weights[f"{key}.bias"][None]]) for s in sets]
            fused = fuse_linear(thetas, [s.grams[key] for s in sets], ridge)
            dtype = sets[0].weights[f"{key}.weight"].dtype
            weights[f"{key}.weight"] = fused[:-1].T.contiguous().to(dtype)
            weights[f"{key}.bias"] = fused[-1].contiguous().to(dtype)
            grams[key] = torch.stack([s.grams[key].double() for s in sets]).sum(0)
    return AdapterSet(config, weights, grams)
