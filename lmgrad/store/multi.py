"""Reading the stores of a multi-process run as one, and dealing a run's batches to processes.

Each process of a `--distributed` sketch job writes its own store (no cross-host file locking or
manifest merging is needed, and each resumes on its own). Their configs agree except for the
`process` entry, which records the process's share of the run: its `generation`, `index` and
`count`, the global batch indices it owns (`batches`, in order) and every batch's row count
(`batch_rows`).

A run resumed on a different number of processes starts a new **generation**: every process
reads what all earlier stores committed (a store's rows are always a prefix of its batches: rows
are committed at batch boundaries), and the batches nobody finished are dealt again, in order, by
position modulo the new count. Earlier stores are never written again, so every process computes
the same deal without talking to the others. Stores are named

* the workdir itself: a single-process run (generation 0, the plain layout);
* `process-XXXXX`: process XXXXX of generation 0;
* `process-XXXXX-gN`: process XXXXX of generation N >= 1.

`MultiStore` reads them as one: rows in the order of an uninterrupted single-process run (global
batch order), complete when every batch is held exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmgrad.store.errors import StoreCorruptError, StoreExistsError, StoreMismatchError
from lmgrad.store.format import MANIFEST
from lmgrad.store.reader import Store, column_table

PROCESS_DIR = re.compile(r"process-(\d{5})(?:-g(\d+))?")


def process_dir(workdir: str | os.PathLike, index: int, generation: int = 0) -> Path:
    """Where process `index` of generation `generation` of a multi-process run writes its store."""
    suffix = f"-g{generation}" if generation else ""
    return Path(workdir) / f"process-{index:05d}{suffix}"


def _process_dirs(workdir: Path) -> list[Path]:
    """Process stores with a committed manifest (a directory without one holds nothing)."""
    if not workdir.is_dir():
        return []
    return sorted(p for p in workdir.iterdir()
                  if PROCESS_DIR.fullmatch(p.name) and (p / MANIFEST).exists())


def is_multi(workdir: str | os.PathLike) -> bool:
    """True for a directory holding `process-XXXXX[-gN]` stores (beside, possibly, the store of a
    single-process run that was resumed on several processes)."""
    return bool(_process_dirs(Path(workdir)))


def _without_process(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "process"}


@dataclasses.dataclass(frozen=True)
class Part:
    """One store of a run and its share of the batches."""
    path: Path
    generation: int
    index: int
    count: int
    batches: tuple[int, ...] | None   # None: a store written before shares were recorded
    rows: int                          # committed rows


def _part(path: Path, config: dict, rows: int, root: bool) -> Part:
    proc = config.get("process")
    if proc is None:
        if not root:
            raise StoreCorruptError(f"{path}: a process store without a `process` entry in its config")
        return Part(path, 0, 0, 1, None, rows)  # a single-process store owns every batch in order
    batches = proc.get("batches")
    return Part(path, int(proc.get("generation", 0)), int(proc["index"]), int(proc["count"]),
                None if batches is None else tuple(int(b) for b in batches), rows)


def _done_batches(part: Part, batch_rows: Sequence[int], n_batches: int) -> list[int]:
    """The batches a part has committed: the prefix of its share whose rows sum to its row count."""
    share = part.batches if part.batches is not None else tuple(range(part.index, n_batches, part.count))
    done, rows = [], 0
    for b in share:
        if rows >= part.rows:
            break
        rows += batch_rows[b]
        done.append(b)
    if rows != part.rows:
        raise StoreCorruptError(f"{part.path}: {part.rows} committed rows do not end at a batch boundary of "
                                "its share; was it written with another batch size or pair selection?")
    return done


@dataclasses.dataclass(frozen=True)
class Share:
    """What one process writes: its store's path and config entry, and its batches in order."""
    path: Path
    batches: tuple[int, ...]
    process: dict[str, Any] | None    # the config's `process` entry (None: a plain single-process store)


