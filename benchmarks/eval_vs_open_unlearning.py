"""Side by side: open-unlearning's TOFU evaluator and this framework's ``main.py test``, same model, same suite.

Each round runs both as fresh processes (one torch thread each, ``OMP_NUM_THREADS=1``; the order alternates
between rounds), on the same model directory and the TOFU suite of one forget split: the forget set's
``*_perturbed`` file, ``retain_perturbed``, ``real_authors_perturbed``, ``world_facts_perturbed`` and the
matching holdout (forget01: 40 + 400 + 100 + 117 + 40 = 697 samples), greedy generation of at most
``--max-new-tokens`` tokens. It prints each run's wall and CPU time and peak resident memory (``wait4``'s
``ru_maxrss``), the median ratio open-unlearning / this framework, and a metric agreement table: each
metric's aggregate on both sides, the largest per-sample difference over ``value_by_index`` (every numeric
field both sides report for a sample), and how many ROUGE generations differ.

Times are whole commands (interpreter start, imports, model loading, evaluation, writing the report),
as a user runs them. ``--offset`` also times this framework's offset mode (a frozen large model, a small
model and its frozen reference) with all three being the given model, so the offset is exactly zero and
the metrics must equal the direct run's; its time is reported against the direct run's, whose forward cost
it triples.

open-unlearning needs its own environment (it pins transformers 4.45; ``benchmarks/open_unlearning_env.sh
CLONE`` makes one). To run it offline on CPU the script writes, under ``--work``: a copy of its ``configs/``
whose TOFU dataset configs read the local ``<split>.jsonl`` files (``path: json`` with ``data_files``) and
with a model config (float32, default attention, CPU); a model directory whose ``config.json`` transformers
4.45 reads (weights linked, not copied); and a tokenizer directory with the model's ``tokenizer.json`` and a
``tokenizer_config.json`` 4.45 can read. A tokenizer without a chat template (the tiny models) gets one that
renders exactly the prompt and answer this framework builds with its plain ``Question: ... Answer:`` template
(BOS and EOS included), so both sides score the same token sequences. A chat model's own template is passed
on as it is; the two projects mark where its answers end differently, which the agreement table shows.

    benchmarks/open_unlearning_env.sh /path/to/open-unlearning
    python benchmarks/eval_vs_open_unlearning.py --ou /path/to/open-unlearning --model runs/demo/models/large_ft
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUITE_SIZES_NOTE = "forget01 suite: 40 forget + 400 retain + 100 real authors + 117 world facts + 40 holdout"


@dataclass
class Run:
    """One timed command: wall and CPU seconds, peak resident memory in MiB, its exit status."""

    label: str
    wall_s: float
    cpu_s: float
    peak_mib: float
    returncode: int


def timed(label: str, command: list[str], cwd: Path, env: dict[str, str], log: Path) -> Run:
    """Run ``command`` to completion, output to ``log``; time it and read its rusage from ``wait4``.

    Raises:
        RuntimeError: the command failed (the log's tail is in the message).
    """
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return Run(label, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode)


def one_thread_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every timed command: one thread, no GPU, offline."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- open-unlearning shims


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def plain_chat_template(template: str, answer_prefix: str, bos: bool) -> str:
    """A Jinja chat template rendering this framework's plain prompt format for one question and answer.

    ``[user q]`` with the generation prompt renders ``[BOS] template.format(question=q)``; ``[user q,
    assistant a]`` renders that followed by ``answer_prefix + a + EOS``: the token sequence
    :class:`~lightning_unlearn.data.formatting.PromptFormatter` builds without a chat template (``bos``: the
    tokenizer prepends BOS to a text). Literal text is wrapped in ``{% raw %}`` so the template's own
    characters cannot be read as Jinja.
    """
    before, after = template.split("{question}", 1)

    def raw(text: str) -> str:
        return "{% raw %}" + text + "{% endraw %}" if text else ""

    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
            + ("{{ bos_token }}" if bos else "") + raw(before) + "{{ message['content'] }}" + raw(after)
            + "{% elif message['role'] == 'assistant' %}" + raw(answer_prefix)
            + "{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def write_tokenizer_shim(tokenizer_dir: Path, dest: Path) -> dict[str, Any]:
    """A tokenizer directory transformers 4.45 reads, scoring the prompts this framework builds.

    Copies ``tokenizer.json`` and writes a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``
    (transformers 5 writes a class name 4.45 does not know) with the special tokens and the chat template
    inlined: the tokenizer's own, or :func:`plain_chat_template`. Returns the config written.

    Raises:
        FileNotFoundError: the directory has no ``tokenizer.json`` (a slow-only tokenizer).
    """
    from transformers import AutoTokenizer

    from lightning_unlearn.data.formatting import DEFAULT_TEMPLATE

    source = tokenizer_dir / "tokenizer.json"
    if not source.is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json: give --tokenizer a fast tokenizer's folder.")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest / "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    original = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()) if (
        tokenizer_dir / "tokenizer_config.json").is_file() else {}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "model_max_length": original.get("model_max_length", tok.model_max_length)}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(tok, key, None) is not None:
            config[key] = _token_text(getattr(tok, key))
    if getattr(tok, "chat_template", None):
        config["chat_template"] = tok.chat_template
    else:
        with_special = tok("x", add_special_tokens=True)["input_ids"]
        bos = tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id]
        config["chat_template"] = plain_chat_template(DEFAULT_TEMPLATE, " ", bos)
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return config


def write_model_shim(model_dir: Path, dest: Path) -> None:
    """A model directory transformers 4.45 loads in float32: the weights linked, ``config.json`` rewritten.

    transformers 5 writes ``dtype`` and ``rope_parameters`` where 4.45 reads ``torch_dtype`` and
    ``rope_theta``/``rope_scaling``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    rope = config.pop("rope_parameters", None)
    if isinstance(rope, dict):
        config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = rope
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for path in model_dir.iterdir():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            link = dest / path.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(path.resolve())
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, dest / "generation_config.json")


