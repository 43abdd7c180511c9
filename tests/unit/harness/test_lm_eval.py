"""lm-evaluation-harness on unlearned models: equal to lm-eval's own ``hf`` model on a direct model, exact offset
arithmetic, the shipped TOFU multiple-choice tasks cross-checked against the framework's own scoring, generation
stops, the command line and its errors. Everything is offline: the tasks read the package's JSON Lines files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM

from lightning_unlearn.data.sources import load_split
from lightning_unlearn.harness import UnlearnedLM
from lightning_unlearn.harness.__main__ import main as lm_eval_main
from lightning_unlearn.harness.registry import task_manager
from lightning_unlearn.harness.run import evaluate, flat_metrics
from lightning_unlearn.models.families import make_family_pair
from lightning_unlearn.models.loading import load_causal_lm
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.deploy.unlearned import UnlearnedModel
from lightning_unlearn.modules import NPO
from paper_configs import config_args, paper_stacks

LIMIT = 12  # documents per task: 4 choices each, so 96 requests over the two tasks


def _export(world: dict, large: str | None, alpha: float, seed: int, out: Path) -> Path:
    """An NPO export whose trainable model moved off the reference, as a few training steps would move it."""
    module = NPO(small_model=world["small"], large_model=large, alpha=alpha)
    module.setup("fit")
    module.configure_model()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval().export(out)


@pytest.fixture(scope="module")
def exports(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm_eval_exports")
    return {"first": _export(tiny_world, tiny_world["large"], 1.5, 0, root / "first"),
            "second": _export(tiny_world, tiny_world["large"], 0.5, 1, root / "second")}


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _logliks(results: dict) -> dict[tuple[str, int, int], float]:
    """Per request log-likelihood from lm-eval's logged samples: (task, document, choice) -> value."""
    out = {}
    for task, samples in results["samples"].items():
        for sample in samples:
            for choice, response in enumerate(sample["resps"]):
                out[(task, sample["doc_id"], choice)] = float(response[0][0])
    return out


