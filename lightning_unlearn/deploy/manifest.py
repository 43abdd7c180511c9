"""What an exported unlearned model *is*: the manifests that name its parts, read, checked and written.

An offset export (``UnlearnModule.export``) holds only the trained small model ``S``; it means something
only beside the large model ``L`` and the frozen reference ``S0`` it was trained against, which its
``offset.json`` names. Several offsets trained against the same ``L`` and ``S0`` (one per deletion
request) compose by adding their offsets: ``z_L + sum_i alpha_i (z_S_i - z_S0)``. A composition is
therefore fully described by ``L``, ``S0`` and a list of (export directory, alpha) pairs, which is what
``composition.json`` records, so a composed model can be handed on and reloaded as one path.

Offsets trained against *different* large or reference models do not add up to anything meaningful
(each ``z_S_i - z_S0`` is a correction of one particular ``L`` measured from one particular ``S0``), so
composing them is refused rather than silently producing a different model.

An export trained with LoRA holds only the adapter (peft's ``adapter_config.json`` and weights): its
``offset.json`` says ``"adapter": "lora"`` and the adapter applies to the reference ``S0``; a direct
LoRA export has no manifest and its ``adapter_config.json`` names the model it applies to.

ULD's exports (:class:`~lightning_unlearn.modules.logit_arithmetic.ULD`) are offsets without a reference and
behind a filter: ``"reference_model": null`` (``z_S0 = 0``) and ``"relative_top": tau`` in ``offset.json``
give ``z_L + keep_tau(z_L) * sum_i alpha_i z_S_i``; they compose with each other (same large model, same tau),
never with referenced offsets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..data.tokenizer import check_tokenizer_files
from ..models.files import (
    ADAPTER_CONFIG, COMPOSITION_MANIFEST, MODEL_CONFIG, OFFSET_MANIFEST, check_adapter_files, check_model_files,
    not_an_export, resolve_beside,
)
from ..numbers import finite, in_range

__all__ = ["ADAPTER_CONFIG", "COMPOSITION_MANIFEST", "OFFSET_MANIFEST", "Composition", "Offset", "check_export_files",
           "compose", "read_export", "same_model"]

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Offset:
    """One trained small model: its export directory, its strength, the loss that trained it, and whether
    the directory is a LoRA adapter (``"lora"``) rather than a whole model."""

    path: str
    alpha: float
    method: str | None = None
    adapter: str | None = None


@dataclass(frozen=True)
class Composition:
    """``z_L + sum_i alpha_i (z_S_i - z_S0)``, or a directly unlearned model when ``large_model`` is None.

    ``reference_model`` None with a large model: no reference term (``z_S0 = 0``, ULD); ``relative_top`` > 0: the
    offsets apply only where the large model's relative-top filter keeps a token (ULD's filter).

    ``large_dtype``/``small_dtype``: the dtypes the exports were trained and evaluated in (``offset.json``; a direct
    export's ``config.json``), so that reloading computes what training measured; ``None`` where no export recorded
    one (exports written before they were recorded), and the loader's default applies.

    In direct mode ``offsets`` holds the single exported model and its alpha is not used: there is no
    offset to scale, the export *is* the model.
    """

    offsets: tuple[Offset, ...]
    large_model: str | None = None
    reference_model: str | None = None
    relative_top: float = 0.0
    large_dtype: str | None = None
    small_dtype: str | None = None

    @property
    def is_direct(self) -> bool:
        return self.large_model is None

    @property
    def alphas(self) -> list[float]:
        return [o.alpha for o in self.offsets]

    def with_alphas(self, alphas: Sequence[float], source: str = "alphas") -> Composition:
        """The same models with new strengths (one per offset), e.g. to weigh requests differently.

        Raises:
            ValueError: a direct model, a count that is not one per offset, or a non-finite alpha (the error names
                ``source``, the option or argument the alphas came from, and the offset).
        """
        if self.is_direct:
            raise ValueError("A directly unlearned model has no offset to scale: alphas apply to offset exports only.")
        if len(alphas) != len(self.offsets):
            raise ValueError(f"Got {len(alphas)} alphas for {len(self.offsets)} offsets "
                             f"({[o.path for o in self.offsets]}): give one alpha per offset.")
        return replace(self, offsets=tuple(replace(o, alpha=finite(a, "alpha", f"{source}, for {o.path}"))
                                           for o, a in zip(self.offsets, alphas)))

    def with_models(self, large_model: str | None = None, reference_model: str | None = None) -> Composition:
        """Point at moved copies of ``L`` or ``S0`` (the manifests keep the names used at training time)."""
        if self.is_direct and (large_model or reference_model):
            raise ValueError("A directly unlearned model uses no large or reference model.")
        return replace(self, large_model=large_model or self.large_model,
                       reference_model=reference_model or self.reference_model)

    def to_json(self) -> dict[str, Any]:
        return {
            "large_model": self.large_model,
            "reference_model": self.reference_model,
            "offsets": [{"path": o.path, "alpha": o.alpha, "method": o.method, "adapter": o.adapter}
                        for o in self.offsets],
            "relative_top": self.relative_top,
            "large_dtype": self.large_dtype,
            "small_dtype": self.small_dtype,
        }

    def save(self, path: PathLike) -> Path:
        """Write ``composition.json`` (into ``path`` if it is a directory or has no ``.json`` suffix).

        Local paths are made absolute so the manifest stays valid wherever it is moved to.
        """
        target = Path(path)
        if target.suffix != ".json":
            target = target / COMPOSITION_MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        absolute = Composition(
            offsets=tuple(replace(o, path=os.path.abspath(o.path)) for o in self.offsets),
            large_model=_absolute_if_local(self.large_model),
            reference_model=_absolute_if_local(self.reference_model),
            relative_top=self.relative_top,
            large_dtype=self.large_dtype,
            small_dtype=self.small_dtype,
        )
        target.write_text(json.dumps(absolute.to_json(), indent=2) + "\n", encoding="utf-8")
        return target


def _absolute_if_local(name: str | None) -> str | None:
    return os.path.abspath(name) if name is not None and os.path.isdir(name) else name


def same_model(first: str | None, second: str | None) -> bool:
    """Whether two manifest entries name the same model: same local folder, or same hub id."""
    if first is None or second is None:
        return first is second
    if os.path.isdir(first) and os.path.isdir(second):
        return os.path.samefile(first, second)
    return first == second


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}.")
    return data


def _read_composition_file(path: Path) -> Composition:
    data = _read_json(path)
    missing = {"large_model", "reference_model", "offsets"} - set(data)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: is it a composition manifest?")
    # Relative offset paths are taken relative to the manifest, so a folder holding both moves as one.
    offsets = tuple(
        Offset(str(path.parent / o["path"]) if not os.path.isabs(o["path"]) else o["path"],
               finite(o.get("alpha"), "alpha", f"offsets[{i}] of {path}"), o.get("method"), o.get("adapter"))
        for i, o in enumerate(data["offsets"])
    )
    if not offsets:
        raise ValueError(f"{path} lists no offsets.")
    for offset in offsets:
        if not os.path.isdir(offset.path):
            raise FileNotFoundError(f"{path} lists the offset export {offset.path!r}, which is not a directory here: "
                                    "move it back, or write the manifest again with the exports where they are now.")
    return Composition(offsets, data["large_model"], data["reference_model"], _relative_top(data, path),
                       data.get("large_dtype"), data.get("small_dtype"))


def _relative_top(data: dict[str, Any], path: Path) -> float:
    """ULD's filter threshold ``tau`` of a manifest: ``[0, 1]`` (0, the default, filters nothing)."""
    return in_range(data.get("relative_top", 0.0), "relative_top", 0.0, 1.0, str(path))


def _saved_dtype(directory: Path) -> str | None:
    """The dtype ``save_pretrained`` recorded in a model folder's ``config.json`` (what it was trained in), if it is
    one the loaders take; else None."""
    try:
        config = json.loads((directory / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def check_export_files(offset: Offset) -> None:
    """Refuse an export folder without the files its loader reads, naming the missing one (weights, adapter weights
    or ``tokenizer.json``), before any model is loaded.

    Raises:
        FileNotFoundError: a file is missing.
    """
    if offset.adapter:
        check_adapter_files(offset.path)
    else:
        check_model_files(offset.path)
    check_tokenizer_files(offset.path)


def read_export(path: PathLike) -> Composition:
    """Describe one export: an offset directory, a direct directory, or a composition manifest; every export's
    files are checked (:func:`check_export_files`).

    Raises:
        FileNotFoundError: no export at ``path``, or a file of one is missing.
        ValueError: a manifest is malformed or holds a non-finite alpha or a ``relative_top`` outside ``[0, 1]``.
    """
    composition = _read_export(Path(path))
    for offset in composition.offsets:
        check_export_files(offset)
    return composition


def _read_export(path: Path) -> Composition:
    if path.is_file():
        if path.suffix != ".json":  # a checkpoint or weights file, not a composition manifest
            raise ValueError(not_an_export(path))
        return _read_composition_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No export at {str(path)!r}: give a directory written by `fit` with "
                                "model.export_dir set, or a composition.json.")
    if (path / COMPOSITION_MANIFEST).is_file():
        return _read_composition_file(path / COMPOSITION_MANIFEST)
    if (path / OFFSET_MANIFEST).is_file():
        data = _read_json(path / OFFSET_MANIFEST)
        missing = {"large_model", "reference_model", "alpha"} - set(data)
        if missing:
            raise ValueError(f"{path / OFFSET_MANIFEST} lacks {sorted(missing)}.")
        manifest = path / OFFSET_MANIFEST
        alpha = finite(data["alpha"], "alpha", str(manifest))
        offset = Offset(str(path), alpha, data.get("method"), data.get("adapter"))
        return Composition((offset,), resolve_beside(data["large_model"], path),
                           resolve_beside(data["reference_model"], path), _relative_top(data, manifest),
                           data.get("large_dtype"), data.get("small_dtype"))
    if (path / MODEL_CONFIG).is_file():
        return Composition((Offset(str(path), 1.0, None),), small_dtype=_saved_dtype(path))
    if (path / ADAPTER_CONFIG).is_file():
        return Composition((Offset(str(path), 1.0, None, "lora"),))
    raise ValueError(not_an_export(path))


def compose(
    paths: PathLike | Sequence[PathLike],
    alphas: Sequence[float] | None = None,
    *,
    large_dtype: str | None = None,
    small_dtype: str | None = None,
    source: str = "alphas",
) -> Composition:
    """Combine exports (and compositions) into one composition, refusing offsets that do not add up.

    ``alphas``, if given, replace the manifests' strengths, one per offset in order (a composition
    manifest contributes all the offsets it lists); ``source`` names where they came from in errors.
    ``large_dtype``/``small_dtype``, if given, replace the dtypes the manifests record.

    Raises:
        ValueError: offsets that do not add up, a non-finite alpha, or exports recording different dtypes
            with no dtype given.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("Give at least one export directory.")
    parts = [(str(p), read_export(p)) for p in paths]
    direct = [p for p, c in parts if c.is_direct]
    if direct and len(parts) > 1:
        raise ValueError(
            f"{direct} {'is a directly unlearned model' if len(direct) == 1 else 'are directly unlearned models'}"
            ": only offset exports (with offset.json) compose; a direct export is a whole model on its own."
        )
    first_path, first = parts[0]
    for path, other in parts[1:]:
        for field in ("large_model", "reference_model"):
            if not same_model(getattr(first, field), getattr(other, field)):
                raise ValueError(
                    f"Cannot compose {first_path!r} and {path!r}: they were trained against different {field}s "
                    f"({getattr(first, field)!r} vs {getattr(other, field)!r}). Offsets add up only when they "
                    "correct the same large model and are measured from the same reference."
                )
        if other.relative_top != first.relative_top:
            raise ValueError(f"Cannot compose {first_path!r} and {path!r}: their offsets are filtered with different "
                             f"relative_top ({first.relative_top} vs {other.relative_top}).")
    dtypes = {field: given or _agreed_dtype(parts, field) for field, given in
              (("large_dtype", large_dtype), ("small_dtype", small_dtype))}
    composed = Composition(tuple(o for _, c in parts for o in c.offsets), first.large_model, first.reference_model,
                           first.relative_top, **dtypes)
    return composed if alphas is None else composed.with_alphas(alphas, source)


def _agreed_dtype(parts: Sequence[tuple[str, Composition]], field: str) -> str | None:
    """The one dtype the exports record for ``field`` (None if none records one); refuses a disagreement, since
    one model (the large one, or the shared reference) can run in only one dtype."""
    recorded = {path: getattr(c, field) for path, c in parts if getattr(c, field) is not None}
    if len(set(recorded.values())) > 1:
        raise ValueError(f"The exports were trained with different {field}s ({recorded}): pass the one to use as "
                         f"{field} (a command's {field} option).")
    return next(iter(recorded.values()), None)
