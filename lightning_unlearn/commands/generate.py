"""Answer questions with an unlearned model: ``lightning-unlearn generate EXPORT [EXPORT ...]``.

Each EXPORT is a directory written by ``fit`` with ``model.export_dir`` set or by ``lightning-unlearn export``
(or a ``composition.json``); several offset exports trained against the same large model and reference are composed,
``z_L + sum_i alpha_i (z_S_i - z_S0)``. Questions come from ``--prompt`` (repeatable) or, without it,
one per line on standard input. Answers are greedy, one per question, in order: plain text, one per
line (newlines inside an answer are kept), or JSON lines with ``--jsonl``. An answer ends at the first
stop token, as in training and evaluation: ``eos_token``, any ``eos_token_id`` of the models'
``generation_config.json``, or the chat template's end-of-turn token (``<|eot_id|>``, ``<end_of_turn>``...).

    lightning-unlearn generate runs/npo_request1 runs/npo_request2 \\
        --prompt "Where was Basil Mahfouz Al-Kuwaiti born?" --max-new-tokens 64

This is a small argparse tool rather than a LightningCLI ``predict`` subcommand: answering prompts needs
no trainer, data module or config, only the exported directories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ..data.formatting import DEFAULT_TEMPLATE
from ..numbers import finite_float
from ..deploy.manifest import compose
from ..deploy.unlearned import UnlearnedModel
from ..models.files import looks_local
from ..offset.vllm_client import ServerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="export directories (model.export_dir) or composition.json files")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a question to answer (repeatable); without it, questions are read from stdin")
    parser.add_argument("--alpha", type=finite_float, nargs="+", default=None,
                        help="offset strengths, one per offset (default: those recorded at training time)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--large-model", default=None,
                        help="the large model's path or id, if it moved, or a vLLM server's http://HOST:PORT/v1")
    parser.add_argument("--large-logprobs", type=int, default=None,
                        help="with a served large model: top-k log-probabilities per step (default: the whole "
                             "vocabulary, exact)")
    parser.add_argument("--reference-model", default=None, help="the reference model's path or id, if it moved")
    parser.add_argument("--large-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the dtype the export was trained in (offset.json), else bfloat16")
    parser.add_argument("--small-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the dtype the export was trained in (offset.json or config.json), else float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                        help="plain prompt template used in training (data.template), without a chat template")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="use --template even if the tokenizer has a chat template")
    parser.add_argument("--jsonl", action="store_true", help='print {"prompt": ..., "answer": ...} per line')
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def check_named_models(exports: Sequence[str], large_model: str | None, reference_model: str | None) -> None:
    """Refuse, before loading anything, exports whose large or reference model (as ``offset.json`` names it, or as
    ``--large-model``/``--reference-model`` give it) is a local path with nothing at it: loading would report a
    tokenizer that cannot be loaded, or look the path up on the hub.

    Raises:
        FileNotFoundError: naming the model, the export and the flag that gives its new place.
        ValueError, OSError: the exports themselves do not read (:func:`~lightning_unlearn.deploy.manifest.compose`).
    """
    composition = compose(list(exports))
    for name, given, flag in (("large model", large_model, "--large-model"),
                              ("reference model", reference_model, "--reference-model")):
        path = given or getattr(composition, name.replace(" ", "_"))
        if path is None or os.path.exists(path) or not looks_local(path):
            continue
        source = f"{flag} gives" if given else f"{' + '.join(exports)} names (offset.json)"
        raise FileNotFoundError(f"The {name} that {source} is {path!r}, and nothing is there (from {os.getcwd()}): "
                                f"pass where it is now with {flag} PATH.")


def read_prompts(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    """Questions from ``--prompt``, else the non-empty lines of standard input."""
    if args.prompt:
        return list(args.prompt)
    return [line.strip() for line in stdin if line.strip()]


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[str]:
    """Run the tool; ``argv``/``stdin``/``stdout`` let tests drive it in-process. Returns the answers."""
    args = build_parser().parse_args(argv)
    stdout = stdout or sys.stdout
    prompts = read_prompts(args, stdin or sys.stdin)
    if not prompts:
        raise SystemExit("No question given: pass --prompt or write questions on standard input, one per line.")
    try:
        check_named_models(args.exports, args.large_model, args.reference_model)
        model = UnlearnedModel.from_export(
            args.exports, args.alpha, large_model=args.large_model, reference_model=args.reference_model,
            large_dtype=args.large_dtype, small_dtype=args.small_dtype, device=args.device, template=args.template,
            use_chat_template=False if args.no_chat_template else None, trust_remote_code=args.trust_remote_code,
            large_logprobs=args.large_logprobs,
        )
    except (OSError, ValueError, ServerError) as err:  # a wrong path or mismatched manifests: the message says what to fix
        raise SystemExit(f"error: {err}") from err
    try:
        answers = model.generate(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    except ServerError as err:  # a served large model that stopped answering: the message names it
        raise SystemExit(f"error: {err}") from err
    for prompt, answer in zip(prompts, answers):
        print(json.dumps({"prompt": prompt, "answer": answer}) if args.jsonl else answer, file=stdout)
    return answers


if __name__ == "__main__":
    main()