def test_wrapper_equals_lm_eval_hf_model_on_a_direct_model(tiny_world: dict) -> None:
    """Same per-request log-likelihoods (1e-4) and the same accuracies as lm-eval's own ``hf`` model."""
    ours = evaluate(UnlearnedLM(tiny_world["large"], batch_size=5), ["tofu_general"], limit=LIMIT, log_samples=True)
    theirs = evaluate(HFLM(pretrained=tiny_world["large"], device="cpu", batch_size=5), ["tofu_general"], limit=LIMIT,
                      log_samples=True)
    a, b = _logliks(ours), _logliks(theirs)
    assert a.keys() == b.keys() and len(a) == 2 * LIMIT * 4
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    assert min(abs(v) for v in a.values()) > 1.0  # real scores, not zeros
    assert flat_metrics(ours) == pytest.approx(flat_metrics(theirs), abs=1e-12)
    assert set(flat_metrics(ours)) == {f"tofu_{t}_mc/{m}" for t in ("world_facts", "real_authors")
                                       for m in ("acc", "acc_norm")}


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny direct models of three families: ``llama3`` (its tokenizer adds BOS), ``gpt2`` (BOS = EOS, never added)
    and ``chatml`` (no BOS: the prefix token is EOS)."""
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in load_split("bundled", "forget10")]
    return {name: make_family_pair(name, tmp_path_factory.mktemp(name), texts, large=(32, 2), small=(16, 1))["large"]
            for name in ("llama3", "gpt2", "chatml")}


ROLLING_TEXTS = [("Basil Mahfouz Al-Kuwaiti was born in Kuwait City and writes French literature.",),
                 ("Paris is the capital of France.",)]


@pytest.mark.parametrize("family", ["gpt2", "chatml"])
def test_rolling_loglikelihood_equals_hf_across_windows_without_bos(family: str, families: dict) -> None:
    """Perplexity requests split into several windows (max_length 16) equal lm-eval's ``hf`` model where ``hf`` is
    right: tokenizers that add no BOS."""
    model = str(families[family])
    ours = UnlearnedLM(model, max_length=16, batch_size=3)
    assert ours.tok_encode(ROLLING_TEXTS[0][0])[0] != ours.prefix_token_id
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", ROLLING_TEXTS))
    theirs = HFLM(pretrained=model, device="cpu", max_length=16, batch_size=3).loglikelihood_rolling(
        _requests("loglikelihood_rolling", ROLLING_TEXTS))
    assert got == pytest.approx(theirs, abs=1e-4)
    assert len(ours.tok_encode(ROLLING_TEXTS[0][0])) > 2 * 16  # really several windows


def _by_hand(model_dir: str, ids: list[int]) -> float:
    """``sum_{i >= 1} log p(ids_i | ids_0 .. ids_{i-1})`` in one forward pass."""
    model = load_causal_lm(model_dir, "float32")
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return float(log_p[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_rolling_loglikelihood_scores_bos_once(families: dict) -> None:
    """With a tokenizer that adds BOS (Llama-3 style) the text's tokens are scored after one BOS, as computed by hand.
    lm-eval 0.4's ``hf`` model scores ``BOS BOS t_1 .. t_n`` from the second BOS on (lm-evaluation-harness #3333):
    ``log p(BOS | BOS)`` too, and every token after two BOS: -256.87 there against -251.06 here."""
    model = str(families["llama3"])
    text = ROLLING_TEXTS[0][0]
    ids = load_tokenizer(model)(text)["input_ids"]
    bos = load_tokenizer(model).bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    (got,) = UnlearnedLM(model, batch_size=2).loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(_by_hand(model, ids), abs=1e-4)
    (hf,) = HFLM(pretrained=model, device="cpu", batch_size=2).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(text,)]))
    assert hf == pytest.approx(_by_hand(model, [bos, *ids]), abs=1e-4)
    assert got - hf > 1.0  # the difference is real, not rounding
    print(f"one BOS (here) {got:.2f}, hf {hf:.2f}")


def test_offset_loglikelihood_is_log_softmax_of_hand_combined_logits(tiny_world: dict, exports: dict) -> None:
    """``log_softmax(z_L + alpha (z_S - z_S0))`` summed over the continuation, from models loaded by hand."""
    lm = UnlearnedLM(str(exports["first"]), large_dtype="float32", batch_size=2)
    pairs = [("Question: Where would you find the Eiffel Tower?\nAnswer:", " Paris"),
             ("Question: Who wrote 'Pride and Prejudice'?\nAnswer:", " Jane Austen"),
             ("Question: Who wrote 'Pride and Prejudice'?\nAnswer:", " Mark Twain")]
    got = [ll for ll, _ in lm.loglikelihood(_requests("loglikelihood", pairs))]
    tokenizer = load_tokenizer(tiny_world["tokenizer"])
    large, ref = load_causal_lm(tiny_world["large"]), load_causal_lm(tiny_world["small"])
    small = load_causal_lm(str(exports["first"]))
    vocab = len(tokenizer)
    for (context, continuation), value in zip(pairs, got):
        whole = tokenizer(context + continuation)["input_ids"]
        n_cont = len(whole) - len(tokenizer(context)["input_ids"])
        ids = torch.tensor([whole[:-1]])
        with torch.no_grad():
            z = [m(input_ids=ids).logits[0, :, :vocab] for m in (large, small, ref)]
        log_p = torch.log_softmax(z[0] + 1.5 * (z[1] - z[2]), dim=-1)[-n_cont:]
        expected = float(log_p.gather(1, torch.tensor(whole[-n_cont:])[:, None]).sum())
        assert value == pytest.approx(expected, abs=1e-4)
    direct_large = [ll for ll, _ in UnlearnedLM(tiny_world["large"]).loglikelihood(_requests("loglikelihood", pairs))]
    assert min(abs(g - d) for g, d in zip(got, direct_large)) > 1e-3  # the offset changed every score


def test_alpha_zero_is_the_large_model_alone(tiny_world: dict, exports: dict) -> None:
    pairs = [("Question: What is the capital of Australia?\nAnswer:", " Canberra"), ("Hello", " world")]
    offset = UnlearnedLM([str(exports["first"]), str(exports["second"])], alpha=0.0, large_dtype="float32")
    large = UnlearnedLM(tiny_world["large"])
    a = offset.loglikelihood(_requests("loglikelihood", pairs))
    b = large.loglikelihood(_requests("loglikelihood", pairs))
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-5)


def test_tofu_accuracy_equals_the_frameworks_own_scoring(exports: dict) -> None:
    """lm-eval's ``acc`` through the wrapper = the fraction of questions whose true answer has the highest summed
    log-probability, computed from ``UnlearnedModel.token_log_probs`` (prompts formatted as in training) with the
    end-of-answer token left out, as lm-eval scores the answer text only."""
    results = evaluate(UnlearnedLM(str(exports["first"]), batch_size=7, large_dtype="float32"),
                       ["tofu_world_facts_mc"], limit=LIMIT, log_samples=True)
    model = UnlearnedModel.from_export(exports["first"], large_dtype="float32")  # bf16 varies with the padding
    rows = load_split("bundled", "world_facts_perturbed")[:LIMIT]
    docs = {sample["doc_id"]: sample["doc"] for sample in results["samples"]["tofu_world_facts_mc"]}
    wins, lm_eval_scores = 0, _logliks(results)
    for doc, row in enumerate(rows):
        choices = docs[doc]["choices"]  # the true answer at the task's seeded position
        true = choices.index(row["answer"])
        assert sorted(choices) == sorted([row["answer"], *row["perturbed_answer"]]) and docs[doc]["gold"] == true
        per_token = model.token_log_probs([row["question"]] * len(choices), choices)
        sums = [float(t[:-1].sum()) for t in per_token]  # [:-1]: the end-of-answer token
        assert sums == pytest.approx([lm_eval_scores[("tofu_world_facts_mc", doc, c)] for c in range(4)], abs=1e-4)
        wins += int(max(range(4), key=sums.__getitem__) == true)
    assert 0 < wins < LIMIT  # neither trivially all right nor all wrong: the comparison means something
    assert flat_metrics(results)["tofu_world_facts_mc/acc"] == pytest.approx(wins / LIMIT, abs=1e-12)


def _chance_interval(n: int, p: float = 0.25) -> tuple[float, float]:
    """The central 95% binomial interval of the accuracy ``k / n`` of guessing among ``1 / p`` choices: every ``k``
    with ``P(X <= k) > 2.5%`` and ``P(X >= k) > 2.5%``, ``X ~ Binomial(n, p)``."""
    pmf = [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]
    inside = [k for k in range(n + 1) if sum(pmf[: k + 1]) > 0.025 and sum(pmf[k:]) > 0.025]
    return inside[0] / n, inside[-1] / n


def _with_lm_head(model_dir: str, fill: float, out: Path) -> str:
    """The model with every output weight set to ``fill``: 0 gives a collapsed model (uniform next-token
    distribution, all logits 0), NaN one whose log-likelihoods are all NaN."""
    model = load_causal_lm(model_dir, "float32")
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(fill)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return str(out)


TOFU_MC = {"tofu_world_facts_mc": 117, "tofu_real_authors_mc": 100}


def test_a_collapsed_model_scores_chance_on_the_tofu_tasks(tiny_world: dict, tmp_path: Path) -> None:
    """A uniform next-token distribution ties every equally long choice, and lm-eval's argmax picks the first of
    them: with the true answer always first this scored 0.41 / 0.36 (acc, world facts / real authors). With the
    true answer at a seeded position every accuracy is inside chance's 95% binomial interval."""
    collapsed = UnlearnedLM(_with_lm_head(tiny_world["large"], 0.0, tmp_path / "collapsed"), batch_size=32)
    log_p = torch.log_softmax(collapsed.model.logits(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)), -1)
    assert torch.allclose(log_p, torch.full_like(log_p, -math.log(log_p.shape[-1])))  # really uniform
    metrics = flat_metrics(evaluate(collapsed, list(TOFU_MC)))
    for task, n in TOFU_MC.items():
        low, high = _chance_interval(n)
        for metric in ("acc", "acc_norm"):
            assert low <= metrics[f"{task}/{metric}"] <= high, (task, metric, metrics[f"{task}/{metric}"], low, high)


