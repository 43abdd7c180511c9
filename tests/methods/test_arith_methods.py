"""RMU, ULD and WHP as wired into their modules: losses against the formulas on the models' own logits and hidden
states, the direction of one step, token means over the step, ULD's combined model in every place it is served,
and the command line in every supported mode.

Expected values are computed from the saved models called directly (not through the module), in float64, with the
helpers of ``test_loss_wiring.py``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import Tensor

import tests.unit.modules.test_loss_wiring as wiring
from lightning_unlearn.cli import main
from lightning_unlearn.data import UnlearnDataModule
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.modules import RMU, ULD, WHP, UnlearnModule
from token_means_cases import SPLITS, KeepStart, relative_difference, trainables, write_dataset

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
GAMMA, RETAIN_WEIGHT = 0.7, 1.9


@pytest.fixture(scope="module")
def batch(tiny_world: dict) -> dict:
    """Two forget rows and two retain rows of other authors."""
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=256)
    forget, retain = load_split("bundled", "forget01")[:2], load_split("bundled", "retain99")
    items = [{"forget": formatter.encode(row["question"], row["answer"]),
              "retain": formatter.encode(retain[10 + i]["question"], retain[10 + i]["answer"])}
             for i, row in enumerate(forget)]
    return collate_parts(items, formatter.tokenizer.pad_token_id)


def build(cls: type[UnlearnModule], world: dict, scale: float = 0.05, **kwargs) -> UnlearnModule:
    """The module on the tiny models, its trainable parameters moved away from where they started."""
    return wiring.set_up_and_moved(cls(**kwargs), scale)


def raw(model: torch.nn.Module, part: dict, vocab: int) -> Tensor:
    return wiring.raw(model, part, vocab)


def hidden(model: torch.nn.Module, part: dict, layer: int) -> Tensor:
    """Output of decoder layer ``layer`` (``hidden_states[layer + 1]``; not the last layer, which is normed)."""
    out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer + 1].double()


def masked_mse(h: Tensor, target: Tensor, labels: Tensor) -> Tensor:
    mask = labels != -100
    mask[:, 0] = False
    return ((h - target) ** 2).mean(dim=-1)[mask].mean()


def uniform_kl(logits: Tensor, labels: Tensor) -> Tensor:
    """``KL(u || p) = sum_v (1/V) log((1/V) / p(v))`` at positions predicting an answer token."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    vocab = logp.shape[-1]
    kl = ((1 / vocab) * (-torch.log(torch.tensor(float(vocab), dtype=torch.float64)) - logp)).sum(dim=-1)
    return kl[labels[:, 1:] != -100].mean()


def plausible(z_large: Tensor, tau: float) -> Tensor:
    """Tokens with ``p >= tau * p_max`` or among the ``int(tau V)`` most likely, written out with a sort."""
    p = torch.softmax(z_large.double(), dim=-1)
    k = max(1, int(tau * p.shape[-1]))
    kth = p.sort(dim=-1, descending=True).values[..., k - 1 : k]
    return (p >= tau * p.max(dim=-1, keepdim=True).values) | (p >= kth)


# --- RMU ----------------------------------------------------------------------------------------------------


def rmu(world: dict, **kwargs) -> RMU:
    options = {"layer_id": 0, "update_layers": [0, 1], "steering_coeff": 3.0, "gamma": GAMMA,
               "retain_weight": RETAIN_WEIGHT, **kwargs}
    return build(RMU, world, small_model=world["large"], **options)


def test_rmu_compute_losses_equals_the_formula_on_the_hidden_states(tiny_world: dict, batch: dict) -> None:
    module = rmu(tiny_world)
    original = load_causal_lm(tiny_world["large"], "float32").eval()
    with torch.no_grad():
        got = module.compute_losses(batch)
        f, r = batch["forget"], batch["retain"]
        u = torch.rand(32, generator=torch.Generator().manual_seed(0)).double()
        forget = masked_mse(hidden(module.model, f, 0), 3.0 * u / u.norm(), f["labels"])
        retain = masked_mse(hidden(module.model, r, 0), hidden(original, r, 0), r["labels"])
    torch.testing.assert_close(got["forget_loss"].double(), forget, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["retain_loss"].double(), retain, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got["loss"].double(), GAMMA * forget + RETAIN_WEIGHT * retain, rtol=1e-5, atol=1e-7)
    assert retain > 1e-6, "the retain term must be informative here"


