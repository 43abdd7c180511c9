"""The losses as wired into the modules: values against the formulas written out here, and the direction of a step.

The pure loss functions have their own tests; these guard their wiring: which logits each term reads (the
model's, the reference's, the right data part), the signs, gamma and retain_weight, in offset and direct mode.
Each module is built on the tiny models and its trainable model is moved away from the reference first, so that
``z != z_ref`` and every term is informative. Expected values are computed from the models' own logits, called
directly (not through the module), with log-softmax, gather and the label masks written out in float64.

One micro-batch on one device: the values are plain means over the batch's answer tokens or sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from lightning_unlearn.data.datasets import PairingSampler
from lightning_unlearn.data.formatting import PromptFormatter, collate_parts
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.models.adapters import adapters_disabled
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.modules import (
    CEU, DPO, EUL, GA, GD, KL, LLMU, NPO, PDU, SFT, UNDIAL, WGA, SatImp, SimNPO, UnlearnModule,
)

GAMMA, RETAIN_WEIGHT, ALPHA = 0.7, 1.9, 1.5
K_RANDOM = 2
Parts = dict[str, SimpleNamespace]


# --- the formulas, by hand ----------------------------------------------------------------------------------


def token_logp(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``log p(labels[:, t+1] | prefix)`` at every position t [B, T-1] (0 off the answer) and the answer mask."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL over every answer token of the batch."""
    logp, mask = token_logp(logits, labels)
    return -logp.sum() / mask.sum()


