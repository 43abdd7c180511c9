"""``lm_eval --model unlearned``: lm-eval's own command line (its parser, evaluator and result files, run as a
subprocess) evaluates an offset export, and the ``lm_eval.models`` entry point that setup.cfg declares names the
class registered as ``unlearned``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest
import torch

from lightning_unlearn.harness.lm_eval_cli import MODEL_NAME, MODEL_TARGET
from lightning_unlearn.harness.registry import LOCAL_TASKS
from lightning_unlearn.modules import NPO

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def export(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    module = NPO(small_model=tiny_world["small"], large_model=tiny_world["large"], alpha=1.5)
    module.setup("fit")
    module.configure_model()
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return module.eval().export(tmp_path_factory.mktemp("cli") / "npo")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_lm_evals_own_command_line_evaluates_an_export_and_records_its_alpha(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run([sys.executable, "-m", "lightning_unlearn.harness.lm_eval_cli", "run", "--model", "unlearned",
                 "--model_args", f"pretrained={export},alpha=0.5,large_dtype=float32", "--tasks",
                 "tofu_real_authors_mc", "--limit", "3", "--device", "cpu", "--output_path", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tofu_real_authors_mc" in done.stdout and "acc" in done.stdout, "lm-eval's table"
    (written,) = out.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["n-samples"]["tofu_real_authors_mc"]["effective"] == 3
    assert results["config"]["model"] == "unlearned"
    assert results["config"]["unlearned"]["alpha"] == 0.5, "the alpha given, not the manifest's 1.5"
    assert results["config"]["unlearned"]["pretrained"] == str(export.resolve())


def test_the_real_lm_eval_console_script_without_the_package_knows_no_unlearned_model(tmp_path: Path) -> None:
    """The baseline the module above exists for: lm-eval 0.4.13's ``lm_eval`` reads no plugin entry points. When an
    lm-eval release that does (upstream #4013) is installed, this test fails and says to switch the docs over."""
    script = Path(sys.executable).parent / "lm_eval"
    if not script.exists():
        pytest.skip("no lm_eval console script beside this Python")
    from lm_eval.api import registry

    done = _run([str(script), "run", "--model", MODEL_NAME, "--model_args", f"pretrained={tmp_path}", "--tasks",
                 "tofu_real_authors_mc", "--include_path", str(LOCAL_TASKS), "--limit", "1", "--device", "cpu"],
                cwd=tmp_path)
    if hasattr(registry, "load_plugins"):  # an lm-eval with entry-point discovery: the installed package is found
        assert "no model for this name found" not in done.stderr
    else:
        assert done.returncode != 0 and "no model for this name found" in done.stderr


def test_the_built_metadata_declares_the_entry_point_of_the_class_registered_as_unlearned(tmp_path: Path) -> None:
    """The package metadata an install writes, built by setuptools from setup.cfg (PEP 517's
    prepare_metadata_for_build_wheel, no install), holds the ``lm_eval.models`` entry point that lm-eval's plugin
    discovery reads, and it loads the class lm-eval knows as ``unlearned``."""
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    done = _run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    name = done.stdout.strip().splitlines()[-1]  # the .dist-info folder (setuptools leaves an .egg-info beside it)
    (dist,) = [d for d in distributions(path=[str(tmp_path)]) if getattr(d, "_path", Path()).name == name]
    (declared,) = dist.entry_points.select(group="lm_eval.models")
    assert (declared.name, declared.value) == (MODEL_NAME, MODEL_TARGET)
    from lm_eval.api.registry import get_model

    from lightning_unlearn.harness.model import UnlearnedLM

    assert declared.load() is UnlearnedLM is get_model(MODEL_NAME)
