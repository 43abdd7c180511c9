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

OFFSET_MANIFEST = "offset.json"
ADAPTER_CONFIG = "adapter_config.json"
COMPOSITION_MANIFEST = "composition.json"

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

    In direct mode ``offsets`` holds the single exported model and its alpha is not used: there is no
    offset to scale, the export *is* the model.
    """

    offsets: tuple[Offset, ...]
    large_model: str | None = None
    reference_model: str | None = None
    relative_top: float = 0.0

    @property
    def is_direct(self) -> bool:
        return self.large_model is None

    @property
    def alphas(self) -> list[float]:
        return [o.alpha for o in self.offsets]

    def with_alphas(self, alphas: Sequence[float]) -> Composition:
        """The same models with new strengths (one per offset), e.g. to weigh requests differently."""
        if self.is_direct:
            raise ValueError("A directly unlearned model has no offset to scale: alphas apply to offset exports only.")
        if len(alphas) != len(self.offsets):
            raise ValueError(f"Got {len(alphas)} alphas for {len(self.offsets)} offsets "
                             f"({[o.path for o in self.offsets]}): give one alpha per offset.")
        return replace(self, offsets=tuple(replace(o, alpha=float(a)) for o, a in zip(self.offsets, alphas)))

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
        Offset(str(path.parent / o["path"]) if not os.path.isabs(o["path"]) else o["path"], float(o["alpha"]),
               o.get("method"), o.get("adapter"))
        for o in data["offsets"]
    )
    if not offsets:
        raise ValueError(f"{path} lists no offsets.")
    return Composition(offsets, data["large_model"], data["reference_model"], float(data.get("relative_top", 0.0)))


def read_export(path: PathLike) -> Composition:
    """Describe one export: an offset directory, a direct directory, or a composition manifest."""
    path = Path(path)
    if path.is_file():
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
        return Composition((Offset(str(path), float(data["alpha"]), data.get("method"), data.get("adapter")),),
                           data["large_model"], data["reference_model"], float(data.get("relative_top", 0.0)))
    if (path / "config.json").is_file():
        return Composition((Offset(str(path), 1.0, None),))
    if (path / ADAPTER_CONFIG).is_file():
        return Composition((Offset(str(path), 1.0, None, "lora"),))
    raise ValueError(f"{str(path)!r} holds neither a model (config.json), a LoRA adapter ({ADAPTER_CONFIG}), an "
                     f"{OFFSET_MANIFEST} nor a {COMPOSITION_MANIFEST}.")


def compose(paths: PathLike | Sequence[PathLike], alphas: Sequence[float] | None = None) -> Composition:
    """Combine exports (and compositions) into one composition, refusing offsets that do not add up.

    ``alphas``, if given, replace the manifests' strengths, one per offset in order (a composition
    manifest contributes all the offsets it lists).
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
    composed = Composition(tuple(o for _, c in parts for o in c.offsets), first.large_model, first.reference_model,
                           first.relative_top)
    return composed if alphas is None else composed.with_alphas(alphas)