def deal(workdir: str | os.PathLike, batch_rows: Sequence[int], index: int, count: int, *,
         resume: bool, batch_size: int | None = None) -> Share:
    """This process's share of a run of `len(batch_rows)` batches (rows per batch as given).

    A fresh run deals batch i to process i mod count. A resumed run on the count of the latest
    generation continues it; on another count it deals the batches no store has committed to a
    new generation. Raises StoreExistsError for a workdir holding stores without `resume`, and
    StoreMismatchError when earlier stores were cut into other batches.
    """
    if not 0 <= index < count:
        raise ValueError(f"process index {index} not in [0, {count})")
    work = Path(workdir)
    batch_rows = [int(r) for r in batch_rows]
    n = len(batch_rows)
    entry = {"index": index, "count": count, "batch_size": batch_size, "n_batches": n,
             "run_rows": int(sum(batch_rows)), "batch_rows": batch_rows}
    parts = _read_parts(work)
    if not resume:
        # A fresh run; the other processes of this launch may already have created their stores.
        ours = [p for p, _ in parts if p.path == work or p.generation or p.count != count or p.index == index]
        if ours:
            raise StoreExistsError(f"lmgrad.store: {work} already holds the stores of a run "
                                   f"({', '.join(p.path.name for p in ours)}); pass --resume (resume=True) "
                                   "to continue it, or use a new workdir")
        if count == 1:
            return Share(work, tuple(range(n)), None)
        return Share(process_dir(work, index), tuple(range(index, n, count)),
                     dict(entry, generation=0, batches=list(range(index, n, count))))
    if not parts:
        return deal(work, batch_rows, index, count, resume=False, batch_size=batch_size)
    for part, cfg in parts:
        recorded = (cfg.get("process") or {}).get("batch_rows")
        if recorded is not None and list(recorded) != batch_rows:
            raise StoreMismatchError(
                f"lmgrad.store: {part.path} cut the run into {len(recorded)} batches of "
                f"{sum(recorded)} rows, this run into {n} batches of {sum(batch_rows)}: the batch size, "
                "pair selection or tokenisation differs; use a new workdir")
    top = max(p.generation for p, _ in parts)
    latest = [p for p, _ in parts if p.generation == top]
    if len({p.count for p in latest}) != 1:
        raise StoreCorruptError(f"{work}: the stores of generation {top} disagree on the process count")
    if latest[0].count == count:
        # Continue the latest generation: this process's own store, or (if it never committed a
        # manifest) the share that generation was dealt from the earlier ones.
        mine = [p for p in latest if p.index == index]
        if mine and mine[0].batches is not None:
            return Share(mine[0].path, mine[0].batches, dict(entry, generation=top, batches=list(mine[0].batches)))
        if top == 0 and (not mine or mine[0].path == work):
            shares = tuple(range(index, n, count))
            if count == 1:
                return Share(work, shares, None)
            return Share(process_dir(work, index), shares, dict(entry, generation=0, batches=list(shares)))
        earlier = [p for p, _ in parts if p.generation < top]
        gen = top
    else:
        earlier = [p for p, _ in parts]
        gen = top + 1
    done: set[int] = set()
    for p in earlier:
        done.update(_done_batches(p, batch_rows, n))
    left = [b for b in range(n) if b not in done]
    shares = tuple(left[index::count])
    return Share(process_dir(work, index, gen), shares, dict(entry, generation=gen, batches=list(shares)))


def _read_parts(work: Path) -> list[tuple[Part, dict]]:
    out = []
    if (work / MANIFEST).exists():
        st = Store(work, verify=False)
        out.append((_part(work, st.config, len(st), root=True), st.config))
    for d in _process_dirs(work):
        st = Store(d, verify=False)
        out.append((_part(d, st.config, len(st), root=False), st.config))
    return out


