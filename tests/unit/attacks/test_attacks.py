"""The attacks: GradNorm and Reference scores on hand-computed cases, quantization on a tiny model, relearning that
changes only what the attacker holds, and the ``attack`` command end to end on a tiny offset export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_unlearn.attacks.mia import gradnorm_scores, reference_scores
from lightning_unlearn.metrics import functional as F


# --- GradNorm and Reference: hand-computed ----------------------------------------------------------------------


def _toy() -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    return (nn.Parameter(torch.tensor([3.0, 4.0])), nn.Parameter(torch.tensor([1.0, 2.0, 2.0])),
            nn.Parameter(torch.tensor([5.0])))


@pytest.mark.parametrize(("p", "expected"),
                         [(2.0, (5.0 + 2.0) / 2), (1.0, (7.0 + 2.0) / 2), (math.inf, (4.0 + 2.0) / 2)])
def test_gradnorm_is_the_mean_over_parameter_tensors_of_each_gradient_norm(p: float, expected: float) -> None:
    w, v, unused = _toy()
    # d/dw 0.5 ||w||^2 = w = [3, 4]; d/dv 2 v_0 = [2, 0, 0]; ``unused`` gets no gradient and does not count
    # (open-unlearning averages over the parameters whose .grad is not None).
    loss = 0.5 * w.square().sum() + 2.0 * v[0]
    assert gradnorm_scores([loss], [w, v, unused], p).tolist() == pytest.approx([expected])


def test_gradnorm_scores_each_sample_on_its_own_gradient() -> None:
    w, v, _ = _toy()
    first, second = 0.5 * w.square().sum(), 3.0 * v.sum()  # grads: w -> [3, 4] (5); v -> [3, 3, 3] (sqrt 27)
    scores = gradnorm_scores([first, second], [w, v])
    assert scores.tolist() == pytest.approx([5.0, math.sqrt(27.0)])
    assert w.grad is None and v.grad is None  # the model's own .grad is left alone


def test_gradnorm_refuses_a_p_open_unlearning_does_not_have_and_nan_for_a_broken_loss() -> None:
    w, _, _ = _toy()
    with pytest.raises(ValueError, match="1, 2 or inf"):
        gradnorm_scores([w.sum()], [w], 3.0)
    with pytest.raises(ValueError, match="require a gradient"):
        gradnorm_scores([w.sum()], [nn.Parameter(torch.ones(1), requires_grad=False)])
    assert math.isnan(gradnorm_scores([w.sum() * math.nan], [w]).item())


def test_gradnorm_of_a_tiny_language_model_equals_backward_on_its_parameters() -> None:
    """Another route to the same number: ``loss.backward()`` and each parameter's ``.grad``, as open-unlearning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    ids = torch.tensor([[1, 2, 3, 4], [4, 5, 6, 1]])
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 5, 6, 1]])
    stats = F.answer_token_stats(model(ids), labels)
    ours = gradnorm_scores(list(stats.mean_nll), list(model.parameters()))
    for b in range(2):
        model.zero_grad()
        F.answer_token_stats(model(ids[b:b + 1]), labels[b:b + 1]).mean_nll[0].backward()
        norms = [q.grad.norm() for q in model.parameters() if q.grad is not None]
        assert ours[b].item() == pytest.approx(torch.stack(norms).mean().item(), rel=1e-5)