def seq_logp(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed answer log-probability of each sequence [B] and its number of answer tokens [B]."""
    logp, mask = token_logp(logits, labels)
    return logp.sum(dim=1), mask.sum(dim=1)


def kl_ref_model(ref_logits: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """``KL(p_ref || p)`` at the positions that predict an answer token, averaged over them."""
    mask = labels[:, 1:] != -100
    log_ref = torch.log_softmax(ref_logits[:, :-1].double(), dim=-1)
    log_p = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    per_position = (log_ref.exp() * (log_ref - log_p)).sum(dim=-1)
    return per_position[mask].mean()


def logsigmoid(x: Tensor) -> Tensor:
    return -torch.log1p(torch.exp(-x))


def retain_term(kind: str, p: Parts) -> Tensor:
    if kind == "none":
        return torch.zeros((), dtype=torch.float64)
    r = p["retain"]
    return nll(r.z, r.labels) if kind == "nll" else kl_ref_model(r.ref, r.z, r.labels)


def expected_ga(p: Parts) -> Tensor:
    return -nll(p["forget"].z, p["forget"].labels)


def expected_npo(beta: float) -> Callable[[Parts], Tensor]:
    def f(p: Parts) -> Tensor:
        x = p["forget"]
        ratio = seq_logp(x.z, x.labels)[0] - seq_logp(x.ref, x.labels)[0]
        return -(2 / beta) * logsigmoid(-beta * ratio).mean()
    return f


def expected_dpo(beta: float) -> Callable[[Parts], Tensor]:
    def f(p: Parts) -> Tensor:
        real, idk = p["forget"], p["forget_idk"]
        chosen = seq_logp(idk.z, idk.labels)[0] - seq_logp(idk.ref, idk.labels)[0]
        rejected = seq_logp(real.z, real.labels)[0] - seq_logp(real.ref, real.labels)[0]
        return -(2 / beta) * logsigmoid(beta * (chosen - rejected)).mean()
    return f


def expected_simnpo(beta: float, margin: float) -> Callable[[Parts], Tensor]:
    def f(p: Parts) -> Tensor:
        logp, length = seq_logp(p["forget"].z, p["forget"].labels)
        return -(2 / beta) * logsigmoid(-(beta / length) * logp - margin).mean()
    return f


def expected_sft(p: Parts) -> Tensor:
    return nll(p["forget"].z, p["forget"].labels)


def soft_ce(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``-sum_v softmax(target)_v log softmax(logits)_v`` at every position [B, T-1] (next-token aligned)."""
    target = torch.softmax(target_logits[:, :-1].double(), dim=-1)
    return -(target * torch.log_softmax(logits[:, :-1].double(), dim=-1)).sum(dim=-1)


def expected_undial(beta: float) -> Callable[[Parts], Tensor]:
    """Teacher: the reference logits with the true token's logit lowered by beta."""
    def f(p: Parts) -> Tensor:
        part = p["forget"]
        targets, mask = part.labels[:, 1:], part.labels[:, 1:] != -100
        lowered = part.ref.clone()
        for b, t in mask.nonzero().tolist():
            lowered[b, t, targets[b, t]] -= beta
        return soft_ce(part.z, lowered)[mask].mean()
    return f


def expected_ceu(skip: int) -> Callable[[Parts], Tensor]:
    """Target: the model's own logits with the true token at -inf; the first ``skip`` answer tokens count 0."""
    def f(p: Parts) -> Tensor:
        part = p["forget"]
        targets, mask = part.labels[:, 1:], part.labels[:, 1:] != -100
        removed, total = part.z.clone(), torch.zeros((), dtype=torch.float64)
        for b, t in mask.nonzero().tolist():
            removed[b, t, targets[b, t]] = float("-inf")
        ce = soft_ce(part.z, removed)
        for b in range(mask.shape[0]):
            total = total + ce[b][mask[b]][skip:].sum()
        return total / mask.sum()
    return f


def expected_weighted(weight: Callable[[Tensor], Tensor]) -> Callable[[Parts], Tensor]:
    """``mean_t w(p_t) log p_t`` over forget answer tokens (WGA, SatImp)."""
    def f(p: Parts) -> Tensor:
        logp, mask = token_logp(p["forget"].z, p["forget"].labels)
        return (weight(logp[mask].exp()) * logp[mask]).mean()
    return f


def expected_flattening(p: Parts) -> Tensor:
    z, mask = p["forget"].z[:, :-1].double(), p["forget"].labels[:, 1:] != -100
    return ((z.max(dim=-1).values - z.mean(dim=-1)) ** 2)[mask].mean()


# --- the world ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch(tiny_world: dict) -> dict:
    """Two forget rows with every part a loss may need; retain rows are other authors."""
    formatter = PromptFormatter(load_tokenizer(tiny_world["tokenizer"]), max_length=256)
    forget, retain = load_split("bundled", "forget01")[:2], load_split("bundled", "retain99")
    refusals = ["I don't know.", "I have no idea who that is, sorry."]
    items = []
    for i, row in enumerate(forget):
        items.append({
            "forget": formatter.encode(row["question"], row["answer"]),
            "retain": formatter.encode(retain[10 + i]["question"], retain[10 + i]["answer"]),
            "forget_idk": formatter.encode(row["question"], refusals[i]),
            "forget_random": [formatter.encode(row["question"], retain[20 + 2 * i + k]["answer"])
                              for k in range(K_RANDOM)],
        })
    return collate_parts(items, formatter.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def originals(tiny_world: dict) -> dict[str, torch.nn.Module]:
    """Fresh copies of the models as saved: the large model and the small one before any training."""
    return {"large": load_causal_lm(tiny_world["large"], "float32").eval(),
            "small": load_causal_lm(tiny_world["small"], "float32").eval()}


def moved(cls: type[UnlearnModule], world: dict, offset: bool, scale: float = 0.05, **kwargs) -> UnlearnModule:
    """The module built on the tiny models, its trainable parameters moved away from the reference by Gaussian
    noise of standard deviation ``scale``."""
    if offset:
        kwargs.update(large_model=world["large"], large_dtype="float32", alpha=ALPHA)
    return set_up_and_moved(cls(small_model=world["small"], **kwargs), scale)


def set_up_and_moved(module: UnlearnModule, scale: float) -> UnlearnModule:
    """``module`` set up for fit with its models built, its trainable parameters moved by Gaussian noise of standard
    deviation ``scale`` (seeded), in train mode."""
    module.setup("fit")
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))
    module.train()
    return module


def raw(model: torch.nn.Module, part: dict, vocab: int) -> Tensor:
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[..., :vocab].double()


