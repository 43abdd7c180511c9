"""A cache of the frozen models' logits per training sequence, so later epochs run only the trainable model.

In offset mode ``z = z_L + alpha * (z_S - z_S0)``: the large model ``L`` and the reference ``S0`` are
frozen and in eval mode, so ``z_L`` and ``z_S0`` of a given sequence never change. Computed once (the
first time a sequence is seen), they are read back at every later occurrence; then a training step costs
the trainable model's forward and backward plus reading two ``[tokens, vocab]`` arrays.

What is stored, and why
    ``z_L`` and ``z_S0`` separately (not the pre-combined ``z_L - alpha z_S0``): the losses that need a
    reference (NPO, DPO, KL, LLMU) read ``z_L`` itself, and with both stored the module keeps computing
    the identity ``z = z_L + alpha (z_S - z_S0)`` literally, only with ``z_L`` and ``z_S0`` replaced by
    their stored roundings. Alpha is therefore *not* baked into the cache, and changing it (an alpha sweep,
    a second run) reuses the cache instead of discarding it. In direct mode only ``z_S0`` is stored.

The key of a sequence
    a hash of its token ids and attention mask up to its last attended position: trailing padding is cut
    off, so one example has one key whatever batch, pairing (forget, retain, refusal, random answers) or
    padding width it comes in; with right padding (training batches) and causal attention its logits do
    not depend on those. Leading (left) padding stays in the key, since it shifts positions. Only the
    attended positions are stored; padded positions are returned as zeros (their labels are ignored).

Precision (the approximation)
    Logits are stored in ``dtype`` (float16 by default: 11 significant bits, relative rounding error at
    most ``2**-11`` ~ 4.9e-4, absolute ``2**-25`` below 6.1e-5; bfloat16 has 8 bits, ``2**-8`` ~ 3.9e-3,
    and float32's range). A logit of magnitude 20 is off by at most 0.01 in float16, which moves
    log-probabilities by at most about twice that. Every use of a sequence, including the first, reads the rounded values, so training is one
    consistent function. Logits beyond float16's range (65504) are refused with a pointer to bfloat16;
    ``float32`` stores exact values.

Storage
    ``memory``: a dict of CPU tensors (host RAM grows with every new sequence: ``2 * tokens * vocab *
    itemsize`` bytes per sequence, e.g. 150 tokens x 32k vocab x 2 x 2 bytes = 19 MB). ``disk``: one
    append-only file of rows read back through a memory map (``torch.from_file``), plus ``index.jsonl``
    (key, first row, rows) written after the data, so a crash leaves at worst unindexed rows, trimmed on the
    next open. Under DDP each rank caches what it sees, in its own subdirectory.

Invalidation
    The cache holds a fingerprint of everything the stored values depend on (each frozen model's name,
    config, dtype and the content of its files; the tokenizer vocabulary; the data formatting; the storage
    dtype); a cache opened with another fingerprint clears itself. File contents are hashed (SHA-256), since a
    file replaced with the same size and modification time is other weights; the digest is kept in a memo
    beside the cache and reused while the file's size, times, inode and device are unchanged (a change of
    content changes its ``ctime``, which no tool can set back), so a large model is hashed once, not at every
    start. A served model's weights are out of reach: it is identified by *probes*, its log-probabilities of
    a fixed sequence, compared within :data:`PROBE_ATOL` (servers' numerics vary a little between runs), so
    other weights behind the same name and context length clear the cache too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["PROBE_ATOL", "CacheMode", "FrozenLogitCache", "file_digest", "model_fingerprint", "sequence_keys",
           "tokenizer_fingerprint"]

# Not "off" for no cache: YAML 1.1 reads a bare off as false; no cache is null.
CacheMode = Literal["memory", "disk"]
ComputeFn = Callable[[Tensor, Tensor], Sequence[Tensor]]
DATA_FILE, INDEX_FILE, FINGERPRINT_FILE = "logits.bin", "index.jsonl", "fingerprint.json"
PROBE_ATOL = 1e-3
"""Largest difference (nats) between a served model's probe log-probabilities and the stored ones for the
cache to count as the same model's: vLLM 0.32's float32 CPU answers were within 9.5e-7 of the model run
in-process (``benchmarks/served_prefix_cache.py``), while other weights of the same shape differed by 0.55 (the
served-model tests' tiny Llama, seeds 1 and 7). A server whose numerics vary beyond it (e.g. bf16 with
batch-dependent kernels) rebuilds its cache, the safe side."""
RACY_SECONDS = 2.0
"""A memoised digest is trusted only for a file last changed at least this long before it was hashed: a
write within the same tick of a coarse clock could otherwise leave size and times unchanged (git's "racily
clean" rule)."""


def _last_attended(mask_row: Tensor) -> int:
    nonzero = mask_row.nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def sequence_keys(input_ids: Tensor, attention_mask: Tensor) -> list[str]:
    """One key per row: a hash of the ids and mask up to the row's last attended position."""
    ids, mask = input_ids.detach().cpu().to(torch.int64), attention_mask.detach().cpu().to(torch.int8)
    keys = []
    for row_ids, row_mask in zip(ids, mask):
        end = _last_attended(row_mask)
        digest = hashlib.blake2b(row_ids[:end].numpy().tobytes(), digest_size=16)
        digest.update(row_mask[:end].numpy().tobytes())
        keys.append(digest.hexdigest())
    return keys


def _stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def file_digest(path: Path, memo: dict[str, Any] | None = None) -> str:
    """SHA-256 of a file's content, from ``memo`` (``realpath -> {"stat", "sha256", "hashed"}``, updated in
    place) while the file's device, inode, size, ``mtime`` and ``ctime`` are those it was hashed with and it had
    not changed in the :data:`RACY_SECONDS` before; hashed otherwise (about 1 GB/s)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    known = (memo or {}).get(real)
    if known and known["stat"] == _stat_key(stat) and known["hashed"] - stat.st_ctime_ns / 1e9 >= RACY_SECONDS:
        return known["sha256"]
    hashed, digest = time.time(), hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if memo is not None:
        memo[real] = {"stat": _stat_key(stat), "sha256": digest.hexdigest(), "hashed": hashed}
    return digest.hexdigest()


def model_fingerprint(name_or_path: str, model: torch.nn.Module | None = None, dtype: str | None = None,
                      memo_file: str | Path | None = None) -> dict[str, Any]:
    """What identifies a frozen model's weights: name, config, dtype and, for a local folder, every file's name
    and content digest (:func:`file_digest`; size and modification time alone would keep a cache across a
    file replaced with the same size and time). ``memo_file`` (JSON) keeps the digests between runs."""
    out: dict[str, Any] = {"name": name_or_path, "dtype": dtype}
    config = getattr(model, "config", None)
    if config is not None:
        out["config"] = _stable_hash(config.to_dict())
        out["commit"] = getattr(config, "_commit_hash", None)
    if os.path.isdir(name_or_path):
        memo_path = Path(memo_file) if memo_file is not None else None
        memo: dict[str, Any] = {}
        if memo_path is not None and memo_path.exists():
            try:
                memo = json.loads(memo_path.read_text(encoding="utf-8"))
            except ValueError:  # a memo cut short: hash again
                memo = {}
        out["files"] = [[p.name, file_digest(p, memo)] for p in sorted(Path(name_or_path).iterdir()) if p.is_file()]
        if memo_path is not None:  # written whole, then renamed: ranks sharing the folder never read half a memo
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            partial = memo_path.with_name(f"{memo_path.name}.{os.getpid()}")
            partial.write_text(json.dumps(memo), encoding="utf-8")
            os.replace(partial, memo_path)
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id), which decides what every cached id means."""
    return _stable_hash(sorted(tokenizer.get_vocab().items()))


class _MemoryStore:
    """Sequences' logits ``[tokens, K, vocab]`` as CPU tensors in a dict."""

    def __init__(self) -> None:
        self.rows: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor | None:
        return self.rows.get(key)

    def put(self, key: str, value: Tensor) -> None:
        self.rows[key] = value

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.rows.values())

    def close(self) -> None:
        self.rows.clear()


