"""Reading the stores of a multi-process run as one: `WORKDIR/process-XXXXX/` per process.

Each process of a `--distributed` sketch job writes its own store (no cross-host file locking or
manifest merging is needed, and each resumes on its own). Their configs agree except for the
`process` entry; rows are concatenated in process order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
import numpy as np

from lmgrad.store.errors import StoreCorruptError, StoreMismatchError
from lmgrad.store.format import MANIFEST
from lmgrad.store.reader import Store, column_table

PROCESS_DIR = re.compile(r"process-(\d{5})")


def process_dir(workdir: str | os.PathLike, index: int) -> Path:
    """Where process `index` of a multi-process run writes its store."""
    return Path(workdir) / f"process-{index:05d}"


def is_multi(workdir: str | os.PathLike) -> bool:
    """True for a directory without its own manifest holding `process-XXXXX` stores."""
    d = Path(workdir)
    return (not (d / MANIFEST).exists() and d.is_dir()
            and any(PROCESS_DIR.fullmatch(p.name) for p in d.iterdir()))


def _without_process(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "process"}


class MultiStore:
    """Read-only union of the per-process stores of one run; the reading API of `Store`."""

    def __init__(self, workdir: str | os.PathLike, *, verify: bool = True) -> None:
        self.workdir = Path(workdir)
        dirs = sorted(p for p in self.workdir.iterdir() if PROCESS_DIR.fullmatch(p.name))
        if not dirs:
            raise FileNotFoundError(f"{self.workdir}: no {MANIFEST} and no process-XXXXX stores")
        self.parts = [Store(d, verify=verify) for d in dirs]
        first = self.parts[0]
        counts = {p.config.get("process", {}).get("count") for p in self.parts}
        if counts != {len(self.parts)}:
            raise StoreCorruptError(f"{self.workdir}: {len(self.parts)} process stores, but their configs "
                                    f"say the run had {sorted(map(str, counts))} processes")
        for p in self.parts[1:]:
            if _without_process(p.config) != _without_process(first.config) or p.k != first.k \
                    or p.layout != first.layout:
                raise StoreMismatchError(f"{p.workdir}: config/k/layout differ from {first.workdir}")
        self.manifest = dict(first.manifest, config=_without_process(first.config),
                             processes=[str(p.workdir) for p in self.parts])
        self._sketches: np.ndarray | None = None
        self._meta: dict[str, np.ndarray] | None = None

    config = property(lambda self: self.manifest["config"])
    k = property(lambda self: self.parts[0].k)
    dtype = property(lambda self: self.parts[0].dtype)
    layout = property(lambda self: self.parts[0].layout)
    complete = property(lambda self: all(p.complete for p in self.parts))

    @property
    def total_rows(self) -> int | None:
        totals = [p.total_rows for p in self.parts]
        return None if None in totals else int(sum(totals))

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def sketches(self) -> np.ndarray:
        """All rows as float32 [N, k], processes in order (built in RAM once, then cached)."""
        if self._sketches is None:
            self._sketches = np.concatenate([np.asarray(p.sketches) for p in self.parts], axis=0)
        return self._sketches

    def blocks(self) -> list[str]:
        return self.parts[0].blocks()

    def block(self, name: str, *, reshape: bool = False) -> np.ndarray:
        return np.concatenate([p.block(name, reshape=reshape) for p in self.parts], axis=0)

    def meta_records(self) -> list[dict]:
        """Per-row metadata; `row` is renumbered across processes, `process` says where it came from."""
        out, offset = [], 0
        for i, p in enumerate(self.parts):
            for r in p.meta_records():
                out.append({**r, "row": offset + r["row"], "process": i})
            offset += len(p)
        return out

    @property
    def meta(self) -> dict[str, np.ndarray]:
        if self._meta is None:
            self._meta = column_table(self.meta_records())
        return self._meta

    def __repr__(self) -> str:
        return f"MultiStore({str(self.workdir)!r}, processes={len(self.parts)}, rows={len(self)}, k={self.k})"

    def verify(self) -> None:
        for p in self.parts:
            p.verify()