def test_rmu_trains_only_the_chosen_weights_and_refuses_offset_mode(tiny_world: dict) -> None:
    module = rmu(tiny_world, update_layers=None, layer_id=1)
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match="direct mode only"):
        RMU(small_model=tiny_world["small"], large_model=tiny_world["large"])
    with pytest.raises(ValueError, match="layer_id=5"):
        rmu(tiny_world, layer_id=5)
    with pytest.raises(ValueError, match="matches no parameter"):
        rmu(tiny_world, param_pattern="nothing")


@pytest.mark.parametrize(("kwargs", "falls"), [({"retain_weight": 0.0, "gamma": 1.0}, "forget"),
                                               ({"retain_weight": 1.0, "gamma": 0.0}, "retain")])
def test_rmu_step_moves_activations_towards_their_targets(kwargs: dict, falls: str, tiny_world: dict,
                                                          batch: dict) -> None:
    module = rmu(tiny_world, **kwargs)
    before = module.compute_losses(batch)[f"{falls}_loss"].item()
    wiring.sgd_step(module, batch)
    after = module.compute_losses(batch)[f"{falls}_loss"].item()
    assert after < before - 1e-7, (before, after)


# --- ULD ----------------------------------------------------------------------------------------------------


def uld(world: dict, **kwargs) -> ULD:
    return build(ULD, world, small_model=world["small"], large_model=world["large"], large_dtype="float32",
                 **{"gamma": GAMMA, "retain_weight": RETAIN_WEIGHT, **kwargs})


def test_uld_trains_the_assistant_alone_on_remember_and_uniform(tiny_world: dict, batch: dict) -> None:
    module = uld(tiny_world)
    vocab = len(module.tokenizer)
    with torch.no_grad():
        got = module.compute_losses(batch)
        forget = wiring.nll(raw(module.model, batch["forget"], vocab), batch["forget"]["labels"])
        retain = uniform_kl(raw(module.model, batch["retain"], vocab), batch["retain"]["labels"])
    torch.testing.assert_close(got["forget_loss"].double(), forget, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["retain_loss"].double(), retain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["loss"].double(), GAMMA * forget + RETAIN_WEIGHT * retain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kwargs", "falls"), [({"retain_weight": 0.0, "gamma": 1.0}, "forget"),
                                               ({"retain_weight": 1.0, "gamma": 0.0}, "retain")])
def test_uld_step_makes_the_assistant_remember_forget_and_flatten_retain(kwargs: dict, falls: str, tiny_world: dict,
                                                                         batch: dict) -> None:
    module = uld(tiny_world, **kwargs)
    before = module.compute_losses(batch)[f"{falls}_loss"].item()
    wiring.sgd_step(module, batch)
    assert module.compute_losses(batch)[f"{falls}_loss"].item() < before - 1e-7


def test_uld_model_is_the_filtered_difference_in_training_export_and_generation(tiny_world: dict, batch: dict,
                                                                                tmp_path: Path) -> None:
    tau = 0.9  # the tiny random large model is nearly uniform: only a tau this high drops tokens (by k = int(tau V))
    module = uld(tiny_world, scale=0.5, alpha=-0.8, relative_top=tau).eval()
    part = batch["forget"]
    vocab = len(module.tokenizer)
    with torch.no_grad():
        z_large = raw(load_causal_lm(tiny_world["large"], "float32"), part, vocab)
        keep = plausible(z_large, tau)
        want = z_large + keep * (-0.8) * raw(module.model, part, vocab)
        got = module(part["input_ids"], part["attention_mask"]).double()
    assert 0 < keep.double().mean() < 1, "the filter must drop some tokens and keep others here"
    attended = part["attention_mask"].bool()
    torch.testing.assert_close(got[attended], want[attended], rtol=1e-5, atol=1e-5)

    module.export(tmp_path / "uld")
    loaded = UnlearnedModel.from_export(tmp_path / "uld", large_dtype="float32")
    assert loaded.composition.reference_model is None and loaded.composition.relative_top == tau
    torch.testing.assert_close(loaded.logits(part["input_ids"], part["attention_mask"]).double()[attended],
                               want[attended], rtol=1e-5, atol=1e-5)

    # Generation with one KV cache per model equals greedy decoding by full recomputation of the filtered logits.
    prompt_ids, prompt_mask = loaded.prompt_batch(["Who is Basil Mahfouz Al-Kuwaiti?"])
    new = module.generate(prompt_ids, prompt_mask, max_new_tokens=6)
    ids, mask = prompt_ids, prompt_mask
    for step in range(new.shape[1]):
        with torch.no_grad():
            token = loaded.logits(ids, mask)[:, -1].argmax(dim=-1)
        assert int(token) == int(new[0, step])
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, mask[:, -1:]], 1)
    assert torch.equal(loaded.generate_ids(prompt_ids, prompt_mask, max_new_tokens=6), new)


