"""EUL: unlearning layers (size, exact identity at start, teacher by disabling), Gram recording, closed-form
fusion against least squares, the objective against hand-computed values, gradients, checkpoints, the CLI,
and two requests fused end to end."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_unlearn.cli import main
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.losses.functional import nll_mean
from lightning_unlearn.models.adapters import (
    AdapterConfig, AdapterSet, UnlearningLayers, adapters_disabled, apply_adapter_set, collect_grams,
    default_bottleneck, extract_adapter_set, fuse, fuse_linear, get_adapters, insert_adapters, load_adapter_set,
    recording_grams, remove_adapters, save_adapter_set,
)
from lightning_unlearn.commands import main as command
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import EUL, PartOutput
from lightning_unlearn.modules.eul import eul_objective

ROOT = Path(__file__).resolve().parents[2]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")


def built(**kwargs) -> EUL:
    module = EUL(**kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def make_batch(tokenizer_dir: str, forget: list[dict], retain: list[dict]) -> dict:
    formatter = PromptFormatter(load_tokenizer(tokenizer_dir), max_length=256)
    items = [{"forget": formatter.encode(f["question"], f["answer"]), "retain": formatter.encode(r["question"], r["answer"])}
             for f, r in zip(forget, retain)]
    return collate_parts(items, formatter.tokenizer.pad_token_id)


def logits(model: torch.nn.Module, part: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {"forget": load_split("bundled", "forget01"), "retain": load_split("bundled", "retain99")[:16]}


# --- the layers ---------------------------------------------------------------------------------------------


def test_default_size_is_half_a_percent_for_llama_2_7b() -> None:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    layers = insert_adapters(model)
    assert layers.config.bottleneck == 128
    assert sum(p.numel() for p in layers.parameters()) / total == pytest.approx(0.005, rel=0.01)


def test_adapters_are_the_nearest_size_and_leave_logits_exactly_unchanged(tiny_world: dict, rows: dict) -> None:
    model = load_causal_lm(tiny_world["large"]).eval()
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])["forget"]
    before, total = logits(model, batch), sum(p.numel() for p in model.parameters())
    layers = insert_adapters(model)
    c = layers.config
    added = sum(p.numel() for p in layers.parameters())
    assert added == c.num_layers * (c.bottleneck * (2 * c.hidden_size + 1) + c.hidden_size)
    per_unit = c.num_layers * (2 * c.hidden_size + 1)  # parameters one more bottleneck unit adds
    assert abs(added - 0.005 * total) <= per_unit / 2
    assert c.bottleneck == default_bottleneck(load_causal_lm(tiny_world["large"]), c.hidden_size, c.num_layers)
    assert torch.equal(logits(model, batch), before)


def test_disabled_adapters_give_the_base_model_and_removal_restores_it(tiny_world: dict, rows: dict) -> None:
    model = load_causal_lm(tiny_world["large"]).eval()
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])["forget"]
    base = logits(model, batch)
    insert_adapters(model, bottleneck=4)
    with torch.no_grad():
        for p in get_adapters(model).parameters():
            p.normal_()
    assert not torch.allclose(logits(model, batch), base)
    with adapters_disabled(model):
        assert torch.equal(logits(model, batch), base)
    assert not torch.allclose(logits(model, batch), base)
    remove_adapters(model)
    assert torch.equal(logits(model, batch), base) and not hasattr(model, "unlearning_layers")


def test_unsupported_architecture_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="Cannot find the decoder layers of Linear"):
        insert_adapters(torch.nn.Linear(3, 3))


def test_gram_matrices_are_those_of_each_linear_layers_own_inputs(tiny_world: dict, rows: dict) -> None:
    model = load_causal_lm(tiny_world["large"]).eval()
    captured = []
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    layers = insert_adapters(model, bottleneck=3, activation="relu")
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])["forget"]
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch should have padding, which must not be recorded"
    with recording_grams(model, mask):
        logits(model, batch)
    x = captured[0][mask.bool()].double()  # attended tokens only
    h = torch.relu(x @ layers[1].down.weight.double().T + layers[1].down.bias.double())
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    grams = collect_grams(model)
    torch.testing.assert_close(grams["1.down"], torch.cat([x, ones], 1).T @ torch.cat([x, ones], 1))
    torch.testing.assert_close(grams["1.up"], torch.cat([h, ones], 1).T @ torch.cat([h, ones], 1))
    assert grams["1.down"].dtype == torch.float64 and grams["0.down"][-1, -1] == mask.sum()
    logits(model, batch)  # outside the context nothing is recorded
    assert torch.equal(collect_grams(model)["1.down"], grams["1.down"])


# --- fusion -------------------------------------------------------------------------------------------------


def test_fusion_is_the_least_squares_fit_of_every_requests_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)]
    ws = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in xs]
    expected = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w for x, w in zip(xs, ws)])).solution
    grams = [x.T @ x for x in xs]
    torch.testing.assert_close(fuse_linear(ws, grams, ridge=0.0), expected)
    torch.testing.assert_close(fuse_linear(ws, grams), expected, atol=1e-5, rtol=1e-5)


def test_equal_weights_fuse_to_themselves_even_when_the_data_span_too_little() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 2, generator=g, dtype=torch.float64)
    grams = [(x := torch.randn(n, 6, generator=g, dtype=torch.float64)).T @ x for n in (2, 3)]  # rank 5 < 6
    torch.testing.assert_close(fuse_linear([w, w], grams), w)


def random_set(config: AdapterConfig, inputs: dict[str, torch.Tensor], seed: int) -> AdapterSet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = UnlearningLayers(config)
        for p in layers.parameters():
            torch.nn.init.normal_(p)
    grams = {}
    for key, x in inputs.items():
        a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        grams[key] = a.T @ a
    return AdapterSet(config, {k: v.detach() for k, v in layers.state_dict().items()}, grams)


def test_fuse_sets_fits_weights_and_biases_on_each_layers_inputs(tmp_path: Path) -> None:
    config = AdapterConfig(hidden_size=4, bottleneck=2, num_layers=1)
    g = torch.Generator().manual_seed(2)
    inputs = [{"0.down": torch.randn(n, 4, generator=g, dtype=torch.float64),
               "0.up": torch.randn(n, 2, generator=g, dtype=torch.float64)} for n in (9, 12)]
    sets = [random_set(config, x, seed) for seed, x in enumerate(inputs)]
    for i, s in enumerate(sets):  # round trip through the file format on the way
        save_adapter_set(s, tmp_path / f"r{i}")
    fused = fuse([load_adapter_set(tmp_path / f"r{i}") for i in range(2)], ridge=0.0)
    for key, size in (("0.down", 4), ("0.up", 2)):
        a = [torch.cat([x[key], torch.ones(len(x[key]), 1, dtype=torch.float64)], 1) for x in inputs]
        y = [ai @ torch.cat([s.weights[f"{key}.weight"].T, s.weights[f"{key}.bias"][None]]).double()
             for ai, s in zip(a, sets)]
        theta = torch.linalg.lstsq(torch.cat(a), torch.cat(y)).solution
        torch.testing.assert_close(fused.weights[f"{key}.weight"], theta[:size].T.float())
        torch.testing.assert_close(fused.weights[f"{key}.bias"], theta[size].float())
        torch.testing.assert_close(fused.grams[key], sets[0].grams[key] + sets[1].grams[key])
    same = fuse([sets[0], AdapterSet(config, sets[0].weights, sets[1].grams)])
    for key, value in sets[0].weights.items():
        torch.testing.assert_close(same.weights[key], value)
    assert fused.tokens == 21


def test_fuse_command_writes_a_loadable_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = AdapterConfig(hidden_size=4, bottleneck=2, num_layers=1)
    x = {"0.down": torch.randn(8, 4, dtype=torch.float64), "0.up": torch.randn(8, 2, dtype=torch.float64)}
    for i in range(2):
        save_adapter_set(random_set(config, x, i), tmp_path / f"r{i}")
    command(["fuse", str(tmp_path / "out"), str(tmp_path / "r0"), str(tmp_path / "r1")])
    assert "fused 2 adapter sets (16 tokens)" in capsys.readouterr().out
    assert load_adapter_set(tmp_path / "out").tokens == 16
    with pytest.raises(SystemExit):
        command(["fuse", "--help"])


# --- the module ---------------------------------------------------------------------------------------------


def test_objective_matches_a_hand_computed_value() -> None:
    forget = PartOutput(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]), torch.zeros(1, 3, 2),
                        torch.tensor([[-100, 0, 1]]))
    retain = PartOutput(torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]), torch.zeros(1, 3, 2),
                        torch.tensor([[-100, 1, -100]]))
    e = math.e
    kl_f = (0.0 + (math.log((1 + e) / 2) - 0.5)) / 2  # two answer positions; the first has equal logits
    nll_f = (math.log(2) + math.log(1 + e)) / 2
    kl_r = math.log(0.5) - 1 + math.log(1 + e**2)
    nll_r = math.log(1 + e**2)
    out = eul_objective(forget, retain)
    assert out["kl_forget"].item() == pytest.approx(kl_f, rel=1e-6)
    assert out["nll_forget"].item() == pytest.approx(nll_f, rel=1e-6)
    assert out["kl_retain"].item() == pytest.approx(kl_r, rel=1e-6)
    assert out["nll_retain"].item() == pytest.approx(nll_r, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.8 * kl_r - kl_f + 1.0 * nll_r - 0.2 * nll_f, rel=1e-6)
    only_retain = eul_objective(None, retain)
    assert only_retain["loss"].item() == pytest.approx(0.8 * kl_r + nll_r, rel=1e-6)


def test_gradients_reach_only_the_adapters_and_the_teacher_is_the_base_model(tiny_world: dict, rows: dict) -> None:
    module = built(small_model=tiny_world["small"])
    module.train()
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])
    adapters = list(get_adapters(module.model).parameters())
    assert {id(p) for p in module.parameters() if p.requires_grad} == {id(p) for p in adapters}
    with torch.no_grad():
        for p in adapters:
            p.add_(0.1 * torch.randn_like(p))
    out = module.run_parts(batch, with_reference=True)
    base = load_causal_lm(tiny_world["small"]).eval()
    assert torch.equal(out["forget"].ref_logits, logits(base, batch["forget"]))
    assert not torch.allclose(out["forget"].logits, out["forget"].ref_logits)
    module.compute_losses(batch)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    base_params = [p for n, p in module.model.named_parameters() if "unlearning_layers" not in n]
    assert base_params and all(p.grad is None and not p.requires_grad for p in base_params)


def test_gradient_checkpointing_gives_the_same_gradients_and_counts_each_token_once(
    tiny_world: dict, rows: dict
) -> None:
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])
    results = []
    for checkpointing in (False, True):
        module = built(small_model=tiny_world["small"], bottleneck=2, gradient_checkpointing=checkpointing)
        module.train()
        with torch.no_grad():
            for p in get_adapters(module.model).parameters():
                p.add_(0.1)
        module.compute_losses(batch)["loss"].backward()
        results.append(([p.grad for p in get_adapters(module.model).parameters()], collect_grams(module.model)))
    (grads, grams), (grads_ckpt, grams_ckpt) = results
    tokens = batch["forget"]["attention_mask"].sum() + batch["retain"]["attention_mask"].sum()
    assert grams_ckpt["0.down"][-1, -1] == tokens == grams["0.down"][-1, -1]
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g)


def test_alternate_schedule_uses_forget_terms_in_even_epochs_and_retain_terms_in_odd(
    tiny_world: dict, rows: dict
) -> None:
    module = built(small_model=tiny_world["small"], schedule="alternate")
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])
    nll = {part: nll_mean(logits(module.model, batch[part]), batch[part]["labels"]).item() for part in batch}
    # At initialisation the student is the teacher (both KLs 0): what is left is the NLL of the active part.
    for epoch, zero, expected in ((0, ("kl_retain", "nll_retain"), -0.2 * nll["forget"]),
                                  (1, ("kl_forget", "nll_forget"), 1.0 * nll["retain"])):
        module._trainer = SimpleNamespace(current_epoch=epoch)
        losses = module.compute_losses(batch)
        assert all(losses[k].item() == 0 for k in zero)
        assert losses["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_offset_mode_is_refused(tiny_world: dict) -> None:
    with pytest.raises(ValueError, match="direct mode only"):
        EUL(small_model=tiny_world["small"], large_model=tiny_world["large"])


def test_checkpoints_hold_only_the_adapters_and_the_gram_matrices(tiny_world: dict, rows: dict) -> None:
    module = built(small_model=tiny_world["small"])
    module.train()
    module.compute_losses(make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2]))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["alpha"] == 0.8
    keys = set(checkpoint["state_dict"])
    assert keys == {f"model.unlearning_layers.0.{n}.{w}" for n in ("down", "up") for w in ("weight", "bias")}
    assert checkpoint["eul_grams"]["0.down"][-1, -1] > 0
    fresh = built(small_model=tiny_world["small"])
    fresh.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(collect_grams(fresh.model), collect_grams(module.model))
    del checkpoint["state_dict"]["model.unlearning_layers.0.up.bias"]
    with pytest.raises(KeyError, match="lacks 1 adapter"):
        fresh.on_load_checkpoint(checkpoint)


def test_saved_request_carries_the_gram_matrices_summed_over_processes(
    tiny_world: dict, rows: dict, tmp_path: Path
) -> None:
    """Under DDP each process records its own shard: the saved set must hold the sum, which fusion weighs by."""
    module = built(small_model=tiny_world["small"])
    module.train()
    batch = make_batch(tiny_world["tokenizer"], rows["forget"][:2], rows["retain"][:2])
    module.compute_losses(batch)
    local = {k: v.clone() for k, v in collect_grams(module.model).items()}
    # Two processes that saw the same shard: the all-reduced sum is twice this process's matrices.
    strategy = SimpleNamespace(reduce=lambda v, reduce_op: 2 * v if reduce_op == "sum" else v)
    module._trainer = SimpleNamespace(world_size=2, strategy=strategy, log_dir=str(tmp_path), is_global_zero=True)
    module.on_train_end()
    saved = load_adapter_set(tmp_path / "unlearning_layers")
    assert set(saved.grams) == set(local)
    for key, gram in local.items():
        torch.testing.assert_close(saved.grams[key], 2 * gram)
    assert saved.tokens == 2 * sum(int(batch[part]["attention_mask"].sum()) for part in ("forget", "retain"))


def test_fit_command_trains_only_adapters_and_saves_the_request(tiny_world: dict, tmp_cwd: Path) -> None:
    cli = main(["fit", "--config", FAST, "--model", "EUL", "--model.small_model", tiny_world["small"],
                "--model.large_model", "null"])
    module = cli.model
    assert type(module).__name__ == "EUL" and cli.trainer.global_step == 1
    assert {"train/loss", "train/kl_forget", "train/nll_retain", "val/forget_nll"} <= set(cli.trainer.callback_metrics)
    optimizer = cli.trainer.optimizers[0]
    trainable = {id(p) for p in get_adapters(module.model).parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    saved = load_adapter_set(module.adapters_path.parent)
    assert saved.tokens > 0 and module.adapters_path.parent.resolve() == (tmp_cwd / "runs" / "eul" / "unlearning_layers").resolve()
    tested = main(["test", "--config", FAST, "--model", "EUL", "--model.small_model", tiny_world["small"],
                   "--model.adapters", str(module.adapters_path.parent)])
    assert "test/forget_nll" in tested.trainer.callback_metrics


# --- two requests, fused ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memorised(tiny_world: dict, rows: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The small model fine-tuned on the data first: a random model has nothing to forget."""
    model = load_causal_lm(tiny_world["small"]).train()
    data = rows["forget"][:8] + rows["retain"][:8]
    part = make_batch(tiny_world["tokenizer"], data, data)["forget"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        out = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        nll_mean(out, part["labels"]).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("memorised")
    model.save_pretrained(path)
    load_tokenizer(tiny_world["tokenizer"]).save_pretrained(path)
    return str(path)


def train_request(model_dir: str, tokenizer_dir: str, forget: list[dict], retain: list[dict]) -> AdapterSet:
    module = built(small_model=model_dir, bottleneck=8)
    module.train()
    optimizer = torch.optim.Adam(get_adapters(module.model).parameters(), lr=1e-2)
    batch = make_batch(tokenizer_dir, forget, retain)
    for _ in range(30):
        optimizer.zero_grad()
        module.compute_losses(batch)["loss"].backward()
        optimizer.step()
    return extract_adapter_set(module.model)


def test_fused_requests_forget_both_forget_sets(memorised: str, tiny_world: dict, rows: dict) -> None:
    tokenizer = tiny_world["tokenizer"]
    forget_sets = [rows["forget"][:4], rows["forget"][4:8]]
    sets = [train_request(memorised, tokenizer, f, rows["retain"][4 * i:4 * i + 4]) for i, f in enumerate(forget_sets)]
    model = load_causal_lm(memorised).eval()
    apply_adapter_set(model, fuse(sets))
    for forget in forget_sets:
        part = make_batch(tokenizer, forget, forget)["forget"]
        fused_nll = nll_mean(logits(model, part), part["labels"])
        with adapters_disabled(model):
            original_nll = nll_mean(logits(model, part), part["labels"])
        assert fused_nll > original_nll + 0.2, (fused_nll, original_nll)
