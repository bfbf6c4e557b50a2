"""Offline, numpy-only reading of a run dir: memory-mapped shards, metadata table, layout blocks.

Only shards listed in manifest.json are read, so a store that is still being written (or whose
writer was killed) opens fine and shows the rows committed so far (`store.complete` is False).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmgrad.store.errors import StoreCorruptError
from lmgrad.store.format import MANIFEST, check_shard, read_manifest, to_float32


class Store:
    """Read-only view of a run dir. Build with `lmgrad.store.open(workdir)`.

    Memory: `shard_arrays()`, `rows()` and `block()` read lazily through memory maps. `sketches`
    is a zero-copy memmap only for a single float32 shard; otherwise the first access builds one
    float32 [N, k] array in RAM (N*k*4 bytes) and caches it — use `rows()`/`block()` or
    `shard_arrays()` for stores larger than memory.
    """

    def __init__(self, workdir: str | os.PathLike, *, verify: bool = True) -> None:
        self.workdir = Path(workdir)
        self.manifest: dict = read_manifest(self.workdir)
        for entry in self.manifest["shards"]:
            check_shard(self.workdir, entry, self.k, self.dtype, verify=verify)
        ends = np.cumsum([e["rows"] for e in self.manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else ends
        self._ends = ends
        self._arrays: list[np.memmap] | None = None
        self._sketches: np.ndarray | None = None
        self._records: list[dict] | None = None
        self._meta: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ manifest fields

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def dtype(self) -> str:
        """Storage dtype: "float32" or "bfloat16" (all read accessors return float32)."""
        return self.manifest["dtype"]

    @property
    def layout(self) -> list[dict]:
        return self.manifest["layout"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def total_rows(self) -> int | None:
        return self.manifest["total_rows"]

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __repr__(self) -> str:
        return (f"Store({str(self.workdir)!r}, rows={len(self)}, k={self.k}, dtype={self.dtype!r}, "
                f"shards={len(self.shards)}, complete={self.complete})")

    # ------------------------------------------------------------------ sketch rows

    def shard_arrays(self) -> list[np.memmap]:
        """One read-only memmap per shard, in the stored dtype (bfloat16 shards are uint16 bits)."""
        if self._arrays is None:
            self._arrays = [np.load(self.workdir / e["file"], mmap_mode="r") for e in self.shards]
        return list(self._arrays)

    def _f32(self, stored: np.ndarray) -> np.ndarray:
        return to_float32(stored, self.dtype)

    @property
    def sketches(self) -> np.ndarray:
        """All rows as float32 [N, k] (memmap for one float32 shard, else cached in RAM)."""
        if self._sketches is None:
            arrays = self.shard_arrays()
            if len(arrays) == 1 and self.dtype == "float32":
                self._sketches = arrays[0]
            elif not arrays:
                self._sketches = np.zeros((0, self.k), np.float32)
            else:
                out = np.empty((len(self), self.k), np.float32)
                for a, s in zip(arrays, self._starts):
                    out[s:s + a.shape[0]] = self._f32(a)
                self._sketches = out
        return self._sketches

    def rows(self, indices: Any) -> np.ndarray:
        """float32 rows at `indices` (int, slice, int array or bool mask), read shard by shard.

        An int gives [k]; anything else [m, k] in the order asked (repeats allowed).
        """
        n = len(self)
        if isinstance(indices, slice):
            idx = np.arange(n)[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean mask of shape {idx.shape} for a store of {n} rows")
                idx = np.flatnonzero(idx)
            elif idx.dtype.kind not in "iu":
                raise IndexError(f"row indices must be integers, got dtype {idx.dtype}")
        scalar = idx.ndim == 0
        idx = np.atleast_1d(idx).astype(np.int64)
        if idx.ndim != 1:
            raise IndexError(f"row indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for a store of {n} rows "
                             f"(got {int(idx.min())}..{int(idx.max())})")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((idx.size, self.k), np.float32)
        shard_of = np.searchsorted(self._ends, idx, side="right")
        arrays = self.shard_arrays()
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self._f32(arrays[s][idx[sel] - self._starts[s]])
        return out[0] if scalar else out

    # ------------------------------------------------------------------ layout blocks

    def blocks(self) -> list[str]:
        """Names of the layout blocks, in manifest order."""
        return [b["name"] for b in self.layout]

    def block(self, name: str, *, reshape: bool = False) -> np.ndarray:
        """Columns of one layout block as float32 [N, size] (or [N, *shape] with `reshape`).

        A view of the memmap for a single float32 shard; otherwise a new array.
        """
        entry = next((b for b in self.layout if b["name"] == name), None)
        if entry is None:
            raise KeyError(f"no layout block {name!r} in {self.workdir / MANIFEST}; "
                           f"blocks are {self.blocks()}")
        lo, hi = entry["offset"], entry["offset"] + entry["size"]
        arrays = self.shard_arrays()
        if len(arrays) == 1 and self.dtype == "float32":
            out = arrays[0][:, lo:hi]
        elif not arrays:
            out = np.zeros((0, hi - lo), np.float32)
        else:
            out = np.concatenate([self._f32(a[:, lo:hi]) for a in arrays], axis=0)
        if reshape and entry.get("shape") is not None:
            out = out.reshape(out.shape[0], *entry["shape"])
        return out

    # ------------------------------------------------------------------ metadata

    def meta_records(self) -> list[dict]:
        """Per-row metadata dicts (row order), read from the listed shards' .meta.jsonl files."""
        if self._records is None:
            records: list[dict] = []
            for e in self.shards:
                path = self.workdir / e["meta_file"]
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
                if len(lines) != e["rows"]:
                    raise StoreCorruptError(f"{path}: {len(lines)} lines, manifest lists {e['rows']} rows")
                for j, line in enumerate(lines):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise StoreCorruptError(f"{path}:{j + 1}: invalid JSON ({err.msg})") from None
                    if rec.get("row") != e["start"] + j:
                        raise StoreCorruptError(f"{path}:{j + 1}: field 'row' is {rec.get('row')!r}, "
                                                f"expected {e['start'] + j}")
                    records.append(rec)
            self._records = records
        return [dict(r) for r in self._records]

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """Column table of the metadata: one array per key seen (missing values are None).

        Columns of plain ints, floats or bools with no gaps get numeric dtypes; the rest (strings,
        mixed, nested) are object arrays.
        """
        if self._meta is None:
            self._meta = column_table(self.meta_records() if self._records is None else self._records)
        return self._meta

    def to_pandas(self) -> Any:
        """The metadata table as a pandas DataFrame (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Store.to_pandas needs pandas (pip install pandas); "
                              "Store.meta gives the same table as numpy columns") from None
        return pd.DataFrame(self.meta_records())

    def verify(self) -> None:
        """Re-check every listed shard's sha256 (reads all data)."""
        for entry in self.shards:
            check_shard(self.workdir, entry, self.k, self.dtype, verify=True)


def column_table(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Records → {key: column} over every key seen (missing values are None)."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    return {key: _column([r.get(key) for r in records]) for key in keys}


def _column(values: Sequence[Any]) -> np.ndarray:
    types = {type(v) for v in values}
    if types == {bool}:
        return np.array(values, dtype=bool)
    if types == {int}:
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    elif types and types <= {int, float}:
        return np.array(values, dtype=np.float64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