def write_config_shim(ou: Path, dest: Path, data_dir: Path, model: Path, tokenizer: Path) -> Path:
    """A copy of open-unlearning's ``configs/`` reading TOFU from local files, plus ``model/bench_model.yaml``.

    Each ``TOFU_*`` dataset config's ``path: "locuslab/TOFU"`` becomes ``path: json`` with ``data_files:
    <data_dir>/${.name}.jsonl`` (the sibling ``name``, which the metric configs override per split).

    Raises:
        ValueError: a TOFU dataset config no longer has the ``path: "locuslab/TOFU"`` line to replace.
    """
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ou / "configs", dest)
    for path in sorted((dest / "data" / "datasets").glob("TOFU_*.yaml")):
        text = path.read_text()
        new, count = re.subn(r'^([ \t]*)path: "?locuslab/TOFU"?[ \t]*$',
                             lambda m: f"{m.group(1)}path: json\n{m.group(1)}data_files: {data_dir}/${{.name}}.jsonl",
                             text, flags=re.M)
        if count == 0:
            raise ValueError(f"{path.name} in {ou}/configs has no `path: \"locuslab/TOFU\"` line: this script's "
                             "dataset patch does not fit that version of open-unlearning.")
        path.write_text(new)
    (dest / "model" / "bench_model.yaml").write_text(
        "model_args:\n"
        f"  pretrained_model_name_or_path: {model}\n"
        "  torch_dtype: float32\n"
        "  device_map: cpu\n"
        "tokenizer_args:\n"
        f"  pretrained_model_name_or_path: {tokenizer}\n"
        "template_args:\n"
        "  apply_chat_template: True\n"
        "  system_prompt: null\n"
        "  date_string: null\n")
    return dest


