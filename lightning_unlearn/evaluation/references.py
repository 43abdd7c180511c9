"""Forget-quality references: the published ``TOFU_EVAL.json`` of open-unlearning's retain models, cached.

open-unlearning publishes the evaluation logs of its TOFU retain models in the hub dataset ``open-unlearning/eval``
as ``tofu_<model>_<retain split>/TOFU_EVAL.json`` (their ``setup_data.py --eval_logs`` downloads the same files).
Forget quality is a KS test against the retain model's forget truth ratios, so these files stand in for
evaluating the retain model yourself. ``fetch`` downloads one once into a cache folder; afterwards it is read
from there, offline:

    python -m lightning_unlearn.evaluation.references Llama-3.2-1B-Instruct --split retain90
    python -m lightning_unlearn.evaluation.references Llama-3.2-1B-Instruct --from PATH/TOFU_EVAL.json  # a copy

Each prints the cached path, the value for ``--model.retain_reference``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..atomic import atomic_write
from .tofu import RetainReference

REPOSITORY = "open-unlearning/eval"
DEFAULT_CACHE = Path("runs/references")
RETAIN_SPLITS = ("retain90", "retain95", "retain99")


class ReferenceUnavailable(RuntimeError):
    """A reference log is neither cached nor downloadable; the message says how to provide it."""


def reference_file(model: str, split: str) -> str:
    """Path of a retain model's log inside the ``open-unlearning/eval`` dataset.

    Raises:
        ValueError: ``split`` is not a TOFU retain split.
    """
    if split not in RETAIN_SPLITS:
        raise ValueError(f"split {split!r} is not a TOFU retain split; use one of {RETAIN_SPLITS}.")
    return f"tofu_{model}_{split}/TOFU_EVAL.json"


def cached_path(model: str, split: str, cache: str | Path = DEFAULT_CACHE) -> Path:
    """Where the log of ``model``'s retain model on ``split`` is cached."""
    return Path(cache) / reference_file(model, split)


def _hub_download(filename: str, target_dir: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(REPOSITORY, filename, repo_type="dataset", local_dir=target_dir)


def _install(source: Path, target: Path) -> Path:
    """Check ``source`` is a retain log (it parses as one) and copy it to ``target`` atomically."""
    RetainReference.from_file(source)
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def fetch(model: str, split: str = "retain90", cache: str | Path = DEFAULT_CACHE, source: str | Path | None = None,
          download: Callable[[str, str], str] = _hub_download) -> Path:
    """The cached ``TOFU_EVAL.json`` of a retain model, downloaded (or copied from ``source``) on first use.

    Args:
        model: open-unlearning's model name, e.g. ``Llama-3.2-1B-Instruct`` or ``Llama-2-7b-chat-hf``.
        split: the retain split the model was trained on (``retain90`` pairs with forget10).
        cache: cache folder; the file lands in ``<cache>/tofu_<model>_<split>/TOFU_EVAL.json``.
        source: a local copy of the log to cache instead of downloading.
        download: ``(filename in the dataset, folder) -> local path``; the hub by default.

    Raises:
        ReferenceUnavailable: not cached and the download failed (offline, unknown model); the message
            names the file and the two ways to provide it.
        ValueError: the file is not a TOFU evaluation log.
    """
    target = cached_path(model, split, cache)
    if source is not None:
        return _install(Path(source), target)
    if target.is_file():
        return target
    filename = reference_file(model, split)
    with tempfile.TemporaryDirectory(dir=Path(cache).parent if Path(cache).parent.exists() else None) as tmp:
        try:
            downloaded = Path(download(filename, tmp))
        except Exception as err:  # (offline, missing file, no access: one message for all)
            raise ReferenceUnavailable(
                f"Cannot fetch {filename} from the hub dataset {REPOSITORY} ({type(err).__name__}: {err}). "
                f"On a machine with network access run this command again (the file is cached in {target} and "
                f"read offline afterwards), or copy the file there: "
                f"python -m lightning_unlearn.evaluation.references {model} --split {split} --from PATH. Without "
                f"a published log, evaluate the retain model itself: python main.py test --model SFT "
                f"--model.small_model open-unlearning/tofu_{model}_{split} --data.forget_split forget10 ...") from err
        return _install(downloaded, target)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="open-unlearning model name, e.g. Llama-3.2-1B-Instruct")
    parser.add_argument("--split", default="retain90", choices=RETAIN_SPLITS)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="cache folder")
    parser.add_argument("--from", dest="source", help="cache this local copy of the log instead of downloading")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.model, args.split, args.cache, args.source)
    except ReferenceUnavailable as err:
        raise SystemExit(str(err)) from None
    print(path)
    return path


if __name__ == "__main__":
    main()
