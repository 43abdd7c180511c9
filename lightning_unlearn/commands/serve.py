"""Serve an unlearned model with vLLM: ``lightning-unlearn serve EXPORT [EXPORT ...] --port PORT [VLLM OPTIONS]``.

Starts vLLM's OpenAI-compatible server (``/v1/completions``, ``/v1/chat/completions`` with the export's chat
template, ``/v1/models``, streaming, sampling parameters, ``logprobs``) whose model is the unlearned one,
``z_L + sum_i alpha_i (z_S_i - z_S0)``, computed inside the engine for every sequence of its batch
(:mod:`lightning_unlearn.deploy.served`). Several offset exports against the same large model and reference are
composed; ``--alphas`` replaces their strengths (fixed for the server's life: a new deletion request is served by
restarting with one more export). The server runs in the foreground, in the environment ``make vllm`` makes
(``.venv-vllm``, or ``$VLLM_PYTHON``), until interrupted.

Any option this command does not know is vLLM's and is passed on (``--dtype``, ``--max-model-len``,
``--max-logprobs``, ``--enforce-eager``, ``--served-model-name``...). Defaults differing from vLLM's: ``--dtype
float32`` (what in-process evaluation computes on a CPU), prefix caching off (as ``make serve``: see
:mod:`lightning_unlearn.offset.vllm_server`), the served name is the exports' folder names joined by ``+``, and
without a GPU the CPU settings the project's servers use (``VLLM_CPU_KVCACHE_SPACE=1`` GiB of KV cache,
``--gpu-memory-utilization 0.2``), unless given. For example::

    lightning-unlearn serve runs/npo_request1 runs/npo_request2 --port 8011
    curl localhost:8011/v1/chat/completions -d '{"model": "npo_request1+npo_request2",
        "messages": [{"role": "user", "content": "Where was Basil Mahfouz Al-Kuwaiti born?"}], "temperature": 0}'
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..deploy.served import plugin_environment, write_serving_folder
from ..numbers import finite_float
from ..offset.vllm_server import default_vllm_python, vllm_missing

CPU_KVCACHE_GIB = "1"
CPU_MEMORY_SHARE = "0.2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s EXPORT [EXPORT ...] [--port PORT] [options] [vLLM options]")
    parser.add_argument("exports", nargs="+", help="offset export directories (model.export_dir) or composition.json")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--alphas", type=finite_float, nargs="+", default=None,
                        help="offset strengths, one per offset (default: those recorded at training time)")
    parser.add_argument("--large-model", default=None, help="the large model's folder, if it moved since training")
    parser.add_argument("--reference-model", default=None, help="the reference model's folder, if it moved")
    parser.add_argument("--serving-dir", default=None,
                        help="where to write the serving folder (default: a temporary one, removed at exit)")
    parser.add_argument("--print-command", action="store_true",
                        help="write the serving folder, print the vLLM command line and exit without starting it")
    return parser


def _has(options: Sequence[str], *names: str) -> bool:
    return any(o == n or o.startswith(n + "=") for o in options for n in names)


def _no_gpu() -> bool:
    return not (Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists())


def vllm_command(python: str | os.PathLike, folder: str | os.PathLike, port: int, host: str, name: str,
                 options: Sequence[str], cpu: bool) -> list[str]:
    """The server's command line: vLLM's OpenAI API server on ``folder`` with this command's defaults where
    ``options`` (vLLM's own, passed through) do not set them."""
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--port", str(port), "--host", host]
    if not _has(options, "--served-model-name"):
        command += ["--served-model-name", name]
    if not _has(options, "--dtype"):
        command += ["--dtype", "float32"]
    if not _has(options, "--enable-prefix-caching", "--no-enable-prefix-caching"):
        command += ["--no-enable-prefix-caching"]
    if cpu and not _has(options, "--gpu-memory-utilization"):
        command += ["--gpu-memory-utilization", CPU_MEMORY_SHARE]
    return command + list(options)


def run_server(command: Sequence[str], env: dict[str, str]) -> int:
    """Run the server in this process's group (so Ctrl-C, or a signal to the group, reaches vLLM's processes too)
    and until it ends; a SIGTERM to this process alone is passed on to it. Returns the server's exit status."""
    process = subprocess.Popen(list(command), env=env)

    def forward(signum: int, frame: object) -> None:
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # vLLM got the same SIGINT from the terminal and is shutting down
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the serving folder, then run vLLM's server in the foreground until it ends; returns its exit status.

    Raises:
        FileNotFoundError: an export or one of its files is missing, or no vLLM environment (``make vllm``).
        ValueError: exports that do not compose, a direct or LoRA export, tokenizers that differ.
    """
    args, options = build_parser().parse_known_args(argv)
    owned = args.serving_dir is None
    folder = Path(args.serving_dir or tempfile.mkdtemp(prefix="lightning-unlearn-serve-")) / "model"
    try:
        folder, composition = write_serving_folder(args.exports, folder, args.alphas, large_model=args.large_model,
                                                   reference_model=args.reference_model)
        name = "+".join(Path(e).resolve().name for e in args.exports)
        cpu = _no_gpu()
        command = vllm_command(default_vllm_python(), folder, args.port, args.host, name, options, cpu)
        env = plugin_environment()
        if cpu:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        reference = "z_S0" if composition.reference_model is not None else "0"
        terms = " ".join(f"{'+' if o.alpha >= 0 else '-'} {abs(o.alpha):g} * (z[{Path(o.path).name}] - {reference})"
                         for o in composition.offsets)
        print(f"serving {name!r}: z_L {terms} (large {composition.large_model}, reference "
              f"{composition.reference_model}) at http://{args.host}:{args.port}/v1", flush=True)
        if args.print_command:
            print(f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} {shlex.join(command)}")
            return 0
        missing = vllm_missing()
        if missing:
            raise FileNotFoundError(f"Cannot serve: {missing}.")
        return run_server(command, env)
    finally:
        if owned and not args.print_command:
            shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
