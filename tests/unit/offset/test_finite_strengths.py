"""A non-finite offset strength (or filter threshold, or loss weight) is refused wherever it is set, naming where it
came from: the command line's ``--model.alpha``, ``generate --alpha``, the lm-eval command and wrapper, ``offset.json``
and ``composition.json``, ``UnlearnedModel``'s arguments, the weighted sums of offset generation, and the alpha sweep.

Before these checks, ``--model.alpha=.nan`` let ``test`` finish with NaN losses, ``generate --alpha nan`` printed an
empty answer, and the lm-eval command scored acc 1.0 (every NaN log-likelihood ties, and lm-eval takes the first)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lightning_unlearn.cli import main as cli_main
from lightning_unlearn.commands.generate import main as generate_main
from lightning_unlearn.deploy.manifest import COMPOSITION_MANIFEST, OFFSET_MANIFEST, compose, read_export
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.evaluation.selection import UtilityFloorCheckpoint
from lightning_unlearn.sweep import sweep
from lightning_unlearn.harness.__main__ import main as lm_eval_main
from lightning_unlearn.harness.model import load_unlearned
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.models.lora import add_lora
from lightning_unlearn.modules import NPO, ULD, WHP
from lightning_unlearn.numbers import finite, in_range
from lightning_unlearn.offset.filtered import FilteredOffset
from lightning_unlearn.offset.generation import OffsetCausalLM, offset_components

ROOT = Path(__file__).resolve().parents[3]
FAST = str(ROOT / "configs" / "tests" / "fast.yaml")
NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.fixture(scope="module")
def offset_export(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = NPO(small_model=tiny_world["small"], large_model=tiny_world["large"], alpha=1.0)
    module.setup("fit")
    module.configure_model()
    return module.export(tmp_path_factory.mktemp("finite") / "npo")


def _copy(export: Path, target: Path, **manifest: object) -> Path:
    shutil.copytree(export, target)
    data = json.loads((target / OFFSET_MANIFEST).read_text())
    (target / OFFSET_MANIFEST).write_text(json.dumps({**data, **manifest}))  # json writes NaN and Infinity
    return target


def test_the_shared_check_names_the_value_and_its_source() -> None:
    assert finite("0.5", "alpha") == 0.5 and finite(-2, "alpha") == -2.0
    for bad in [*NON_FINITE, "nan", "inf", None, "x", True]:
        with pytest.raises(ValueError, match=r"alpha \(--model.alpha\) must be a finite number"):
            finite(bad, "alpha", "--model.alpha")
    assert in_range(0.01, "relative_top", 0, 1) == 0.01
    with pytest.raises(ValueError, match=r"relative_top \(f.json\) must be in \[0, 1\], got 1.5"):
        in_range(1.5, "relative_top", 0, 1, "f.json")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_cli_refuses_a_non_finite_alpha_before_testing(value: str, tiny_world: dict, tmp_cwd: Path) -> None:
    """Before: ``test`` ran and reported ``test/forget_nll`` NaN."""
    with pytest.raises(ValueError, match=r"^alpha \(--model.alpha\) must be a finite number") as refused:
        cli_main(["test", "--config", FAST, "--model", "NPO", "--model.small_model", tiny_world["small"],
                  "--model.large_model", tiny_world["large"], f"--model.alpha={value}"])
    assert "Union subtypes" not in str(refused.value)  # the refusal itself, not jsonargparse's wrapper


def test_modules_refuse_non_finite_strengths_and_weights(tiny_world: dict) -> None:
    small, large = tiny_world["small"], tiny_world["large"]
    for value in NON_FINITE:
        with pytest.raises(ValueError, match="--model.alpha"):
            NPO(small_model=small, large_model=large, alpha=value)
        with pytest.raises(ValueError, match="--model.alpha"):  # ULD's own sign check let NaN through
            ULD(small_model=small, large_model=large, alpha=value)
        with pytest.raises(ValueError, match="--model.gamma"):
            NPO(small_model=small, large_model=large, gamma=value)
        with pytest.raises(ValueError, match="--model.retain_weight"):
            NPO(small_model=small, large_model=large, retain_weight=value)
        with pytest.raises(ValueError, match="--model.reinforce_coeff"):
            WHP(small_model=small, reinforced_model=small, reinforce_coeff=value)
    with pytest.raises(ValueError, match="--model.relative_top"):
        ULD(small_model=small, large_model=large, relative_top=math.nan)
    module = NPO(small_model=small, large_model=large, alpha=0.5)
    with pytest.raises(ValueError, match="--model.alpha"):  # a later assignment (a sweep, a hook) is checked too
        module.alpha = math.nan
    assert module.alpha == 0.5


def test_generate_refuses_a_non_finite_alpha(offset_export: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: ``generate --alpha nan`` printed an empty answer and exited 0."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        generate_main([str(offset_export), "--alpha", "nan", "--prompt", "Who?", "--max-new-tokens", "4"], stdout=out)
    assert exit_info.value.code == 2 and out.getvalue() == ""
    assert "argument --alpha: value must be a finite number, got 'nan'" in capsys.readouterr().err


def test_lm_eval_command_and_wrapper_refuse_a_non_finite_alpha(offset_export: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Before: the command scored tofu_world_facts_mc acc 1.0 / acc_norm 1.0 with ``--alpha nan``."""
    with pytest.raises(SystemExit):
        lm_eval_main([str(offset_export), "--alpha", "nan", "--tasks", "tofu_world_facts_mc", "--limit", "2"])
    assert "argument --alpha: value must be a finite number" in capsys.readouterr().err
    for alpha in (math.nan, "inf", [1.0, math.inf]):
        with pytest.raises(ValueError, match=r"alpha \(the alpha model argument\) must be a finite number"):
            load_unlearned(str(offset_export), alpha)