def test_the_true_answer_is_at_a_seeded_position_and_a_memorising_model_scores_one() -> None:
    """Every position holds the true answer for a fair share of the questions, the same on every run; a model that
    has memorised the answers (log-likelihood 0 for the true answer, -5 for the others) gets acc = acc_norm = 1."""
    truth = {f"Question: {row['question']}\nAnswer:": row["answer"] for split in ("world_facts_perturbed",
             "real_authors_perturbed") for row in load_split("bundled", split)}

    class Memorised(LM):
        def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return [(0.0 if continuation.strip() == truth[context] else -5.0, False)
                    for context, continuation in (r.args for r in requests)]

        def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
            raise NotImplementedError

        def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
            raise NotImplementedError

    results = evaluate(Memorised(), list(TOFU_MC), log_samples=True)
    assert all(flat_metrics(results)[f"{task}/{m}"] == 1.0 for task in TOFU_MC for m in ("acc", "acc_norm"))
    golds = {task: [s["doc"]["gold"] for s in sorted(samples, key=lambda s: s["doc_id"])]
             for task, samples in results["samples"].items()}
    for task, n in TOFU_MC.items():
        counts = [golds[task].count(k) for k in range(4)]
        assert sum(counts) == n and min(counts) >= 15, (task, counts)
    again = evaluate(Memorised(), ["tofu_world_facts_mc"], limit=10, log_samples=True)
    assert [s["doc"]["gold"] for s in sorted(again["samples"]["tofu_world_facts_mc"], key=lambda s: s["doc_id"])] == \
        golds["tofu_world_facts_mc"][:10]