class MultiStore:
    """Read-only union of the stores of one run (per process, per generation); the reading API of
    `Store`, rows in the order of an uninterrupted single-process run."""

    def __init__(self, workdir: str | os.PathLike, *, verify: bool = True) -> None:
        self.workdir = Path(workdir)
        dirs = _process_dirs(self.workdir)
        if not dirs:
            raise FileNotFoundError(f"{self.workdir}: no process-XXXXX stores")
        roots = [self.workdir] if (self.workdir / MANIFEST).exists() else []
        self.parts = [Store(d, verify=verify) for d in roots + dirs]
        first = self.parts[0]
        for p in self.parts[1:]:
            if _without_process(p.config) != _without_process(first.config) or p.k != first.k \
                    or p.layout != first.layout:
                raise StoreMismatchError(f"{p.workdir}: config/k/layout differ from {first.workdir}")
        info = [_part(s.workdir, s.config, len(s), root=s.workdir == self.workdir) for s in self.parts]
        recorded = [s.config["process"] for s in self.parts if "batch_rows" in s.config.get("process", {})]
        self._order: np.ndarray | None = None
        if recorded:
            batch_rows = recorded[0]["batch_rows"]
            self._run_rows: int | None = int(recorded[0]["run_rows"])
            owner: dict[int, str] = {}
            starts = np.concatenate([[0], np.cumsum(batch_rows)]).astype(np.int64)
            where = []  # global row position of every stored row, parts in order
            for part in info:
                for b in _done_batches(part, batch_rows, len(batch_rows)):
                    if b in owner:
                        raise StoreCorruptError(f"{self.workdir}: batch {b} is held twice ({owner[b]} and "
                                                f"{part.path.name})")
                    owner[b] = part.path.name
                    where.append(np.arange(starts[b], starts[b + 1]))
            pos = np.concatenate(where) if where else np.zeros(0, np.int64)
            self._order = np.argsort(pos, kind="stable")
            self._complete = len(owner) == len(batch_rows)
        else:  # stores written before shares were recorded: one generation, process order
            counts = {p.count for p in info}
            if counts != {len(self.parts)}:
                raise StoreCorruptError(f"{self.workdir}: {len(self.parts)} process stores, but their configs "
                                        f"say the run had {sorted(map(str, counts))} processes")
            self._run_rows = None
            self._complete = all(p.complete for p in self.parts)
        self.manifest = dict(first.manifest, config=_without_process(first.config),
                             processes=[str(p.workdir) for p in self.parts])
        self._sketches: np.ndarray | None = None
        self._meta: dict[str, np.ndarray] | None = None

    config = property(lambda self: self.manifest["config"])
    k = property(lambda self: self.parts[0].k)
    dtype = property(lambda self: self.parts[0].dtype)
    layout = property(lambda self: self.parts[0].layout)

    @property
    def complete(self) -> bool:
        """Every batch of the run held exactly once."""
        return self._complete

    @property
    def total_rows(self) -> int | None:
        if self._run_rows is not None:
            return self._run_rows
        totals = [p.total_rows for p in self.parts]
        return None if None in totals else int(sum(totals))

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def _ordered(self, a: np.ndarray) -> np.ndarray:
        return a if self._order is None else a[self._order]

    @property
    def sketches(self) -> np.ndarray:
        """All rows as float32 [N, k] in run order (built in RAM once, then cached)."""
        if self._sketches is None:
            self._sketches = self._ordered(np.concatenate([np.asarray(p.sketches) for p in self.parts], axis=0))
        return self._sketches

    def blocks(self) -> list[str]:
        return self.parts[0].blocks()

    def block(self, name: str, *, reshape: bool = False) -> np.ndarray:
        return self._ordered(np.concatenate([p.block(name, reshape=reshape) for p in self.parts], axis=0))

    def meta_records(self) -> list[dict]:
        """Per-row metadata in run order; `row` is renumbered, `process` names the part it came from
        (its position in `parts`)."""
        out = []
        for i, p in enumerate(self.parts):
            out.extend({**r, "process": i} for r in p.meta_records())
        if self._order is not None:
            out = [out[j] for j in self._order]
        return [{**r, "row": i} for i, r in enumerate(out)]

    @property
    def meta(self) -> dict[str, np.ndarray]:
        if self._meta is None:
            self._meta = column_table(self.meta_records())
        return self._meta

    def __repr__(self) -> str:
        return (f"MultiStore({str(self.workdir)!r}, parts={len(self.parts)}, rows={len(self)}, k={self.k}, "
                f"complete={self.complete})")

    def verify(self) -> None:
        for p in self.parts:
            p.verify()