def test_manifests_refuse_non_finite_or_out_of_range_numbers(offset_export: Path, tmp_path: Path) -> None:
    bad_alpha = _copy(offset_export, tmp_path / "nan_alpha", alpha=math.nan)
    with pytest.raises(ValueError, match=rf"alpha \({bad_alpha / OFFSET_MANIFEST}\) must be a finite number"):
        read_export(bad_alpha)
    with pytest.raises(ValueError, match="nan_alpha"):
        UnlearnedModel.from_export(bad_alpha)
    for tau in (math.nan, 1.5, -0.1):
        bad_tau = _copy(offset_export, tmp_path / f"tau_{tau}", relative_top=tau)
        with pytest.raises(ValueError, match=rf"relative_top \({bad_tau / OFFSET_MANIFEST}\) must be"):
            read_export(bad_tau)
    composition = compose([offset_export, offset_export])
    path = composition.save(tmp_path / "composed")
    data = json.loads(path.read_text())
    data["offsets"][1]["alpha"] = math.inf
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"alpha \(offsets\[1\] of {path}\) must be a finite number, got inf"):
        read_export(path)


def test_composition_and_loaded_models_refuse_non_finite_alphas(offset_export: Path) -> None:
    with pytest.raises(ValueError, match=r"alpha \(alphas, for .*npo\) must be a finite number"):
        compose([offset_export, offset_export], alphas=[1.0, math.nan])
    with pytest.raises(ValueError, match="the alphas argument"):
        UnlearnedModel.from_export(offset_export, alphas=[math.inf])
    model = UnlearnedModel.from_export(offset_export)
    with pytest.raises(ValueError, match=r"alpha \(set_alphas, for .*npo\) must be a finite number"):
        model.set_alphas([math.nan])
    assert model.composition.alphas == [1.0]
    ids = model.encode(["Who?"], ["A writer."])
    assert torch.isfinite(model.logits(ids["input_ids"], ids["attention_mask"])).all()


def test_weighted_sums_refuse_non_finite_weights_and_thresholds() -> None:
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"weight \(component 1 of the weighted sum\) must be a finite number"):
        OffsetCausalLM([(layer, 1.0), (layer, math.nan)])
    with pytest.raises(ValueError, match=r"alpha \(offset 1 of 2\) must be a finite number"):
        offset_components(layer, layer, [(layer, 1.0), (layer, math.inf)])
    with pytest.raises(ValueError, match=r"alpha \(offset 0 of 1\) must be a finite number"):
        FilteredOffset(layer, [(layer, math.nan)], None, 0.1, 2)
    with pytest.raises(ValueError, match=r"relative_top must be in \[0, 1\], got 2"):
        FilteredOffset(layer, [(layer, -0.8)], None, 2.0, 2)


def test_sweep_refuses_bad_alphas_before_any_run(tmp_path: Path) -> None:
    """The sweep checks every alpha first: a NaN last in the list used to be found after the other runs."""
    for alphas, message in (([0.5, math.nan], r"alpha \(--alphas\) must be a finite number"),
                            ([0.5, 1.0, 0.5000001], r"--alphas gives \['alpha_0.5'\] more than once")):
        with pytest.raises(ValueError, match=message):
            sweep(str(tmp_path / "missing.yaml"), alphas, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_selection_floor_and_lora_scale_must_be_finite(tiny_world: dict, tmp_path: Path) -> None:
    """A NaN floor kept every epoch or alpha (``x < nan`` is False); a NaN ``lora_alpha`` scales every adapted layer
    to NaN even while ``B = 0``."""
    with pytest.raises(ValueError, match=r"floor \(UtilityFloorCheckpoint\) must be a finite number"):
        UtilityFloorCheckpoint(floor=math.nan)
    with pytest.raises(ValueError, match=r"floor \(--floor\) must be a finite number"):
        sweep(str(tmp_path / "missing.yaml"), [0.5], tmp_path / "out", floor=math.nan)
    with pytest.raises(ValueError, match=r"lora_alpha \(--model.lora_alpha\) must be a finite number"):
        add_lora(load_causal_lm(tiny_world["small"]), 2, alpha=math.nan)
    with pytest.raises(ValueError, match=r"lora_dropout \(--model.lora_dropout\) must be in \[0, 1\]"):
        add_lora(load_causal_lm(tiny_world["small"]), 2, dropout=1.5)
