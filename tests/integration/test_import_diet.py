"""Start-up: what importing the command line leaves out, and the deferred package imports (``lazy_imports``).

Every ``main.py`` command pays for its imports before it starts; these tests fail when an eager import of a heavy
optional dependency comes back (lm-eval, httpx, W&B, peft, datasets, scikit-learn...), when Lightning's import
pulls all of torchmetrics again, or when a deferred package stops behaving as the whole one (ROUGE scores,
names only its ``__init__`` defines).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_unlearn.lazy_imports import collector_paused, defer_package_init, is_deferred

ROOT = Path(__file__).resolve().parents[2]

# Not needed to parse a command, build the Trainer or evaluate: each is imported where it is used.
LEFT_OUT = ("lm_eval", "httpx", "wandb", "peft", "datasets", "sklearn", "pandas", "nltk.chunk", "rouge_score",
            "scipy.stats", "scipy.signal", "scipy.optimize._minimize", "torchmetrics.functional",
            "torchmetrics.classification")

# (generation, answer, ROUGE-L recall by hand): rouge_score lower-cases, splits on non-alphanumerics and
# Porter-stems tokens of more than 3 characters. First pair: "cats" -> cat, "runs"/"running" -> run, "quickly" ->
# quickli (not quick); the longest common subsequence is "the cat run to home", 5 of the answer's 6 tokens
# (3 of 6 unstemmed). Second: "b d" of "b d e".
PAIRS = [("The cats were running quickly to their home", "the cat runs quick to home", 5 / 6),
         ("a b, c d!", "B d e", 2 / 3), ("", "nothing generated", 0.0)]


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_leaves_out_what_no_command_needs() -> None:
    """In a fresh interpreter (the import is the cost measured): the CLI's import leaves the heavy optional modules
    out and torchmetrics, NLTK and scipy.optimize deferred, ROUGE through the deferred NLTK stems as the whole of it
    does, the garbage collector is on again after the import, and only the command line's ``main()`` freezes the
    imported objects out of its passes."""
    out = _run(f"""
        import gc, json, sys
        import lightning_unlearn.cli
        from lightning_unlearn.lazy_imports import is_deferred
        from lightning_unlearn.metrics.functional import rouge_l_recall
        present = [m for m in {LEFT_OUT!r} if m in sys.modules]
        pairs = {PAIRS!r}
        rouge = rouge_l_recall([p for p, _, _ in pairs], [r for _, r, _ in pairs])
        collector = [gc.isenabled(), gc.get_freeze_count()]
        for args in (["--help"], None):
            sys.argv = ["main.py", "--help"]
            try:
                lightning_unlearn.cli.main(args)
            except SystemExit:
                pass
            collector.append(gc.get_freeze_count() > 0)
        print(json.dumps({{"present": present, "rouge": rouge, "collector": collector,
                          "deferred": [is_deferred(p) for p in ("torchmetrics", "nltk", "scipy.optimize")]}}))
    """)
    assert out["present"] == []
    assert out["deferred"] == [True, True, True]
    assert out["rouge"] == pytest.approx([expected for _, _, expected in PAIRS])
    assert out["collector"] == [True, 0, False, True]


def test_deferred_packages_give_their_whole_package_on_demand() -> None:
    """Names only the packages' own ``__init__`` defines arrive on first use (in this process the packages may be
    deferred or already whole), with torchmetrics' log handler set up once."""
    import logging

    import nltk
    import scipy.optimize
    import torchmetrics
    from scipy.optimize import linear_sum_assignment

    assert linear_sum_assignment([[4.0, 1.0], [2.0, 0.0]])[1].tolist() == [1, 0]
    assert torchmetrics.Accuracy.__name__ == "Accuracy"
    assert nltk.edit_distance("kitten", "sitting") == 3
    assert scipy.optimize.brentq(lambda x: x - 0.5, 0.0, 1.0) == pytest.approx(0.5)
    assert not any(is_deferred(p) for p in ("torchmetrics", "nltk", "scipy.optimize"))
    assert len(logging.getLogger("torchmetrics").handlers) == 1


def _fake_package(root: Path, name: str) -> None:
    """A package whose ``__init__`` counts its runs in ``runs.txt`` and defines ``WHOLE``; one submodule."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "_runs = Path(__file__).with_name('runs.txt')\n"
        "_runs.write_text(str(int(_runs.read_text()) + 1 if _runs.exists() else 1))\n"
        "WHOLE = True\n"
    )
    (package / "part.py").write_text("VALUE = 7\n")


def _runs(root: Path, name: str) -> int:
    counter = root / name / "runs.txt"
    return int(counter.read_text()) if counter.exists() else 0


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in [m for m in sys.modules if m.startswith("diet_fake")]:
        del sys.modules[module]


def test_a_deferred_package_runs_its_init_only_for_a_name_it_defines(fake_root: Path) -> None:
    _fake_package(fake_root, "diet_fake_a")
    assert defer_package_init("diet_fake_a", exports={"Early": lambda: "made"})
    assert is_deferred("diet_fake_a")
    import diet_fake_a
    from diet_fake_a import Early
    from diet_fake_a.part import VALUE

    assert (Early, VALUE, diet_fake_a.part.VALUE) == ("made", 7, 7)
    assert _runs(fake_root, "diet_fake_a") == 0  # a submodule and an export: no __init__
    assert diet_fake_a.WHOLE is True
    assert _runs(fake_root, "diet_fake_a") == 1 and not is_deferred("diet_fake_a")
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        diet_fake_a.missing
    assert _runs(fake_root, "diet_fake_a") == 1


def test_a_failing_preparation_gives_the_ordinary_import_back(fake_root: Path) -> None:
    def prepare(module: object) -> None:
        raise RuntimeError("layout changed")

    _fake_package(fake_root, "diet_fake_b")
    assert not defer_package_init("diet_fake_b", prepare)
    assert "diet_fake_b" not in sys.modules and not is_deferred("diet_fake_b")
    import diet_fake_b

    assert diet_fake_b.WHOLE is True and _runs(fake_root, "diet_fake_b") == 1


def test_an_imported_or_missing_package_is_left_alone() -> None:
    assert not defer_package_init("json")
    assert not defer_package_init("no_such_package_here")


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_inside_and_left_as_it_was(enabled: bool) -> None:
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(RuntimeError):
            with collector_paused():
                assert not gc.isenabled()
                raise RuntimeError("an import failed")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_eager_imports_switch_keeps_the_ordinary_imports() -> None:
    """LIGHTNING_UNLEARN_EAGER_IMPORTS=1: a program embedding the package gets torchmetrics, NLTK and
    scipy.optimize imported the ordinary way (nothing deferred, torchmetrics' whole __init__ has run)."""
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys, lightning_unlearn, torchmetrics\n"
         "from lightning_unlearn.lazy_imports import is_deferred\n"
         "print(json.dumps([is_deferred(p) for p in ('torchmetrics', 'nltk', 'scipy.optimize')]"
         " + ['torchmetrics.classification' in sys.modules]))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
             "LIGHTNING_UNLEARN_EAGER_IMPORTS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, False, False, True]