@torch.no_grad()
def hand_parts(module: UnlearnModule, originals: dict, batch: dict) -> Parts:
    """Logits of the model being unlearned (``z``) and of the original model (``ref``) on every part.

    Offset: ``z = z_L + alpha (z_S - z_S0)`` and ``ref = z_L``; direct: ``z = z_S`` and ``ref = z_S0``; EUL: the
    model with its adapters (``z``) and without (``ref``). ``z_L`` and ``z_S0`` come from the saved models.
    """
    vocab = len(module.tokenizer)
    out: Parts = {}
    for name, part in batch.items():
        z = raw(module.model, part, vocab)
        if isinstance(module, EUL):
            with adapters_disabled(module.model):
                ref = raw(module.model, part, vocab)
        elif module.large is not None:
            ref = raw(originals["large"], part, vocab)
            z = ref + ALPHA * (z - raw(originals["small"], part, vocab))
        else:
            ref = raw(originals["small"], part, vocab)
        out[name] = SimpleNamespace(z=z, ref=ref, labels=part["labels"])
    return out


def expected_losses(name: str, kwargs: dict, p: Parts) -> dict[str, Tensor]:
    """``loss``, ``forget_loss`` and ``retain_loss`` of the method from its formula."""
    if name == "LLMU":
        f, r = p["forget"], p["retain"]
        forget_nll, random_nll = nll(f.z, f.labels), nll(p["forget_random"].z, p["forget_random"].labels)
        kl = kl_ref_model(r.ref, r.z, r.labels)
        return {"loss": -GAMMA * forget_nll + kwargs["random_weight"] * random_nll + RETAIN_WEIGHT * kl,
                "forget_loss": -forget_nll, "random_loss": random_nll, "retain_loss": kl}
    if name == "EUL":
        f, r = p["forget"], p["retain"]
        forget = -kl_ref_model(f.ref, f.z, f.labels) - GAMMA * nll(f.z, f.labels)
        retain = kwargs["alpha"] * kl_ref_model(r.ref, r.z, r.labels) + RETAIN_WEIGHT * nll(r.z, r.labels)
        return {"loss": forget + retain, "forget_loss": forget, "retain_loss": retain}
    if name == "PDU":  # lambda is still its initial value, retain_weight; eps shifts the retain term
        forget, retain = expected_flattening(p), retain_term(kwargs.get("retain_loss", "nll"), p)
        return {"loss": GAMMA * forget + RETAIN_WEIGHT * (retain - kwargs["retain_loss_eps"]), "forget_loss": forget,
                "retain_loss": retain}
    forget_fn, retain_kind = {
        "GA": (expected_ga, "none"), "GD": (expected_ga, "nll"), "KL": (expected_ga, "kl"),
        "SFT": (expected_sft, "none"),
        "NPO": (expected_npo(kwargs.get("beta", 0.0)), kwargs.get("retain_loss")),
        "DPO": (expected_dpo(kwargs.get("beta", 0.0)), kwargs.get("retain_loss")),
        "SimNPO": (expected_simnpo(kwargs.get("beta", 0.0), kwargs.get("margin", 0.0)), kwargs.get("retain_loss")),
        "UNDIAL": (expected_undial(kwargs.get("beta", 0.0)), kwargs.get("retain_loss")),
        "CEU": (expected_ceu(kwargs.get("ignore_first_answer_tokens", 0)), kwargs.get("retain_loss")),
        "WGA": (expected_weighted(lambda q: q ** kwargs["beta"]), kwargs.get("retain_loss")),
        "SatImp": (expected_weighted(lambda q: q ** kwargs["beta1"] * (1 - q) ** kwargs["beta2"]),
                   kwargs.get("retain_loss")),
    }[name]
    forget, retain = forget_fn(p), retain_term(retain_kind, p)
    return {"loss": GAMMA * forget + RETAIN_WEIGHT * retain, "forget_loss": forget, "retain_loss": retain}


CLASSES = {"GA": GA, "GD": GD, "KL": KL, "NPO": NPO, "DPO": DPO, "SimNPO": SimNPO, "LLMU": LLMU, "EUL": EUL,
           "SFT": SFT, "UNDIAL": UNDIAL, "CEU": CEU, "WGA": WGA, "SatImp": SatImp, "PDU": PDU}