def test_reference_score_is_target_minus_reference_nll_and_its_auc() -> None:
    target, ref = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([1.5, 1.0, 0.5, 1.0])
    scores = reference_scores(target, ref)
    assert scores.tolist() == [-0.5, 1.0, 0.0, 2.0]
    # forget = first two, holdout = last two: pairs (holdout > forget) of 4: 0 > -0.5 yes, 0 > 1 no, 2 > both: 3/4
    assert F.mia_auc(scores[:2], scores[2:]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one value per sample"):
        reference_scores(target, ref[:3])


# --- quantization -----------------------------------------------------------------------------------------------


def _levels_per_row(weight: torch.Tensor) -> int:
    return max(len(torch.unique(row)) for row in weight)


@pytest.mark.parametrize(("bits", "levels"), [("int8", 255), ("int4", 16)])
def test_quantize_keeps_at_most_the_scheme_s_levels_and_stays_close(bits: str, levels: int) -> None:
    torchao = pytest.importorskip("torchao")  # noqa: F841 - the optional extra
    from lightning_unlearn.attacks.quantize import quantize_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.Linear(8, 4))
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = model(x)
        original = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    assert _levels_per_row(original[0]) == 64  # the float weights: every entry its own value
    counts = quantize_weights(model, bits)
    assert sum(counts.values()) == 3
    if bits == "int4":
        assert counts == {"int4_per_group32": 2, "int4_per_channel": 1}  # 8 input columns: per channel
    for m, w in zip([m for m in model if isinstance(m, nn.Linear)], original):
        deq = m.weight.dequantize()
        group = 32 if bits == "int4" and m.in_features % 32 == 0 else m.in_features
        for g in deq.split(group, dim=1):
            assert _levels_per_row(g) <= levels
        step = w.abs().amax(dim=1, keepdim=True) / (127 if bits == "int8" else 7)
        assert bool(((deq - w).abs() <= step * 0.51 + 1e-6).all())  # rounding to the nearest level (per row bound)
        assert not torch.equal(deq, w)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=0.05 if bits == "int8" else 0.5)


def test_quantize_refuses_bad_bits_and_a_model_without_linear_layers() -> None:
    from lightning_unlearn.attacks.quantize import quantize_weights

    with pytest.raises(ValueError, match="bits"):
        quantize_weights(nn.Linear(4, 4), "int3")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_weights(nn.Embedding(4, 4), "int8")


# --- relearning and the command on a tiny offset export ---------------------------------------------------------