def test_uld_exports_compose_and_refuse_referenced_offsets(tiny_world: dict, tmp_path: Path) -> None:
    first, second = uld(tiny_world, relative_top=0.9), uld(tiny_world, scale=0.2, relative_top=0.9)
    first.export(tmp_path / "a")
    second.export(tmp_path / "b")
    composed = UnlearnedModel.from_export([tmp_path / "a", tmp_path / "b"], alphas=[-0.5, -0.3], large_dtype="float32")
    ids = torch.tensor([[5, 17, 42, 8]])
    mask = torch.ones_like(ids)
    vocab = len(first.tokenizer)
    with torch.no_grad():
        z_large = composed.large(input_ids=ids, attention_mask=mask).logits[..., :vocab].double()
        delta = sum(a * m.model(input_ids=ids, attention_mask=mask).logits[..., :vocab].double()
                    for a, m in ((-0.5, first), (-0.3, second)))
    torch.testing.assert_close(composed.logits(ids, mask).double(), z_large + plausible(z_large, 0.9) * delta,
                               rtol=1e-5, atol=1e-5)
    wiring.moved(wiring.GA, tiny_world, True).export(tmp_path / "ga")
    with pytest.raises(ValueError, match="reference_model"):
        UnlearnedModel.from_export([tmp_path / "a", tmp_path / "ga"])


def test_uld_needs_a_large_model(tiny_world: dict) -> None:
    with pytest.raises(ValueError, match="large_model"):
        ULD(small_model=tiny_world["small"])


# --- WHP ----------------------------------------------------------------------------------------------------


def whp(world: dict, offset: bool, reinforced_model: str, **kwargs) -> WHP:
    large = {"large_model": world["large"], "large_dtype": "float32", "alpha": wiring.ALPHA} if offset else {}
    return build(WHP, world, small_model=world["small"], reinforced_model=reinforced_model, gamma=GAMMA,
                 retain_weight=RETAIN_WEIGHT, **large, **kwargs)


def whp_targets(module: WHP, world: dict, reinforced_model: str, part: dict, coeff: float) -> Tensor:
    vocab = len(module.tokenizer)
    small = raw(load_causal_lm(world["small"], "float32"), part, vocab)
    base = raw(load_causal_lm(world["large"], "float32"), part, vocab) if module.large is not None else small
    return base - coeff * torch.relu(raw(load_causal_lm(reinforced_model, "float32"), part, vocab) - small)


def ce_towards(logits: Tensor, targets: Tensor, labels: Tensor, hard: bool) -> Tensor:
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    q = targets[:, :-1]
    ce = (-logp.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1) if hard
          else -(torch.softmax(q, dim=-1) * logp).sum(-1))
    return ce[labels[:, 1:] != -100].mean()


@pytest.mark.parametrize("target", ["hard", "soft"])
@pytest.mark.parametrize("offset", [True, False], ids=["offset", "direct"])
def test_whp_compute_losses_equals_the_formula(offset: bool, target: str, tiny_world: dict, batch: dict,
                                               reinforced: str, originals_of_world: dict) -> None:
    module = whp(tiny_world, offset, reinforced, reinforce_coeff=3.0, target=target, retain_loss="kl")
    with torch.no_grad():
        got = module.compute_losses(batch)
    parts = wiring.hand_parts(module, originals_of_world, batch)
    f = parts["forget"]
    targets = whp_targets(module, tiny_world, reinforced, batch["forget"], 3.0)
    forget = ce_towards(f.z, targets, f.labels, target == "hard")
    retain = wiring.kl_ref_model(parts["retain"].ref, parts["retain"].z, parts["retain"].labels)
    torch.testing.assert_close(got["forget_loss"].double(), forget, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"].double(), GAMMA * forget + RETAIN_WEIGHT * retain, rtol=2e-5, atol=1e-6)
    base_argmax = f.ref[:, :-1].argmax(-1)[f.labels[:, 1:] != -100]
    assert (targets[:, :-1].argmax(-1)[f.labels[:, 1:] != -100] != base_argmax).any(), "targets must differ from base"


@pytest.fixture(scope="module")
def originals_of_world(tiny_world: dict) -> dict[str, torch.nn.Module]:
    return {"large": load_causal_lm(tiny_world["large"], "float32").eval(),
            "small": load_causal_lm(tiny_world["small"], "float32").eval()}


@pytest.mark.parametrize("offset", [True, False], ids=["offset", "direct"])
def test_whp_step_moves_the_model_towards_the_generic_targets(offset: bool, tiny_world: dict, batch: dict,
                                                              reinforced: str) -> None:
    module = whp(tiny_world, offset, reinforced)
    before = module.compute_losses(batch)["forget_loss"].item()
    wiring.sgd_step(module, batch)
    assert module.compute_losses(batch)["forget_loss"].item() < before - 1e-7


def test_whp_checkpoint_leaves_the_reinforced_model_out(tiny_world: dict, reinforced: str) -> None:
    module = whp(tiny_world, True, reinforced)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("model.") for k in checkpoint["state_dict"])