CASES = [
    ("GA", {}), ("GD", {}), ("KL", {}), ("SFT", {}),
    *[("NPO", {"beta": 0.3, "retain_loss": r}) for r in ("none", "nll", "kl")],
    *[("DPO", {"beta": 0.2, "retain_loss": r}) for r in ("none", "nll", "kl")],
    *[("SimNPO", {"beta": 0.1, "margin": 0.4, "retain_loss": r}) for r in ("none", "nll", "kl")],
    ("LLMU", {"random_weight": 0.6, "num_random_answers": K_RANDOM}),
    *[("UNDIAL", {"beta": 3.0, "retain_loss": r}) for r in ("none", "nll", "kl")],
    *[("CEU", {"ignore_first_answer_tokens": 2, "retain_loss": r}) for r in ("none", "nll", "kl")],
    *[("WGA", {"beta": 0.5, "retain_loss": r}) for r in ("none", "nll", "kl")],
    *[("SatImp", {"beta1": 0.5, "beta2": 1.5, "retain_loss": r}) for r in ("none", "nll", "kl")],
    *[("PDU", {"retain_loss_eps": 0.4, "retain_loss": r}) for r in ("nll", "kl")],
]


def case_id(case: tuple[str, dict]) -> str:
    return "-".join([case[0], *(str(v) for k, v in case[1].items() if k == "retain_loss")])


def parts_needed(module: UnlearnModule, batch: dict) -> dict:
    return {name: batch[name] for name in module.parts}


@pytest.mark.parametrize("offset", [True, False], ids=["offset", "direct"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compute_losses_equals_the_formula_on_the_models_logits(
    case: tuple[str, dict], offset: bool, tiny_world: dict, originals: dict, batch: dict
) -> None:
    name, kwargs = case
    module = moved(CLASSES[name], tiny_world, offset, gamma=GAMMA, retain_weight=RETAIN_WEIGHT, **kwargs)
    data = parts_needed(module, batch)
    with torch.no_grad():
        got = module.compute_losses(data)
    want = expected_losses(name, kwargs, hand_parts(module, originals, data))
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, rtol=2e-5, atol=1e-6, msg=f"{name} {key}")
    assert got["forget_loss"].abs() > 1e-3, "a forget term that vanishes would check nothing"
    if name not in ("GA", "SFT") and kwargs.get("retain_loss") != "none":
        assert got["retain_loss"].abs() > 1e-4, "the retain term must be informative here"


@pytest.mark.parametrize("name", ["WGA", "SatImp"])
def test_token_weighted_ascent_notes_the_forget_nll_for_its_bound(
    name: str, tiny_world: dict, originals: dict, batch: dict
) -> None:
    """With ``stop_forget_nll`` set, the forget NLL the bound reads is the plain NLL of the forget answers."""
    module = moved(CLASSES[name], tiny_world, True, gamma=GAMMA, retain_weight=RETAIN_WEIGHT, stop_forget_nll=50.0)
    module._trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=1)
    data = parts_needed(module, batch)
    with torch.no_grad():
        module.compute_losses(data)
    step, noted = module._forget_nll_step
    forget = hand_parts(module, originals, data)["forget"]
    assert step == 3
    torch.testing.assert_close(noted.double(), nll(forget.z, forget.labels), rtol=2e-5, atol=1e-6)


def test_eul_compute_losses_equals_the_formula(tiny_world: dict, originals: dict, batch: dict) -> None:
    kwargs = {"alpha": 0.6}
    module = moved(EUL, tiny_world, False, scale=0.5, gamma=GAMMA, retain_weight=RETAIN_WEIGHT, bottleneck=4,
                   **kwargs)
    data = parts_needed(module, batch)
    with torch.no_grad():
        got = module.compute_losses(data)
        teacher = {n: raw(originals["small"], part, len(module.tokenizer)) for n, part in data.items()}
    parts = hand_parts(module, originals, data)
    for name, part in parts.items():  # the teacher is the saved model itself
        torch.testing.assert_close(part.ref, teacher[name], rtol=1e-5, atol=1e-5)
    want = expected_losses("EUL", kwargs, parts)
    for key, value in want.items():
        torch.testing.assert_close(got[key].double(), value, rtol=2e-5, atol=1e-6, msg=f"EUL {key}")
    f, r = parts["forget"], parts["retain"]
    terms = {"kl_forget": kl_ref_model(f.ref, f.z, f.labels), "nll_forget": nll(f.z, f.labels),
             "kl_retain": kl_ref_model(r.ref, r.z, r.labels), "nll_retain": nll(r.z, r.labels)}
    for key, value in terms.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-8, msg=f"EUL {key}")
    assert got["kl_forget"] > 1e-3 and got["kl_retain"] > 1e-3