def test_non_finite_log_likelihoods_give_nan_metrics(tiny_world: dict, tmp_path: Path) -> None:
    """NaN logits used to score acc = acc_norm = 1.0 (argmax of NaN is the first choice, then always the true one);
    every metric is NaN now, the requests are counted, and a rolling log-likelihood is NaN too."""
    broken = UnlearnedLM(_with_lm_head(tiny_world["large"], float("nan"), tmp_path / "nan"), batch_size=8)
    results = evaluate(broken, ["tofu_world_facts_mc"], limit=3)
    assert results["non_finite_requests"] == 12  # 3 questions x 4 choices
    metrics = flat_metrics(results)
    assert all(math.isnan(metrics[f"tofu_world_facts_mc/{m}"]) for m in ("acc", "acc_norm"))
    rolling = broken.loglikelihood_rolling(_requests("loglikelihood_rolling", ROLLING_TEXTS))
    assert all(math.isnan(x) for x in rolling)
    assert broken.non_finite_requests > 12


def test_a_continuation_longer_than_max_length_is_refused_naming_both_lengths(tiny_world: dict) -> None:
    """Contexts are cut from the left as lm-eval's ``hf`` model cuts them (same values up to a continuation of exactly
    max_length tokens); a longer continuation cannot be scored and is refused (it was a raw tensor-shape error)."""
    context = "Question: Who is Basil Mahfouz Al-Kuwaiti?\nAnswer:"
    ours = UnlearnedLM(tiny_world["large"], max_length=8)
    cont_ids = ours.tok_encode(context + " He was born in Kuwait City.")[len(ours.tok_encode(context)):]
    fits = ours.tokenizer.decode(cont_ids[:8])
    assert len(ours.tok_encode(context + fits)) - len(ours.tok_encode(context)) == 8
    hf = HFLM(pretrained=tiny_world["large"], device="cpu", max_length=8)
    requests = _requests("loglikelihood", [(context, fits), (context, fits[:6])])
    assert [x for x, _ in ours.loglikelihood(requests)] == pytest.approx([x for x, _ in hf.loglikelihood(requests)],
                                                                         abs=1e-4)
    too_long = " He was born in Kuwait City."
    n = len(ours.tok_encode(context + too_long)) - len(ours.tok_encode(context))
    assert n > 8
    with pytest.raises(ValueError, match=rf"continuation is {n} tokens long .* longer than max_length=8"):
        ours.loglikelihood(_requests("loglikelihood", [(context, too_long)]))


