"""The sequence command's bookkeeping: requests and their folds, the steps each strategy makes, the cached and
resumable runner, the per-fold metrics and the table and figure data (fast; the end-to-end runs are in
``tests/end_to_end/test_sequence_end_to_end.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_unlearn.commands import main as command
from lightning_unlearn.data.sources import load_split
from lightning_unlearn.sequence import runner as seq_runner
from lightning_unlearn.sequence.main import folds_of
from lightning_unlearn.sequence.requests import Request, Requests, fold_bounds, fold_indices, parse_requests
from lightning_unlearn.sequence.spec import SequenceSpec, settings
from lightning_unlearn.sequence.table import markdown, plot_data, rows, write_outputs

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "sequence" / "tiny.yaml"


def count(split: str) -> int:
    return len(load_split("bundled", split))


# --- requests ---------------------------------------------------------------------------------------------------


def test_folds_are_contiguous_disjoint_and_cover_the_split() -> None:
    assert fold_bounds(40, 3) == [(0, 13), (13, 27), (27, 40)]
    assert fold_bounds(40, 2) == [(0, 20), (20, 40)]  # one TOFU author each
    for n, k in ((7, 7), (10, 3), (401, 4)):
        bounds = fold_bounds(n, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    for bad in (0, 41):
        with pytest.raises(ValueError, match="requests.count between 1 and 40"):
            fold_bounds(40, bad)


def test_the_three_kinds_of_requests_and_their_unions() -> None:
    folds = parse_requests({"folds": "forget01", "count": 3}, count)
    assert [r.split for r in folds.items] == ["forget01[0:13]", "forget01[13:27]", "forget01[27:40]"]
    assert [folds.union(k) for k in (1, 2, 3)] == ["forget01[0:13]", "forget01[0:27]", "forget01[0:40]"]
    assert (folds.eval_forget_split(), folds.eval_holdout_split()) == ("forget01_perturbed", "holdout01")
    nested = parse_requests({"nested": ["forget01", "forget05", "forget10"]}, count)
    assert nested.union(2) == "forget05"  # the larger set already holds the smaller
    assert (nested.eval_forget_split(), nested.eval_holdout_split()) == ("forget10_perturbed", "holdout10")
    sust = parse_requests({"splits": ["sust/forget_1", "sust/forget_2"]}, count)
    assert sust.union(1) == "sust/forget_1" and sust.union(2) == ["sust/forget_1", "sust/forget_2"]
    assert sust.eval_forget_split() is None  # MUSE: no per-request question set
    with pytest.raises(ValueError, match="there are 2"):
        sust.union(3)


@pytest.mark.parametrize("raw, message", [
    ({"folds": "forget01"}, "count an integer"),
    ({"folds": "forget01", "count": 3, "nested": ["forget01"]}, "exactly one of"),
    ({"nested": "forget01"}, "non-empty list"),
    ({"splits": []}, "non-empty list"),
    ({"splits": ["forget01", "forget01"]}, "names a split twice"),
    ({"nested": ["forget01"], "count": 2}, "count goes with folds"),
    (["forget01"], "must be a mapping"),
])
def test_bad_requests_are_refused_naming_what_to_write(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_requests(raw, count)


def test_each_request_owns_the_evaluation_samples_it_adds() -> None:
    """Nested TOFU splits: forget01 is the last 40 rows of forget05, which are the last 200 of forget10; each
    request owns the samples it adds, found by question in forget10_perturbed."""
    nested = parse_requests({"nested": ["forget01", "forget05", "forget10"]}, count)
    questions = [r["question"] for r in load_split("bundled", "forget10_perturbed")]
    asked = [[r["question"] for r in load_split("bundled", s)] for s in ("forget01", "forget05", "forget10")]
    folds = fold_indices(nested, questions, asked)
    assert [len(f) for f in folds] == [40, 160, 200]
    assert folds[0] == list(range(360, 400)) and sorted(folds[0] + folds[1] + folds[2]) == list(range(400))
    disjoint = parse_requests({"folds": "forget01", "count": 3}, count)
    asked = [[r["question"] for r in load_split("bundled", r.split)] for r in disjoint.items]
    ones = [r["question"] for r in load_split("bundled", "forget01_perturbed")]
    assert fold_indices(disjoint, ones, asked) == [list(range(0, 13)), list(range(13, 27)), list(range(27, 40))]
    with pytest.raises(ValueError, match="must hold every request's questions"):
        fold_indices(disjoint, ones[:20], asked)  # the third fold is not in the set


# --- the config and its steps -----------------------------------------------------------------------------------


def tiny_spec(tmp_path: Path) -> SequenceSpec:
    spec = SequenceSpec.load(TINY)
    spec.output = str(tmp_path / "out")
    return spec


def flag(args: list[str], name: str) -> str:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == name][-1]


def test_the_tiny_config_makes_four_strategies_over_three_requests(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    requests = spec.parse_requests()
    retain, before = spec.reference_steps(requests)
    assert (retain.series, before.series) == ("retain", "before") and before.depends == [retain]
    assert flag(before.test, "--model.retain_reference") == str(retain.folder / "TOFU_EVAL.json")
    chains = spec.steps(requests, retain)
    assert list(chains) == [("continue", "offset"), ("continue", "direct"), ("compose", "offset"),
                            ("fuse", "direct"), ("all_at_once", "offset")]
    cont = chains[("continue", "offset")]
    assert [flag(s.fit, "--trainer.max_epochs") for s in cont] == ["10", "20", "30"]  # 10 more per request
    assert [flag(s.fit, "--data.forget_split") for s in cont] == [r.split for r in requests.items]
    assert cont[0].resume is None and cont[1].resume is cont[0] and cont[2].resume is cont[1]
    compose = chains[("compose", "offset")]
    assert [len(s.parts) for s in compose] == [1, 2, 3] and compose[2].parts[:2] == compose[1].parts
    assert all("--model.export_dir" in s.fit and s.test[0] == "compose" for s in compose)
    assert [flag(s.fit, "--trainer.max_epochs") for s in compose] == ["10"] * 3  # each from the start
    fuse = chains[("fuse", "direct")]
    assert all(flag(s.fit, "--model") == "EUL" and flag(s.fit, "--config") == "configs/demo/eul.yaml" for s in fuse)
    assert all("--model.retain_weight" not in s.fit for s in fuse), "NPO's method_args stay off EUL"
    assert all(flag(s.test, "--model.adapters") == str(s.folder / "fused") for s in fuse)
    reference = chains[("all_at_once", "offset")]
    assert [flag(s.fit, "--data.forget_split") for s in reference] == ["forget01[0:13]", "forget01[0:27]",
                                                                       "forget01[0:40]"]
    for chain in chains.values():
        for step in chain:
            assert flag(step.test, "--data.eval_forget_split") == "forget01_perturbed"
            assert flag(step.test, "--model.retain_reference") == str(retain.folder / "TOFU_EVAL.json")


def test_a_changed_request_reruns_the_requests_built_on_it(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    requests = spec.parse_requests()
    keys = {s: [step.key("w") for step in chain] for s, chain in spec.steps(requests).items()}
    spec.strategies["continue"]["args"] = ["--model.gamma", "2"]  # changes every continue step's commands
    changed = {s: [step.key("w") for step in chain] for s, chain in spec.steps(requests).items()}
    assert all(a != b for a, b in zip(keys[("continue", "offset")], changed[("continue", "offset")]))
    assert keys[("compose", "offset")] == changed[("compose", "offset")]
    # only the first compose request edited by hand: the later ones, which compose its export, change too
    chain = spec.steps(requests)[("compose", "offset")]
    before = [s.key("w") for s in chain]
    chain[0].fit.append("--model.gamma=2")
    assert all(s.key("w") != k for s, k in zip(chain, before))
    assert [s.key("w") for s in spec.steps(requests)[("all_at_once", "offset")]] == keys[("all_at_once", "offset")]


def test_bad_sequence_configs_say_what_to_change(tmp_path: Path) -> None:
    base = yaml.safe_load(TINY.read_text())
    cases = [({"strategies": {"shuffle": {}}}, "unknown strategy 'shuffle'"),
             ({"strategies": {"compose": {"modes": ["direct"]}}}, "compose runs in \\['offset'\\] mode"),
             ({"strategies": {"continue": {"alpha": 1}}}, "unknown options \\['alpha'\\]"),
             ({"method": "NoSuchLoss"}, "method:"),
             ({"retain_reference": "x.json"}, "not both"),
             ({"colour": 1}, "unknown fields \\['colour'\\]")]
    for change, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ValueError, match=message):
            SequenceSpec.load(path)
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "requests"}))
    with pytest.raises(ValueError, match="missing \\['requests'\\]"):
        SequenceSpec.load(path)


def test_an_evaluation_subset_that_leaves_out_a_request_is_refused(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    requests = spec.parse_requests()
    assert folds_of(spec, requests) == [list(range(0, 13)), list(range(13, 27)), list(range(27, 40))]
    spec.args = ["--data.eval_subset", "20"]
    with pytest.raises(ValueError, match="eval_subset 20 .* at least 40"):
        folds_of(spec, requests)


def test_settings_read_the_data_options_a_command_would_use(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  max_length: 99\nmodel:\n  init_args:\n    max_new_tokens: 5\n")
    got = settings([str(ROOT / "configs/demo/unlearn.yaml")],
                   ["--data.eval_subset", "40", "--config", str(extra), "--data.lm_eval_tasks", "[tofu_general]",
                    "--model.max_new_tokens", "7", "--model", "NPO", "--model.optimizer.init_args.lr", "1"])
    assert got["data"]["eval_subset"] == 40 and got["data"]["max_length"] == 99
    assert got["data"]["lm_eval_tasks"] == ["tofu_general"] and got["data"]["forget_split"] == "forget01"
    assert got["model"]["max_new_tokens"] == 7 and "optimizer.init_args.lr" not in got["model"]


# --- the runner: cached, resumable, a failure is a row ------------------------------------------------------------


class FakeMain:
    """Stands in for ``main.py`` (the test is about the runner's bookkeeping, not training): ``fit`` writes a
    checkpoint, ``test`` a TOFU summary and report; a step whose forget split is in ``failing`` raises."""

    def __init__(self, failing: set[str] = frozenset()) -> None:
        self.calls: list[list[str]] = []
        self.failing = set(failing)

    def __call__(self, args: list[str]) -> None:
        self.calls.append(list(args))
        folder = Path(flag(args, "--trainer.default_root_dir"))
        if args[0] == "fit" and flag(args, "--data.forget_split") in self.failing:
            raise RuntimeError("diverged")
        folder.mkdir(parents=True, exist_ok=True)
        if args[0] == "fit":
            (folder / "last.ckpt").write_text(" ".join(args))
            return
        rouge = {str(i): {"rougeL_recall": 0.5} for i in range(40)}
        ratio = {str(i): {"score": 0.1 + i / 100} for i in range(40)}
        (folder / "TOFU_EVAL.json").write_text(json.dumps({"forget_Q_A_ROUGE": {"value_by_index": rouge},
                                                           "forget_truth_ratio": {"value_by_index": ratio}}))
        (folder / "TOFU_SUMMARY.json").write_text(json.dumps({"model_utility": 0.9, "tofu_world_facts_mc/acc": 0.5}))

    def names(self) -> list[str]:
        return [f"{a[0]} {Path(flag(a, '--trainer.default_root_dir')).parent}" for a in self.calls]


def run_all(spec: SequenceSpec, fake: FakeMain) -> dict:
    requests = spec.parse_requests()
    steps = seq_runner.StepRunner("TOFU", folds_of(spec, requests), fake, "w")
    references = spec.reference_steps(requests)
    refs = seq_runner.run_series(references, steps.run)
    chains = spec.steps(requests, references[0])
    return {"refs": refs, **{f"{s}-{m}": seq_runner.run_series(c, steps.run) for (s, m), c in chains.items()}}


def test_done_steps_are_skipped_and_a_failed_request_stops_only_its_own_line(tmp_cwd: Path) -> None:
    spec = tiny_spec(tmp_cwd)
    spec.output, spec.config = "out", str(ROOT / spec.config)
    spec.strategies = {"continue": {"modes": ["offset"]}, "all_at_once": {"modes": ["offset"]}}
    fake = FakeMain(failing={"forget01[13:27]"})
    results = run_all(spec, fake)
    cont, ref = results["continue-offset"], results["all_at_once-offset"]
    assert [r["status"] for r in cont] == ["ok", "failed", "failed"]
    assert cont[1]["error"] == "RuntimeError: diverged"
    assert "builds on continue-offset after 2 requests" in cont[2]["error"]
    assert [r["status"] for r in ref] == ["ok", "ok", "ok"], "the other strategies go on"
    assert fake.names() == ["test out/steps/retain", "test out/steps/before",
                            "fit out/steps/continue-offset/1", "test out/steps/continue-offset/1",
                            "fit out/steps/continue-offset/2",  # failed: request 3 is not run
                            "fit out/steps/all_at_once-offset/1", "test out/steps/all_at_once-offset/1",
                            "fit out/steps/all_at_once-offset/2", "test out/steps/all_at_once-offset/2",
                            "fit out/steps/all_at_once-offset/3", "test out/steps/all_at_once-offset/3"]
    # request 2 resumed request 1's checkpoint, with 10 more epochs
    fit2 = fake.calls[4]
    assert flag(fit2, "--ckpt_path") == str(Path("out/steps/continue-offset/1/fit/last.ckpt"))
    assert flag(fit2, "--trainer.max_epochs") == "20"
    # the next run: only the failed request and the one built on it
    fixed = FakeMain()
    again = run_all(spec, fixed)
    assert fixed.names() == ["fit out/steps/continue-offset/2", "test out/steps/continue-offset/2",
                             "fit out/steps/continue-offset/3", "test out/steps/continue-offset/3"]
    assert all(r["status"] == "ok" for chain in again.values() for r in chain)
    assert again["continue-offset"][0] == cont[0], "a done step is read back, not rerun"
    third = FakeMain()
    run_all(spec, third)
    assert third.calls == []
    # the per-fold metrics are in each step's result: request 2 of 3, folds of 13, 14, 13 samples
    step = again["continue-offset"][1]
    assert [f["samples"] for f in step["folds"]] == [13, 14, 13]
    assert step["requested"]["samples"] == 27 and step["pending"]["samples"] == 13
    assert step["requested"]["forget_quality"] == pytest.approx(1.0)  # the same ratios as the "retain model"


# --- per-fold metrics, table and figure data ----------------------------------------------------------------------


def test_fold_metrics_average_each_group_and_test_the_requested_samples_only() -> None:
    report = {"forget_Q_A_ROUGE": {"value_by_index": {str(i): {"rougeL_recall": float(i < 2)} for i in range(6)}},
              "forget_truth_ratio": {"value_by_index": {str(i): {"score": 0.9 if i < 2 else 0.1} for i in range(6)}},
              "forget_Q_A_Prob": {"value_by_index": {str(i): {"prob": 0.5} for i in range(6)}}}
    reference = {"forget_truth_ratio": {"value_by_index": {str(i): {"score": 0.9} for i in range(6)}}}
    got = seq_runner.fold_metrics(report, [[0, 1], [2, 3], [4, 5]], 1, reference)
    assert [f["forget_Q_A_ROUGE"] for f in got["folds"]] == [1.0, 0.0, 0.0]
    assert got["requested"]["forget_Q_A_ROUGE"] == 1.0 and got["pending"]["forget_Q_A_ROUGE"] == 0.0
    assert got["requested"]["samples"] == 2 and got["pending"]["samples"] == 4
    assert got["requested"]["forget_quality"] == pytest.approx(1.0)  # requested samples match the reference
    later = seq_runner.fold_metrics(report, [[0, 1], [2, 3], [4, 5]], 3, reference)
    assert later["requested"]["forget_quality"] < 0.2 and later["pending"]["samples"] == 0
    assert seq_runner.fold_metrics(report, [[0, 1]], 1)["requested"].get("forget_quality") is None


def result(series: str, k: int, rouge: float, ok: bool = True) -> dict:
    return {"series": series, "k": k, "status": "ok" if ok else "failed", "error": None if ok else "Boom: x",
            "summary": {"model_utility": 0.8, "tofu_real_authors_mc/acc": 0.25, "tofu_world_facts_mc/acc": 0.75},
            "requested": {"forget_Q_A_ROUGE": rouge, "samples": 13}, "pending": {"forget_Q_A_ROUGE": 0.9,
                                                                               "samples": 27 - 13 * k},
            "folds": [{"forget_Q_A_ROUGE": rouge}] * 3, "train_s": 3.0}


def test_table_rows_start_every_line_at_the_model_before_any_request(tmp_path: Path) -> None:
    before = {"status": "ok", "summary": {"model_utility": 0.9}, "folds": [{"forget_Q_A_ROUGE": 1.0}] * 3,
              "requested": {"samples": 0}, "pending": {"forget_Q_A_ROUGE": 1.0, "samples": 40}}
    series = {"compose": [result("compose", 1, 0.1), result("compose", 2, 0.2, ok=False)],
              "all_at_once-offset": [result("all_at_once-offset", 1, 0.05), result("all_at_once-offset", 2, 0.04)]}
    table = rows(before, series)
    assert [(r["series"], r["k"]) for r in table] == [("compose", 0), ("compose", 1), ("compose", 2),
                                                     ("all_at_once-offset", 0), ("all_at_once-offset", 1),
                                                     ("all_at_once-offset", 2)]
    assert table[0]["pending_rouge"] == 1.0 and table[0]["requested_rouge"] is None
    assert table[1]["general_accuracy"] == pytest.approx(0.5) and table[2]["error"] == "Boom: x"
    lines = plot_data(table, "requested_rouge")
    assert lines == {"all_at_once-offset": ([1, 2], [0.05, 0.04]), "compose": ([1], [0.1])}, \
        "a failed step leaves its line, not a point"
    assert plot_data(table, "model_utility")["compose"] == ([0, 1], [0.9, 0.8])
    text = markdown(table, "# t")
    assert "| compose | 2 |" in text and "FAILED" in text and "- compose after 2: Boom: x" in text
    written = write_outputs(tmp_path, before, series, "# t", {"command": "x"})
    assert written == table
    assert json.loads((tmp_path / "SEQUENCE.json").read_text())["table"] == json.loads(json.dumps(table))
    assert (tmp_path / "SEQUENCE.md").read_text() == text and (tmp_path / "SEQUENCE.png").stat().st_size > 1000
    assert not any(math.isnan(v) for _, ys in lines.values() for v in ys)


def test_the_subcommand_is_listed_and_answers_help(capsys: pytest.CaptureFixture) -> None:
    command(["--help"])
    assert "sequence" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        command(["sequence", "--help"])
    assert exit_.value.code == 0 and "--strategies" in capsys.readouterr().out


def test_requests_know_their_names() -> None:
    requests = Requests("splits", (Request(1, "a"), Request(2, "b")))
    assert len(requests) == 2 and requests.items[1].name == "request 2 (b)"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sequence").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sequence_config_loads_and_makes_its_steps(path: Path) -> None:
    """The real-model configs too (their data is on the hub: the requests are parsed without reading it)."""
    spec = SequenceSpec.load(path)
    requests = parse_requests(spec.requests, lambda split: 40)
    chains = spec.steps(requests, (spec.reference_steps(requests) or [None])[0])
    assert len(chains) == len(spec.series()) >= 4 and all(len(c) == len(requests) >= 3 for c in chains.values())
    for chain in chains.values():
        for step in chain:
            assert Path(flag(step.fit, "--config")).is_file()
    if "muse" in path.stem:
        assert spec.benchmark() == "MUSE" and requests.eval_forget_split() is None