# --- one step moves what the loss says it moves -------------------------------------------------------------


def measures(p: Parts) -> dict[str, float]:
    """Quantities a step should move, on the model being unlearned."""
    f, r = p["forget"], p["retain"]
    out = {
        "forget_nll": float(nll(f.z, f.labels)),
        "retain_nll": float(nll(r.z, r.labels)),
        "retain_kl": float(kl_ref_model(r.ref, r.z, r.labels)),
        "forget_kl": float(kl_ref_model(f.ref, f.z, f.labels)),
        "random_nll": float(nll(p["forget_random"].z, p["forget_random"].labels)),
    }
    out["forget_flatness"] = float(expected_flattening(p))
    idk, real = p["forget_idk"], p["forget"]
    out["idk_margin"] = float((seq_logp(idk.z, idk.labels)[0] - seq_logp(real.z, real.labels)[0]).mean())
    return out


def sgd_step(module: UnlearnModule, batch: dict, size: float = 1e-2) -> None:
    """One plain gradient step of fixed length ``size`` (small enough to be first order) on the loss."""
    module.zero_grad()
    module.compute_losses(parts_needed(module, batch))["loss"].backward()
    params = [p for p in module.parameters() if p.requires_grad]
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    assert norm > 0
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(size / norm * p.grad)


# (method, constructor kwargs, {quantity: +1 rises / -1 falls}). Where the retain term is the point, the forget
# term is weighted down (gamma 0.01) so that the step is the retain term's; elsewhere the retain term is off.
DIRECTIONS = [
    ("GA", {}, {"forget_nll": +1}),
    ("GD", {"gamma": 0.5, "retain_weight": 2.0}, {"forget_nll": +1, "retain_nll": -1}),
    ("KL", {"gamma": 0.5, "retain_weight": 2.0}, {"forget_nll": +1, "retain_kl": -1}),
    ("NPO", {"retain_loss": "none"}, {"forget_nll": +1}),
    ("NPO", {"retain_loss": "kl", "gamma": 0.01}, {"retain_kl": -1}),
    ("DPO", {"retain_loss": "none"}, {"idk_margin": +1}),
    ("DPO", {"retain_loss": "nll", "gamma": 0.01}, {"retain_nll": -1}),
    ("SimNPO", {"beta": 0.1, "retain_loss": "none"}, {"forget_nll": +1}),
    ("SimNPO", {"beta": 0.1, "retain_loss": "nll", "gamma": 0.01}, {"retain_nll": -1}),
    ("LLMU", {"gamma": 0.1, "num_random_answers": K_RANDOM}, {"random_nll": -1}),
    ("LLMU", {"gamma": 1.0, "random_weight": 0.0, "retain_weight": 0.0, "num_random_answers": K_RANDOM},
     {"forget_nll": +1}),
    ("LLMU", {"gamma": 0.01, "random_weight": 0.0, "num_random_answers": K_RANDOM}, {"retain_kl": -1}),
    ("SFT", {}, {"forget_nll": -1}),
    ("UNDIAL", {"retain_loss": "none"}, {"forget_nll": +1}),
    ("UNDIAL", {"retain_loss": "kl", "gamma": 0.01}, {"retain_kl": -1}),
    ("CEU", {"retain_loss": "none"}, {"forget_nll": +1}),
    ("CEU", {"retain_loss": "nll", "gamma": 0.01}, {"retain_nll": -1}),
    ("WGA", {"retain_loss": "none"}, {"forget_nll": +1}),
    ("WGA", {"retain_loss": "nll", "gamma": 0.01}, {"retain_nll": -1}),
    ("SatImp", {"retain_loss": "none", "beta1": 1.0}, {"forget_nll": +1}),
    ("SatImp", {"retain_loss": "nll", "gamma": 0.01, "retain_weight": 1.0}, {"retain_nll": -1}),
    ("PDU", {"retain_weight": 0.0}, {"forget_flatness": -1}),
    ("PDU", {"gamma": 0.0001, "retain_weight": 1.0}, {"retain_nll": -1}),
]
EUL_DIRECTIONS = [  # direct mode only; the forget KL has weight 1 in EUL's objective
    ("EUL", {"bottleneck": 4, "alpha": 0.0, "gamma": 0.0, "retain_weight": 0.0}, {"forget_kl": +1}),
    ("EUL", {"bottleneck": 4, "alpha": 0.0, "gamma": 1.0, "retain_weight": 0.0}, {"forget_nll": +1}),
    ("EUL", {"bottleneck": 4, "alpha": 50.0, "gamma": 0.0, "retain_weight": 0.0}, {"retain_kl": -1}),
    ("EUL", {"bottleneck": 4, "alpha": 0.0, "gamma": 0.0, "retain_weight": 50.0}, {"retain_nll": -1}),
]
STEP_CASES = [(*case, offset) for case in DIRECTIONS for offset in (True, False)] + [
    (*case, False) for case in EUL_DIRECTIONS]