# --- token means over the step --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_data(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tiny_world["tokenizer"], tmp_path_factory.mktemp("arith_token_means"))


def one_step(module: UnlearnModule, data: Path, batch_size: int, accumulate: int, root: Path) -> dict[str, Tensor]:
    datamodule = UnlearnDataModule(forget_split="forget", retain_split="retain", dataset=str(data),
                                   batch_size=batch_size, max_length=256, evaluation="loss")
    keep = KeepStart()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[keep])
    trainer.fit(module, datamodule=datamodule)
    end = trainables(module)
    return {n: end[n] - keep.start[n] for n in end}


@pytest.mark.parametrize("method", ["RMU", "ULD", "WHP"])
def test_every_split_of_a_step_gives_the_same_update(method: str, tiny_world: dict, step_data: Path, reinforced: str,
                                                     tmp_path: Path) -> None:
    sgd = partial(torch.optim.SGD, lr=1.0)
    factories = {
        "RMU": lambda: RMU(small_model=tiny_world["large"], layer_id=0, steering_coeff=3.0, retain_weight=1.0,
                           optimizer=sgd),
        "ULD": lambda: ULD(small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="float32",
                           optimizer=sgd),
        "WHP": lambda: WHP(small_model=tiny_world["small"], large_model=tiny_world["large"], large_dtype="float32",
                           reinforced_model=reinforced, retain_loss="nll", optimizer=sgd),
    }
    updates = {name: one_step(factories[method](), step_data, size, accumulate, tmp_path / name)
               for name, (_, size, accumulate) in SPLITS.items()}
    assert sum(float(u.abs().sum()) for u in updates["1x4"].values()) > 1e-4
    for name in ("2x2", "4x1"):
        assert relative_difference(updates[name], updates["1x4"]) < 1e-5, name


# --- the command line -----------------------------------------------------------------------------------------


CLI_CASES = [("RMU", False), ("ULD", True), ("WHP", True), ("WHP", False)]


@pytest.mark.parametrize(("method", "offset"), CLI_CASES, ids=[f"{m}-{'offset' if o else 'direct'}" for m, o in CLI_CASES])
def test_fit_runs_in_every_supported_mode(method: str, offset: bool, tiny_world: dict, reinforced: str,
                                          tmp_cwd: Path) -> None:
    extra = {"RMU": ["--model.small_model", tiny_world["large"], "--model.layer_id", "1"],
             "ULD": ["--model.small_model", tiny_world["small"]],
             "WHP": ["--model.small_model", tiny_world["small"], "--model.reinforced_model", reinforced]}[method]
    large = ["--model.large_model", tiny_world["large"] if offset else "null"]
    cli = main(["fit", "--config", FAST, "--model", method, *large, *extra])
    assert type(cli.model).__name__ == method and (cli.model.large is not None) == offset
    assert cli.trainer.global_step == 1
    assert {"train/loss", "train/forget_loss", "train/retain_loss", "val/forget_nll"} <= set(cli.trainer.callback_metrics)


@pytest.mark.parametrize(("method", "comment"), [("RMU", "# decoder layer whose output is steered"),
                                                 ("ULD", "# signed strength of the assistant"),
                                                 ("WHP", "# ``a``, how far the reinforced rise")])
def test_print_config_documents_the_method(method: str, comment: str, tiny_world: dict, tmp_cwd: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    required = ["--model.reinforced_model", "runs/reinforced"] if method == "WHP" else []
    with pytest.raises(SystemExit):
        main(["fit", "--config", FAST, "--model", method, "--model.small_model", tiny_world["small"], *required,
              "--print_config"])
    printed = capsys.readouterr().out
    assert comment in printed and f"class_path: lightning_unlearn.modules.{method}" in printed


def test_uld_refuses_a_positive_alpha(tiny_world: dict) -> None:
    """A config written for the other offsets (alpha: 1.0) would add the remembering assistant instead."""
    with pytest.raises(ValueError, match="--model.alpha -0.8"):
        ULD(small_model=tiny_world["small"], large_model=tiny_world["large"], alpha=1.0)