@pytest.fixture(scope="module")
def offset_export(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny offset export: the small model with its weights moved as ``S``, the small model as ``S0``."""
    from lightning_unlearn.models.loading import load_causal_lm

    out = tmp_path_factory.mktemp("attack") / "offset"
    shutil.copytree(tiny_world["small"], out)
    model = load_causal_lm(tiny_world["small"], "float32")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    (out / "offset.json").write_text(json.dumps({"large_model": tiny_world["large"],
                                                 "reference_model": tiny_world["small"], "alpha": 1.0,
                                                 "large_dtype": "float32", "small_dtype": "float32"}))
    return out


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("target", ["offset", "combined"])
def test_relearn_one_step_changes_only_the_small_offset(offset_export: Path, target: str) -> None:
    from lightning_unlearn.attacks.relearn import relearn
    from lightning_unlearn.data.sources import load_split
    from lightning_unlearn.deploy.unlearned import UnlearnedModel

    model = UnlearnedModel.from_export(offset_export)
    large, reference, small = _weights(model.large), _weights(model.reference), _weights(model.offsets[0])
    rows = load_split("bundled", "forget01")[:4]
    calls: list[int] = []
    curve = relearn(model, rows, [1], lambda: calls.append(1) or {"x": 1.0}, target=target, lr=1e-2)
    assert [c["steps"] for c in curve] == [1] and calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(large, _weights(model.large)))
    assert all(torch.equal(a, b) for a, b in zip(reference, _weights(model.reference)))
    assert any(not torch.equal(a, b) for a, b in zip(small, _weights(model.offsets[0])))
    assert not any(p.requires_grad for p in model.parameters())  # frozen again afterwards
    with pytest.raises(ValueError, match="does not fit"):
        relearn(model, rows, [1], dict, target="direct")


def test_relearn_of_a_direct_model_changes_it(tiny_world: dict) -> None:
    from lightning_unlearn.attacks.relearn import relearn
    from lightning_unlearn.data.sources import load_split
    from lightning_unlearn.deploy.unlearned import UnlearnedModel

    model = UnlearnedModel.from_export(tiny_world["small"])
    rows = load_split("bundled", "forget01")[:4]
    nll = lambda: float(-model.log_probs([r["question"] for r in rows], [r["answer"] for r in rows]).mean())  # noqa: E731
    start = nll()
    curve = relearn(model, rows, [1, 3], lambda: {"nll": nll()}, target="direct", lr=1e-2)
    assert [c["steps"] for c in curve] == [1, 3]
    assert curve[-1]["nll"] < start  # the answers trained on became likelier


@pytest.mark.slow
def test_attack_command_writes_attack_json_with_before_and_after(offset_export: Path, tiny_world: dict,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    from lightning_unlearn.commands import main

    common = ["--limit", "12", "--reference-model", tiny_world["small"]]
    for attack, extra in [("mia", []), ("quantize", []), ("relearn", ["--steps", "1", "3", "--relearn-rows", "4"])]:
        out = tmp_path / attack
        main(["attack", attack, str(offset_export), "--out", str(out), *common, *extra])
        report = json.loads((out / "ATTACK.json").read_text())
        assert report["attack"] == attack and report["mode"] == "offset"
        before = report["before"]
        assert report["original"] is not None and report["original"] != before  # alpha 0: the large model alone
        for key in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference"):
            assert 0.0 <= before[key] <= 1.0
        if attack == "mia":
            assert 0.0 <= before["mia_gradnorm"] <= 1.0
        if attack == "quantize":
            assert [(a["bits"], a["quantized"]) for a in report["after"]] == [
                ("int8", "large"), ("int8", "pair"), ("int4", "large"), ("int4", "pair")]
            assert all(a["metrics"]["forget_nll"] != before["forget_nll"] for a in report["after"])
        if attack == "relearn":
            assert [(a["target"], a["steps"]) for a in report["after"]] == [
                ("offset", 1), ("offset", 3), ("combined", 1), ("combined", 3)]
            assert report["data"]["forget_rows"] == 8  # measured on the rows not trained on
            assert report["after"][-1]["metrics"]["forget_nll"] < before["forget_nll"]


def test_forget_scores_leave_the_final_answer_token_out_of_min_k_and_gradnorm_only(tiny_world: dict) -> None:
    """open-unlearning's token-wise log-probs (Min-K%, GradNorm) drop each answer's final token; LOSS keeps it."""
    from lightning_unlearn.attacks.forget import _answer_scores
    from lightning_unlearn.data.sources import load_split
    from lightning_unlearn.deploy.unlearned import UnlearnedModel

    model = UnlearnedModel.from_export(tiny_world["small"])
    net = model.offsets[0]
    rows = load_split("bundled", "forget01")[:3]
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    scores = _answer_scores(model, lambda i, m: model.combined(i, m), qs, ans, 2, 0.4, None, (params, 2.0))
    for b in range(3):
        batch = model.encode(qs[b:b + 1], ans[b:b + 1])
        out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[..., :model.vocab_size]
        full = F.answer_token_stats(logits, batch["labels"])
        trimmed = F.drop_last_answer_token(batch["labels"])
        assert scores["nll"][b].item() == pytest.approx(full.mean_nll.item(), rel=1e-5)
        assert scores["min_k"][b].item() == pytest.approx(
            F.min_k_score(full.token_logprobs, trimmed[:, 1:] != F.IGNORE_INDEX).item(), rel=1e-5)
        net.zero_grad()
        F.answer_token_stats(logits, trimmed).mean_nll[0].backward()
        expected = torch.stack([p.grad.norm() for p in params if p.grad is not None]).mean().item()
        assert scores["gradnorm"][b].item() == pytest.approx(expected, rel=1e-4)


def test_attack_command_says_what_to_change(tiny_world: dict, tmp_path: Path) -> None:
    from lightning_unlearn.commands import main

    with pytest.raises(ValueError, match="--relearn-rows must be between 1 and 4"):
        main(["attack", "relearn", tiny_world["small"], "--limit", "5", "--relearn-rows", "5", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["attack", "mia", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert not (tmp_path / "ATTACK.json").exists()