@pytest.mark.parametrize(("name", "kwargs", "signs", "offset"), STEP_CASES,
                         ids=[f"{n}-{'-'.join(s)}-{'offset' if o else 'direct'}" for n, _, s, o in STEP_CASES])
def test_one_step_moves_what_the_loss_says(
    name: str, kwargs: dict, signs: dict[str, int], offset: bool, tiny_world: dict, originals: dict, batch: dict
) -> None:
    module = moved(CLASSES[name], tiny_world, offset, **kwargs)
    before = measures(hand_parts(module, originals, batch))
    sgd_step(module, batch)
    after = measures(hand_parts(module, originals, batch))
    for key, sign in signs.items():
        change = after[key] - before[key]
        assert sign * change > 1e-6, f"{name}: {key} {before[key]:.6g} -> {after[key]:.6g}, expected sign {sign:+d}"


# --- the rest of the training wiring: learning-rate schedule and the sampler's padding -----------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_follows_warmup_then_the_schedule(schedule: str, tiny_world: dict) -> None:
    import math

    total, warmup, lr = 10, 3, 0.01
    module = GA(small_model=tiny_world["small"], lr_scheduler=schedule, warmup_steps=warmup,
                optimizer=lambda params: torch.optim.SGD(params, lr=lr))
    module.setup("fit")
    module.configure_model()
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)
    try:
        config = module.configure_optimizers()
    finally:
        module._trainer = None
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    progress = [(s - warmup) / (total - warmup) for s in range(total)]
    after = {"constant": [1.0] * total, "linear": [1 - x for x in progress],
             "cosine": [0.5 * (1 + math.cos(math.pi * x)) for x in progress]}[schedule]
    want = [lr * (s / warmup if s < warmup else after[s]) for s in range(total)]
    assert seen == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("n", "replicas"), [(7, 2), (10, 4), (5, 3)])
def test_sampler_pads_ranks_with_the_first_pairs_of_the_global_order(n: int, replicas: int) -> None:
    """Like the stock ``DistributedSampler``: the global order wrapped around to a multiple of the ranks."""
    single = list(PairingSampler(list(range(n)), seed=4))  # type: ignore[arg-type]
    total = -(-n // replicas) * replicas
    padded = single + single[: total - n]
    ranks = [list(PairingSampler(list(range(n)), num_replicas=replicas, rank=r, seed=4))  # type: ignore[arg-type]
             for r in range(replicas)]
    for rank, pairs in enumerate(ranks):
        assert pairs == padded[rank::replicas]
    assert sorted(p for pairs in ranks for p in pairs) == sorted(padded)