class _DiskStore:
    """Rows ``[K, vocab]`` appended to one file, located by ``index.jsonl``, read through a memory map."""

    def __init__(self, directory: Path, row_shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.directory, self.row_shape, self.dtype = directory, row_shape, dtype
        self.row_numel = row_shape[0] * row_shape[1]
        self.row_bytes = self.row_numel * torch.empty((), dtype=dtype).element_size()
        self.index: dict[str, tuple[int, int]] = {}
        data = directory / DATA_FILE
        stored_rows = data.stat().st_size // self.row_bytes if data.exists() else 0
        if (directory / INDEX_FILE).exists():
            for line in (directory / INDEX_FILE).read_text(encoding="utf-8").splitlines():
                try:
                    key, start, n = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                if start + n <= stored_rows:
                    self.index[key] = (start, n)
        self.rows = max((s + n for s, n in self.index.values()), default=0)
        with open(data, "ab") as f:  # drop rows written after the last indexed ones (an interrupted write)
            f.truncate(self.rows * self.row_bytes)
        (directory / INDEX_FILE).write_text(
            "".join(json.dumps([k, s, n]) + "\n" for k, (s, n) in self.index.items()), encoding="utf-8")
        self._data = open(data, "ab")
        self._index = open(directory / INDEX_FILE, "a", encoding="utf-8")
        self._mapped: Tensor | None = None
        self._mapped_rows = 0

    def get(self, key: str) -> Tensor | None:
        location = self.index.get(key)
        if location is None:
            return None
        start, n = location
        if start + n > self._mapped_rows:
            self._mapped = torch.from_file(str(self.directory / DATA_FILE), shared=False,
                                           size=self.rows * self.row_numel, dtype=self.dtype).view(-1, *self.row_shape)
            self._mapped_rows = self.rows
        return self._mapped[start:start + n]

    def put(self, key: str, value: Tensor) -> None:
        self._data.write(value.contiguous().view(torch.uint8).numpy().tobytes())
        self._data.flush()
        self.index[key] = (self.rows, value.shape[0])
        self._index.write(json.dumps([key, self.rows, value.shape[0]]) + "\n")
        self._index.flush()
        self.rows += value.shape[0]

    def __len__(self) -> int:
        return len(self.index)

    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def close(self) -> None:
        self._data.close()
        self._index.close()
        self._mapped = None


def _clear_directory(directory: Path) -> None:
    """Remove this cache's own files only (never anything else a user keeps in the folder)."""
    for name in (DATA_FILE, INDEX_FILE, FINGERPRINT_FILE):
        (directory / name).unlink(missing_ok=True)


class FrozenLogitCache:
    """Frozen logits per sequence (see the module docstring): ``K`` named ``[tokens, vocab]`` arrays each.

    Args:
        names: what the ``K`` arrays are (e.g. ``("large", "reference")``), part of the fingerprint.
        vocab_size: width of every array.
        mode: ``memory`` or ``disk``.
        directory: folder of the disk cache (created; this process's files only).
        dtype: storage dtype.
        fingerprint: everything the stored values depend on; a disk cache holding another is cleared.
        probes: named lists of log-probabilities a model gave on fixed probe sequences (a served model's
            identity, see the module docstring); a disk cache whose stored probes differ from these by more
            than ``probe_atol`` anywhere, or have another length, is cleared, with a warning saying why.
        probe_atol: see :data:`PROBE_ATOL`.

    Attributes:
        cleared: whether opening the cache removed stored values; ``reason`` says why.
    """

    def __init__(
        self, names: Sequence[str], vocab_size: int, mode: CacheMode = "memory", directory: str | Path | None = None,
        dtype: torch.dtype = torch.float16, fingerprint: Mapping[str, Any] | None = None,
        probes: Mapping[str, Sequence[float]] | None = None, probe_atol: float = PROBE_ATOL,
    ) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"Unknown logit cache mode {mode!r}: use 'memory' or 'disk'.")
        self.names, self.vocab_size, self.mode, self.dtype = tuple(names), vocab_size, mode, dtype
        self.fingerprint = {**(fingerprint or {}), "names": list(self.names), "vocab_size": vocab_size,
                            "dtype": str(dtype), "format": 2}
        self.probes = {k: [float(v) for v in values] for k, values in (probes or {}).items()}
        self.hits = self.misses = 0
        self.cleared = False
        self.reason: str | None = None
        if mode == "memory":
            self.store: _MemoryStore | _DiskStore = _MemoryStore()
            return
        if directory is None:
            raise ValueError("A disk logit cache needs a directory: set model.logit_cache_dir.")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / FINGERPRINT_FILE
        self.reason = self._mismatch(marker, probe_atol)
        if self.reason is not None:
            self.cleared = any((self.directory / n).exists() for n in (DATA_FILE, INDEX_FILE, FINGERPRINT_FILE))
            _clear_directory(self.directory)
            marker.write_text(json.dumps({"fingerprint": self.fingerprint, "probes": self.probes}, sort_keys=True,
                                         indent=1, default=str), encoding="utf-8")
            if self.cleared and self.reason.startswith("the probe"):
                warnings.warn(f"The disk logit cache {self.directory} was cleared: {self.reason}.", stacklevel=2)
        self.store = _DiskStore(self.directory, (len(self.names), vocab_size), dtype)

    def _mismatch(self, marker: Path, atol: float) -> str | None:
        """Why the stored values cannot be reused (``None`` when they can): no marker, another fingerprint, or
        probes of another model."""
        if not marker.exists():
            return "no stored fingerprint"
        try:
            stored = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            return "an unreadable fingerprint file"
        if not isinstance(stored, dict) or stored.get("fingerprint") != json.loads(
                json.dumps(self.fingerprint, sort_keys=True, default=str)):
            return "another fingerprint (models, tokenizer, data formatting or storage dtype changed)"
        old = stored.get("probes") or {}
        for name in sorted(set(old) | set(self.probes)):
            before, now = old.get(name, []), self.probes.get(name, [])
            if len(before) != len(now):
                return f"the probe of {name!r} has {len(now)} values, the stored one {len(before)}"
            gap = max((abs(a - b) for a, b in zip(before, now)), default=0.0)
            if not gap <= atol:  # NaN is a mismatch too
                return (f"the probe log-probabilities of {name!r} differ from the stored ones by {gap:.4g} nats "
                        f"(> {atol:g}): other weights behind the same served name")
        return None

    def __len__(self) -> int:
        return len(self.store)

    def nbytes(self) -> int:
        """Bytes of stored logits."""
        return self.store.nbytes()

    def close(self) -> None:
        self.store.close()

    def _round(self, values: Sequence[Tensor], row: int, positions: Tensor) -> Tensor:
        stacked = torch.stack([v[row, positions] for v in values], dim=1).to("cpu", self.dtype)
        if not bool(torch.isfinite(stacked).all()):
            raise ValueError(
                f"A frozen logit is beyond the range of the logit cache's {self.dtype}: use "
                "model.logit_cache_dtype bfloat16 (float32 range) or float32.")
        return stacked

    def rows(self, input_ids: Tensor, attention_mask: Tensor, compute: ComputeFn) -> list[Tensor]:
        """Each batch row's stored ``[attended positions, K, vocab]`` values (in the storage dtype); ``compute``
        runs on the unseen rows only.

        ``compute(input_ids, attention_mask)`` gets the unseen rows (each distinct sequence once), cut to
        their longest attended length, and returns ``K`` arrays ``[rows, length, >= vocab]``.
        """
        keys = sequence_keys(input_ids, attention_mask)
        mask = attention_mask.detach().bool().cpu()
        found: dict[str, Tensor] = {}
        unseen: list[int] = []
        pending: set[str] = set()
        for row, key in enumerate(keys):
            if key in found or key in pending:
                continue
            value = self.store.get(key)
            if value is None:
                unseen.append(row)
                pending.add(key)
            else:
                found[key] = value
        self.hits += len(keys) - len(unseen)
        self.misses += len(unseen)
        if unseen:
            length = max(_last_attended(mask[r]) for r in unseen)
            index = torch.tensor(unseen, device=input_ids.device)
            values = [v[..., : self.vocab_size] for v in compute(input_ids[index, :length], attention_mask[index, :length])]
            for j, row in enumerate(unseen):
                rounded = self._round(values, j, mask[row, :length].nonzero().squeeze(1).to(values[0].device))
                self.store.put(keys[row], rounded)
                found[keys[row]] = rounded
        out = []
        for row, key in enumerate(keys):
            if found[key].shape[0] != int(mask[row].sum()):
                raise RuntimeError(f"Cached sequence {key} has {found[key].shape[0]} positions, the batch row "
                                   f"{int(mask[row].sum())}.")
            out.append(found[key])
        return out

    def get(self, input_ids: Tensor, attention_mask: Tensor, compute: ComputeFn) -> list[Tensor]:
        """The ``K`` float32 arrays ``[B, T, vocab]`` of a batch (zero at unattended positions); see :meth:`rows`."""
        rows = self.rows(input_ids, attention_mask, compute)
        return self._assemble(rows, attention_mask.detach().bool().cpu(), input_ids.device)

    def _assemble(self, rows: list[Tensor], mask: Tensor, device: torch.device) -> list[Tensor]:
        """The batch's ``K`` arrays in float32, each row converted straight from its stored rows (no
        intermediate copy: every new vocabulary-sized tensor costs a pass of page faults on CPU)."""
        batch, width = mask.shape
        outs = [torch.empty(batch, width, self.vocab_size, dtype=torch.float32, device=device) for _ in self.names]
        for row, (value, attended) in enumerate(zip(rows, mask)):
            n = value.shape[0]
            if bool(attended[:n].all()):  # right padding: the attended positions are a prefix
                for k, out in enumerate(outs):
                    out[row, :n].copy_(value[:, k])
                    out[row, n:].zero_()
            else:
                positions = attended.nonzero().squeeze(1).to(device)
                for k, out in enumerate(outs):
                    out[row].zero_()
                    out[row].index_copy_(0, positions, value[:, k].to(device, torch.float32))
        return outs
