"""lmgrad.store: crash-safe, resumable sketch store (manifest.json + shards/*.npy), numpy-only reads.

    with StoreWriter(workdir, config=cfg, k=k, total_rows=n, resume=True) as w:
        for batch in batches[w.rows_done:]: w.write(sketch_bk, meta)
    store = lmgrad.store.open(workdir); store.sketches, store.meta, store.block("mlp.0")
"""
from lmgrad.store.errors import (NonFiniteError, StoreCorruptError, StoreError, StoreExistsError,
                                 StoreIOError, StoreLockedError, StoreMismatchError)
from lmgrad.store.format import FORMAT, bf16_bits_to_f32, to_bf16_bits
from lmgrad.store.reader import Store, open_store, write_store
from lmgrad.store.writer import REQUIRED_META, StoreWriter
from lmgrad.store.multi import MultiStore, process_dir

open = open_store  # noqa: A001 - `lmgrad.store.open(workdir)` is the intended spelling

__all__ = [
    "FORMAT", "MultiStore", "REQUIRED_META", "process_dir", "NonFiniteError", "Store", "StoreCorruptError", "StoreError",
    "StoreExistsError", "StoreIOError", "StoreLockedError", "StoreMismatchError", "StoreWriter",
    "bf16_bits_to_f32", "open", "open_store", "to_bf16_bits", "write_store",
]
