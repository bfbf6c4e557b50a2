"""lmgrad.store: crash-safe, resumable sketch store (manifest.json + shards/*.npy), numpy-only reads.

    with StoreWriter(workdir, config=cfg, k=k, total_rows=n, resume=True) as w:
        for batch in batches[w.rows_done:]: w.write(sketch_bk, meta)
    store = lmgrad.store.open(workdir); store.sketches, store.meta, store.block("mlp.0")

`open_store` and `write_store` live here, above `reader` (one store) and `multi` (the stores of a
multi-process run), so that neither module has to import the other's caller.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from lmgrad.store.errors import (NonFiniteError, StoreCorruptError, StoreError, StoreExistsError,
                                 StoreIOError, StoreLockedError, StoreMismatchError)
from lmgrad.store.format import FORMAT, bf16_bits_to_f32, to_bf16_bits
from lmgrad.store.multi import MultiStore, Share, deal, is_multi, process_dir
from lmgrad.store.reader import Store
from lmgrad.store.writer import REQUIRED_META, StoreWriter


def open_store(workdir: str | os.PathLike, *, verify: bool = True) -> Store | MultiStore:
    """Open a run dir for reading. `verify` re-hashes every shard (reads all data once).

    A directory of per-process stores (`process-XXXXX/`, from a multi-process run) opens as one
    `MultiStore` with the same reading API.
    """
    if is_multi(workdir):
        return MultiStore(workdir, verify=verify)
    return Store(workdir, verify=verify)


def write_store(workdir: str | os.PathLike, rows: np.ndarray, meta: Sequence[dict], *, config: dict,
                k: int, dtype: str = "float32", layout: Sequence[dict] | None = None,
                shard_rows: int = 1024, **writer_kw: Any) -> Store | MultiStore:
    """Write all `rows` [N, k] with `meta` in shards of `shard_rows` in one call; return the Store."""
    rows = np.asarray(rows)
    if len(meta) != len(rows):
        raise ValueError(f"lmgrad.store: got {len(rows)} rows but {len(meta)} metadata dicts")
    if shard_rows < 1:
        raise ValueError(f"lmgrad.store: shard_rows must be >= 1, got {shard_rows}")
    with StoreWriter(workdir, config=config, k=k, dtype=dtype, layout=layout,
                     total_rows=len(rows), **writer_kw) as w:
        for s in range(w.rows_done, len(rows), shard_rows):
            w.write(rows[s:s + shard_rows], meta[s:s + shard_rows])
    return open_store(workdir)


open = open_store  # noqa: A001 - `lmgrad.store.open(workdir)` is the intended spelling

__all__ = [
    "FORMAT", "MultiStore", "REQUIRED_META", "NonFiniteError", "Store", "StoreCorruptError",
    "StoreError", "StoreExistsError", "StoreIOError", "StoreLockedError", "StoreMismatchError",
    "Share", "StoreWriter", "bf16_bits_to_f32", "deal", "open", "open_store", "process_dir", "to_bf16_bits",
    "write_store",
]