def warm_dataset_cache(ou_python: str, data_dir: Path, splits: list[str], env: dict[str, str]) -> None:
    """Build the ``datasets`` cache of each split once, untimed, so no round pays for converting the JSON."""
    code = ("import sys, datasets\n"
            "for s in sys.argv[2:]:\n"
            "    datasets.load_dataset('json', name=s, data_files=f'{sys.argv[1]}/{s}.jsonl', split='train')\n")
    subprocess.run([ou_python, "-c", code, str(data_dir), *splits], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------- commands


def ou_command(ou_python: str, configs: Path, out: Path, forget: str, holdout: str, batch: int | None,
               max_new_tokens: int) -> list[str]:
    """open-unlearning's TOFU evaluation (``src/eval.py``), as its ``eval/tofu/default`` experiment sets it up."""
    command = [ou_python, "src/eval.py", "--config-path", str(configs), "--config-name", "eval.yaml",
               "model=bench_model", "eval=tofu", "task_name=bench", f"paths.output_dir={out}",
               f"eval.tofu.forget_split={forget}", f"eval.tofu.holdout_split={holdout}",
               "eval.tofu.retain_logs_path=null", "eval.tofu.overwrite=true", "model.model_args.device_map=cpu"]
    if max_new_tokens != 200:  # its configs/generation/default.yaml's value
        command += [f"eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens={max_new_tokens}"] + [
            f"eval.tofu.metrics.model_utility.pre_compute.{s}_Q_A_ROUGE.generation_args.max_new_tokens={max_new_tokens}"
            for s in ("retain", "ra", "wf")]
    if batch:
        command.append(f"eval.tofu.batch_size={batch}")
    return command


def ours_command(python: str, model: Path, out: Path, forget: str, holdout: str, data: str, batch: int | None,
                 max_new_tokens: int, offset: bool = False) -> list[str]:
    """This framework's ``main.py test`` of one model (``offset``: that model as large, small and reference)."""
    module = (["--model", "NPO", "--model.large_model", str(model), "--model.small_model", str(model),
               "--model.large_dtype", "float32"] if offset else ["--model", "SFT", "--model.small_model", str(model)])
    command = [python, "main.py", "test", *module, "--model.max_new_tokens", str(max_new_tokens),
               "--data.forget_split", forget, "--data.retain_split", "null", "--data.eval_holdout_split", holdout,
               "--data.dataset", data, "--data.evaluation", "tofu", "--seed_everything", "0",
               "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.default_root_dir", str(out), "--verbose", "false"]
    if batch:
        command += ["--data.eval_batch_size", str(batch)]
    return command


# ---------------------------------------------------------------- agreement


def _numbers(entry: Any) -> dict[str, float]:
    if isinstance(entry, dict):
        return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return {"value": float(entry)}
    return {}


def agreement(ou: dict[str, Any], ours: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric both reports hold: both aggregates, the largest per-sample difference, differing generations.

    A per-sample difference is taken over every index and numeric field both sides report (NaN on both
    sides counts as equal, NaN on one side as an infinite difference); ``max_scaled_diff`` divides each by
    ``max(1, |value|)`` (relative for values above 1, such as truth ratios in the thousands, where float32
    agreement to 1e-5 absolute is not possible); ``generations`` counts indices whose ``generation`` text
    differs, of those both report.
    """
    rows = []
    for key in sorted(set(ou) & set(ours)):
        a, b = ou[key], ours[key]
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        agg_a, agg_b = a.get("agg_value"), b.get("agg_value")
        by_a, by_b = a.get("value_by_index") or {}, b.get("value_by_index") or {}
        common = sorted(set(by_a) & set(by_b), key=lambda s: int(s) if s.isdigit() else s)
        worst, scaled, fields, differing, texts = 0.0, 0.0, set(), 0, 0
        for index in common:
            na, nb = _numbers(by_a[index]), _numbers(by_b[index])
            for field in set(na) & set(nb):
                fields.add(field)
                x, y = na[field], nb[field]
                if math.isnan(x) and math.isnan(y):
                    continue
                diff = math.inf if math.isnan(x) or math.isnan(y) else abs(x - y)
                worst, scaled = max(worst, diff), max(scaled, diff / max(1.0, abs(x), abs(y)))
            ga = by_a[index].get("generation") if isinstance(by_a[index], dict) else None
            gb = by_b[index].get("generation") if isinstance(by_b[index], dict) else None
            if ga is not None and gb is not None:
                texts += 1
                differing += ga != gb
        rows.append({"metric": key, "ou": agg_a, "ours": agg_b, "samples": len(common),
                     "only_ou": len(set(by_a) - set(by_b)), "only_ours": len(set(by_b) - set(by_a)),
                     "fields": sorted(fields), "max_abs_diff": worst if fields else None,
                     "max_scaled_diff": scaled if fields else None,
                     "generations": f"{differing}/{texts}" if texts else ""})
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return "(per-part)"
    return "-" if value is None else str(value)


def print_agreement(rows: list[dict[str, Any]], only_ou: list[str], only_ours: list[str], tolerance: float) -> bool:
    """Print the table; return whether every per-sample value agrees within ``tolerance`` (scaled by
    ``max(1, |value|)``, see :func:`agreement`) and every generation is the same text."""
    print(f"\n{'metric':28s} {'open-unlearning':>16s} {'this framework':>16s} {'samples':>7s} {'max |diff|':>11s} "
          f"{'scaled':>11s} {'gen. differ':>11s}  fields")
    ok = True
    for r in rows:
        diff = r["max_scaled_diff"]
        texts_differ = bool(r["generations"]) and not r["generations"].startswith("0/")
        bad = (diff is not None and not diff <= tolerance) or texts_differ
        ok &= not bad
        print(f"{r['metric']:28s} {_fmt(r['ou']):>16s} {_fmt(r['ours']):>16s} {r['samples']:>7d} "
              f"{_fmt(r['max_abs_diff']):>11s} {_fmt(diff):>11s} {r['generations']:>11s}  {','.join(r['fields'])}"
              f"{'  <-- differs' if bad else ''}")
    print(f"only in open-unlearning's report: {', '.join(only_ou) or 'none'}")
    print(f"only in this framework's report: {', '.join(only_ours) or 'none'}")
    return ok


PROB_SPLITS = {"forget_Q_A_Prob": "{forget}_perturbed", "retain_Q_A_Prob": "retain_perturbed",
               "ra_Q_A_Prob": "real_authors_perturbed", "wf_Q_A_Prob": "world_facts_perturbed"}
"""The file each answer-probability metric reads its question/answer rows from (same rows, same order on both
sides; ``forget{NN}_perturbed`` repeats ``forget{NN}``'s questions and answers)."""


def exact_probabilities(model_dir: Path, data_dir: Path, forget: str, ou: dict[str, Any], ours: dict[str, Any],
                        per_metric: int = 2) -> list[tuple[str, str, float, float, float]]:
    """The answer probabilities the two sides disagree on most, recomputed in float64 (batch of 1).

    For each ``*_Q_A_Prob`` metric, the ``per_metric`` samples with the largest difference: ``exp(-mean
    NLL)`` over the answer tokens (TOFU's normalised probability) from the model's float32 logits cast to
    float64, on this framework's token ids (which the shim makes open-unlearning's too). Tells which side
    carries the numerical error. Returns ``(metric, index, open-unlearning, this framework, float64)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_unlearn.data.formatting import PromptFormatter
    from lightning_unlearn.data.sources import load_split

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    formatter = PromptFormatter(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for metric, split in PROB_SPLITS.items():
        if metric not in ou or metric not in ours:
            continue
        a, b = ou[metric]["value_by_index"], ours[metric]["value_by_index"]
        worst = sorted(set(a) & set(b), key=lambda i: -abs(a[i]["prob"] - b[i]["prob"]))[:per_metric]
        rows = load_split(str(data_dir), split.format(forget=forget))
        for index in worst:
            encoded = formatter.encode(rows[int(index)]["question"], rows[int(index)]["answer"])
            with torch.no_grad():
                logits = model(torch.tensor([encoded.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(encoded.labels[1:])
            keep = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep]).item()
            out.append((metric, index, a[index]["prob"], b[index]["prob"], math.exp(-nll)))
    return out


def compare_round(folder: Path, model: Path, data: Path, forget: str, tolerance: float,
                  offset: bool, others: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], bool]:
    """Print the agreement of one round's reports (``folder/{ou,ours,offset,<others>}/TOFU_EVAL.json``).

    Returns the table's rows and whether everything agrees; on disagreement also prints the largest
    answer-probability differences against float64 (:func:`exact_probabilities`). ``others`` (this framework at
    other batch sizes) and offset mode are compared with ``ours``: the same generations, and every value within
    ``tolerance`` (``ok`` covers the ``others``).
    """
    ou_report = json.loads((folder / "ou" / "TOFU_EVAL.json").read_text())
    ours_report = json.loads((folder / "ours" / "TOFU_EVAL.json").read_text())
    rows = agreement(ou_report, ours_report)
    ok = print_agreement(rows, sorted(set(ou_report) - set(ours_report)), sorted(set(ours_report) - set(ou_report)),
                         tolerance)
    if not ok:
        print("\nlargest answer-probability differences against float64 (batch of 1, same tokens):")
        print(f"{'metric':18s} {'index':>5s} {'open-unlearning':>16s} {'this framework':>16s} {'float64':>16s} "
              f"{'|OU - f64|':>11s} {'|ours - f64|':>12s}")
        for metric, index, a, b, exact in exact_probabilities(model, data, forget, ou_report, ours_report):
            print(f"{metric:18s} {index:>5s} {a:16.9f} {b:16.9f} {exact:16.9f} {abs(a - exact):11.2e} "
                  f"{abs(b - exact):12.2e}")
    if offset:
        offset_report = json.loads((folder / "offset" / "TOFU_EVAL.json").read_text())
        same = agreement(ours_report, offset_report)
        worst = max((r["max_abs_diff"] or 0.0) for r in same)
        gens = sum(int(r["generations"].split("/")[0]) for r in same if r["generations"])
        print(f"offset (zero offset) vs direct: max per-sample |diff| {worst:.3g}, {gens} differing generations")
    for other in others:
        same = agreement(ours_report, json.loads((folder / other / "TOFU_EVAL.json").read_text()))
        scaled = max((r["max_scaled_diff"] or 0.0) for r in same)
        gens = sum(int(r["generations"].split("/")[0]) for r in same if r["generations"])
        ok &= scaled <= tolerance and gens == 0
        print(f"{other} vs ours: max per-sample scaled |diff| {scaled:.3g}, {gens} differing generations")
    return rows, ok


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ou", type=Path, required=True, help="local clone of locuslab/open-unlearning")
    parser.add_argument("--ou-python", default=None,
                        help="its environment's python (default: OU/.venv-ou/bin/python, see open_unlearning_env.sh)")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory (with its tokenizer)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--data", type=Path, default=ROOT / "lightning_unlearn" / "data" / "tofu",
                        help="folder of TOFU <split>.jsonl files (default: the bundled copy)")
    parser.add_argument("--forget-split", default="forget01")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--ou-batch-size", type=int, default=None, help="eval.tofu.batch_size (default: its 32)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="this framework's data.eval_batch_size (default: the data module's)")
    parser.add_argument("--also-batch-size", type=int, nargs="*", default=[],
                        help="also time this framework at these data.eval_batch_size values in the same rounds "
                             "(e.g. the old default, 8), each against the same open-unlearning runs")
    parser.add_argument("--offset", action="store_true", help="also time offset mode (the model thrice, zero offset)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest per-sample difference counted equal (relative for values above 1)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_ou", help="shims, logs and reports")
    parser.add_argument("--python", default=sys.executable, help="python of this framework's environment")
    parser.add_argument("--compare-only", action="store_true",
                        help="run nothing: print the agreement of the last round already in --work")
    args = parser.parse_args(argv)

    ou = args.ou.resolve()
    ou_python = args.ou_python or str(ou / ".venv-ou" / "bin" / "python")
    if not (ou / "src" / "eval.py").is_file():
        parser.error(f"--ou {ou} has no src/eval.py: give a clone of locuslab/open-unlearning.")
    if not Path(ou_python).is_file():
        parser.error(f"{ou_python} does not exist: run benchmarks/open_unlearning_env.sh {ou} (or give --ou-python).")
    model, data = args.model.resolve(), args.data.resolve()
    if not (model / "config.json").is_file():
        parser.error(f"--model {model} has no config.json.")
    digits = re.search(r"(\d+)", args.forget_split)
    holdout = f"holdout{digits.group(1)}" if digits else parser.error("--forget-split needs a number (forget01).")
    splits = [args.forget_split, f"{args.forget_split}_perturbed", "retain_perturbed", "real_authors_perturbed",
              "world_facts_perturbed", holdout]
    missing = [s for s in splits if not (data / f"{s}.jsonl").is_file()]
    if missing:
        parser.error(f"--data {data} lacks {', '.join(s + '.jsonl' for s in missing)}.")

    work = args.work.resolve()
    if args.compare_only:
        _, ok = compare_round(work / f"round{args.rounds - 1}", model, data, args.forget_split, args.tolerance,
                              args.offset, tuple(f"ours@{b}" for b in args.also_batch_size))
        return 0 if ok else 1
    shims = work / "ou_shims"
    start = time.perf_counter()
    tok_config = write_tokenizer_shim((args.tokenizer or model).resolve(), shims / "tokenizer")
    write_model_shim(model, shims / "model")
    configs = write_config_shim(ou, shims / "configs", data, shims / "model", shims / "tokenizer")
    ou_env = one_thread_env({"HF_DATASETS_CACHE": str(work / "hf_datasets"), "HYDRA_FULL_ERROR": "1"})
    warm_dataset_cache(ou_python, data, splits, ou_env)
    ours_env = one_thread_env({"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    print(f"shims in {shims} ({time.perf_counter() - start:.1f} s); chat template given to open-unlearning:\n  "
          f"{tok_config['chat_template']!r}")
    print(f"model {model}; suite {args.forget_split} ({SUITE_SIZES_NOTE if args.forget_split == 'forget01' else ''}); "
          f"greedy, max {args.max_new_tokens} new tokens; 1 thread each; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")

    extra = {f"ours@{b}": b for b in args.also_batch_size}
    kinds = ["ou", "ours", *extra] + (["offset"] if args.offset else [])
    runs: dict[str, list[Run]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            out = work / f"round{r}" / kind
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            if kind == "ou":
                command = ou_command(ou_python, configs, out, args.forget_split, holdout, args.ou_batch_size,
                                     args.max_new_tokens)
                run = timed("open-unlearning", command, ou, ou_env, out / "log.txt")
            else:
                command = ours_command(args.python, model, out, args.forget_split, holdout, str(data),
                                       extra.get(kind, args.batch_size), args.max_new_tokens, offset=kind == "offset")
                run = timed(kind, command, ROOT, ours_env, out / "log.txt")
            runs[kind].append(run)
            print(f"round {r + 1}/{args.rounds} {run.label:16s} wall {run.wall_s:7.1f} s  cpu {run.cpu_s:7.1f} s  "
                  f"peak RSS {run.peak_mib:7.0f} MiB  (load {os.getloadavg()[0]:.1f})", flush=True)

    med = {k: {f: statistics.median(getattr(x, f) for x in v) for f in ("wall_s", "cpu_s", "peak_mib")}
           for k, v in runs.items()}
    print(f"\n{'':36s} {'median wall s':>14s} {'median cpu s':>13s} {'peak RSS MiB':>13s}")
    default = "default batch" if args.batch_size is None else f"batch {args.batch_size}"
    names = {"ou": "open-unlearning (its default batch)" if args.ou_batch_size is None else
             f"open-unlearning (batch {args.ou_batch_size})", "ours": f"this framework ({default})",
             "offset": "offset (3 models)", **{k: f"this framework (batch {b})" for k, b in extra.items()}}
    for k in kinds:
        print(f"{names[k]:36s} {med[k]['wall_s']:14.1f} {med[k]['cpu_s']:13.1f} {med[k]['peak_mib']:13.0f}")
    for k in ["ours", *extra]:
        walls = [o.wall_s / m.wall_s for o, m in zip(runs["ou"], runs[k])]
        cpus = [o.cpu_s / m.cpu_s for o, m in zip(runs["ou"], runs[k])]
        print(f"speed-up open-unlearning / {names[k]}: median wall ratio {med['ou']['wall_s'] / med[k]['wall_s']:.2f}x "
              f"(per round {', '.join(f'{x:.2f}' for x in walls)}), median CPU ratio "
              f"{med['ou']['cpu_s'] / med[k]['cpu_s']:.2f}x (per round {', '.join(f'{x:.2f}' for x in cpus)})")
    if args.offset:
        print(f"offset mode / direct: wall {med['offset']['wall_s'] / med['ours']['wall_s']:.2f}x, CPU "
              f"{med['offset']['cpu_s'] / med['ours']['cpu_s']:.2f}x (three models' forward passes vs one: 3x "
              "would be no sharing of the rest)")

    rows, ok = compare_round(work / f"round{args.rounds - 1}", model, data, args.forget_split, args.tolerance,
                             args.offset, tuple(extra))
    summary = {"model": str(model), "forget_split": args.forget_split, "max_new_tokens": args.max_new_tokens,
               "runs": {k: [vars(x) for x in v] for k, v in runs.items()}, "median": med,
               "median_wall_ratio": med["ou"]["wall_s"] / med["ours"]["wall_s"],
               "median_cpu_ratio": med["ou"]["cpu_s"] / med["ours"]["cpu_s"],
               "batch_size": args.batch_size, "also_batch_size": args.also_batch_size, "agreement": rows,
               "identical_within_tolerance": ok}
    (work / "SUMMARY.json").write_text(json.dumps(summary, indent=2))
    print(f"\nper-sample agreement within {args.tolerance:g} (relative above 1) and identical generations: "
          f"{'yes' if ok else 'NO'}; "
          f"summary in {work / 'SUMMARY.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