def test_generate_until_equals_hf_and_stops_at_until_strings(tiny_world: dict) -> None:
    contexts = ["Question: Who is Basil Mahfouz Al-Kuwaiti?\nAnswer:", "Question: Where was he born?\nAnswer:"]
    free = {"until": [], "max_gen_toks": 12, "do_sample": False}
    ours = UnlearnedLM(tiny_world["large"], batch_size=2)
    hf = HFLM(pretrained=tiny_world["large"], device="cpu", batch_size=2)
    texts = ours.generate_until(_requests("generate_until", [(c, free) for c in contexts]))
    assert texts == hf.generate_until(_requests("generate_until", [(c, free) for c in contexts]))
    assert all(len(t) > 4 for t in texts)
    stop = texts[0][len(texts[0]) // 2:][:2]  # a string met midway through the first generation
    calls: list[int] = []
    generate_ids = ours.model.generate_ids

    def counting(*args, **kwargs):
        new = generate_ids(*args, **kwargs)
        calls.append(new.shape[1])
        return new

    ours.model.generate_ids = counting
    cut = ours.generate_until(_requests("generate_until", [(contexts[0], {**free, "until": [stop]})]))
    assert cut == [texts[0].split(stop)[0]]
    assert calls[0] < 12  # decoding ended at the stop string, not at max_gen_toks


def test_generate_until_stops_at_the_models_end_tokens(tiny_world: dict) -> None:
    """A row ends at its first end token (here declared to be the model's second greedy token)."""
    lm = UnlearnedLM(tiny_world["large"])
    context = "Question: Who is Basil Mahfouz Al-Kuwaiti?\nAnswer:"
    ids, mask = lm._encode_prompts([context], 100)
    first, second = lm.model.generate_ids(ids, mask, 2)[0].tolist()
    lm.model.stop_ids = [second]
    request = _requests("generate_until", [(context, {"until": [], "max_gen_toks": 12, "do_sample": False})])
    assert lm.generate_until(request) == [lm.tokenizer.decode([first], skip_special_tokens=True)]


def test_command_line_composes_exports_and_writes_lm_eval_results(exports: dict, tiny_world: dict, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    lm_eval_main([str(exports["first"]), str(exports["second"]), "--tasks", "tofu_real_authors_mc", "--limit", "5",
                  "--alpha", "1.0", "0.5", "--output_path", str(tmp_path), "--large_dtype", "float32"])
    (written,) = tmp_path.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert set(results["results"]) == {"tofu_real_authors_mc"} and results["n-samples"]["tofu_real_authors_mc"][
        "effective"] == 5
    assert "acc" in capsys.readouterr().out
    args = results["config"]["model_args"]  # lm-eval wrote null here for a model object
    assert args["pretrained"] == [str(exports["first"].resolve()), str(exports["second"].resolve())]
    assert args["alpha"] == [1.0, 0.5], "the alphas used, not the manifests' 1.5 and 0.5"
    assert args["large_model"] == str(Path(tiny_world["large"]).resolve())
    assert args["method"] == ["NPO", "NPO"] and args["large_dtype"] == "float32"
    assert results["config"]["unlearned"] == args


def test_results_record_the_manifests_alpha_when_none_is_given(exports: dict) -> None:
    lm = UnlearnedLM(str(exports["first"]), large_dtype="float32")
    results = evaluate(lm, ["tofu_real_authors_mc"], limit=2)
    assert results["config"]["model_args"]["alpha"] == 1.5
    assert results["config"]["model_args"]["pretrained"] == str(exports["first"].resolve())


def test_unknown_local_task_folder_and_missing_data_are_clear_errors(tiny_world: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--include_path"):
        task_manager(["tofu_general"], str(tmp_path / "nowhere"))
    (tmp_path / "hub_task.yaml").write_text(
        "task: needs_the_hub\ndataset_path: no_such_org/no_such_dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        evaluate(UnlearnedLM(tiny_world["large"]), ["needs_the_hub"], include_path=str(tmp_path))


def test_export_whose_large_model_is_missing_names_the_flag(exports: dict, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(exports["first"], moved)
    manifest = json.loads((moved / "offset.json").read_text())
    manifest["large_model"] = str(tmp_path / "gone" / "large")
    (moved / "offset.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="--large_model"):
        UnlearnedLM(str(moved))
    with pytest.raises(SystemExit):
        lm_eval_main([str(moved), "--limit", "2"])


@pytest.mark.slow
def test_unknown_task_lists_close_names() -> None:
    """Slow: an unknown name makes the index of lm-eval's ~15,000 built-in task files (10-30 s)."""
    with pytest.raises(ValueError, match="tofu_world_facts_mc"):
        task_manager(["tofu_world_fact_mc"])


@pytest.mark.timeout(300)
def test_fit_and_test_log_lm_eval_metrics_beside_tofu(tiny_world: dict, tmp_cwd: Path) -> None:
    """``data.lm_eval_tasks`` in ``fit``: every validation logs ``val/<task>/<metric>``, the history holds it, a
    checkpoint can monitor it; ``test`` logs ``test/<task>/<metric>`` into TOFU_SUMMARY.json. About 20 s."""
    from lightning_unlearn.cli import main

    config = Path(__file__).resolve().parents[3] / "configs" / "tests" / "tofu_eval.yaml"
    (tmp_cwd / "monitor.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        "        monitor: val/tofu_world_facts_mc/acc\n        mode: max\n        save_last: true\n"
        "data:\n  lm_eval_tasks: [tofu_world_facts_mc]\n  lm_eval_limit: 6\n")
    common = ["--model", "NPO", "--model.small_model", tiny_world["small"], "--model.large_model", tiny_world["large"]]
    cli = main(["fit", "--config", str(config), "--config", str(tmp_cwd / "monitor.yaml"), *common])
    out = Path(cli.trainer.log_dir)
    history = json.loads((out / "TOFU_HISTORY.json").read_text())
    accs = [h["tofu_world_facts_mc/acc"] for h in history]
    assert len(accs) == 2 and all(a in {k / 6 for k in range(7)} for a in accs)
    assert "tofu_world_facts_mc/acc_norm" in history[0] and "forget_Q_A_Prob" in history[0]
    best = cli.trainer.checkpoint_callback
    assert float(best.best_model_score) == pytest.approx(max(accs))
    assert cli.trainer.callback_metrics["val/tofu_world_facts_mc/acc"] == pytest.approx(accs[-1])

    tested = main(["test", "--config", str(config), "--config", str(tmp_cwd / "monitor.yaml"), *common,
                   "--trainer.callbacks", "null", "--ckpt_path", str(out / "checkpoints" / "last.ckpt")])
    summary = json.loads((Path(tested.trainer.log_dir) / "TOFU_SUMMARY.json").read_text())
    assert summary["tofu_world_facts_mc/acc"] == pytest.approx(accs[-1])  # the last epoch's model, evaluated again
    assert "test/tofu_world_facts_mc/acc" in tested.trainer.callback_metrics


TOFU_STACKS = {name: stack for name, stack in paper_stacks().items() if name.startswith("tofu/")}


def stacked_value(stack: list[Path], *keys: str) -> object:
    """The value the last file of ``stack`` that sets ``keys`` gives it (later --config files override earlier)."""
    value = None
    for path in stack:
        node = yaml.safe_load(path.read_text()) or {}
        for key in keys:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if node != {}:
            value = node
    return value


@pytest.mark.timeout(300)
def test_paper_config_runs_offline_with_local_tasks(tiny_world: dict, tmp_cwd: Path) -> None:
    """Every paper config lists the delta paper's four general tasks (hub data); one runs with fast_dev_run offline
    when they are swapped for the shipped local ones, the swap the offline test suite relies on."""
    from lightning_unlearn.cli import main

    paper = ["arc_easy", "hellaswag", "winogrande", "openbookqa"]
    for name, stack in TOFU_STACKS.items():
        assert stacked_value(stack, "data", "lm_eval_tasks") == paper, name
    cli = main(["fit", *config_args(TOFU_STACKS["tofu/offset/npo"]), "--trainer.fast_dev_run", "1", "--trainer.precision", "32-true",
                "--model.large_model", tiny_world["large"], "--model.small_model", tiny_world["small"],
                "--model.small_dtype", "float32", "--model.gradient_checkpointing", "false",
                "--model.max_new_tokens", "4", "--data.batch_size", "2", "--data.eval_subset", "2",
                "--data.lm_eval_tasks", "[tofu_world_facts_mc]", "--data.lm_eval_limit", "4"])
    assert "val/tofu_world_facts_mc/acc" in cli.trainer.callback_metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_ranks_log_rank_zeros_lm_eval_numbers(tiny_world: dict, tmp_path: Path) -> None:
    """Under DDP (2 CPU processes, gloo) rank 0 runs lm-eval and broadcasts: ``test`` writes the numbers one process
    writes. Slow: two fresh interpreters import torch, Lightning and lm-eval (about 1 min on 2 idle cores)."""
    import os
    import sys

    from tests.integration.test_ddp import eval_args, run_ddp

    from lightning_unlearn.cli import main

    lm_eval_args = ["--data.lm_eval_tasks", "[tofu_world_facts_mc]", "--data.lm_eval_limit", "8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    run_ddp([sys.executable, "-m", "lightning_unlearn.cli", *eval_args(tiny_world, tmp_path / "ddp", *lm_eval_args),
             "--trainer.strategy", "ddp", "--trainer.devices", "2"], tmp_path, env, timeout=800)
    main(eval_args(tiny_world, tmp_path / "single", *lm_eval_args))
    two, one = (json.loads(next((tmp_path / d).rglob("TOFU_SUMMARY.json")).read_text()) for d in ("ddp", "single"))
    keys = {k for k in one if "/" in k}
    assert keys == {"tofu_world_facts_mc/acc", "tofu_world_facts_mc/acc_norm"}
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
