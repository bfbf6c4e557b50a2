"""Crash-safe, resumable writer of a run dir (manifest.json + shards/NNNNNN.npy + .meta.jsonl).

Commit protocol for one shard (see `StoreWriter.write`):
  1. data and metadata go to hidden temp files in shards/, each fsynced;
  2. both are os.replace'd to their final names and shards/ is fsynced;
  3. manifest.json is rewritten atomically (temp + fsync + os.replace + fsync of the run dir).
The shard exists for readers only after step 3. A kill anywhere before it leaves files that no
manifest entry lists; the next writer (resume or not) deletes them and rewrites that shard.
"""
from __future__ import annotations

import datetime as _dt
import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmgrad import io as lio
from lmgrad.store.errors import (NonFiniteError, StoreError, StoreExistsError, StoreIOError,
                                 StoreLockedError, StoreMismatchError)
from lmgrad.store.format import (DTYPES, FORMAT, MANIFEST, SHARD_DIR, SHARD_NAME, bf16_nonfinite,
                                 check_shard, diff_values, dumps, normalize_json, normalize_layout,
                                 read_manifest, to_bf16_bits)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

REQUIRED_META = ("UID", "pairID", "field", "linguistics_term")
LOCK_FILE = ".lock"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _describe_row(meta: dict, row: int) -> str:
    keys = [f"{k}={meta[k]!r}" for k in ("UID", "pairID") if k in meta]
    return f"row {row}" + (f" ({', '.join(keys)})" if keys else "")


class StoreWriter:
    """Appends shards of sketch rows [n, k] plus per-row metadata to a run dir, resumably.

    Rows are written contiguously from row 0 in the caller's deterministic order; after a crash,
    `StoreWriter(..., resume=True).rows_done` says how many items the caller should skip.
    Holds an advisory lock on the run dir (released on close or process death) so two live
    writers cannot interleave.

    Args:
      workdir: run dir; created if missing.
      config: JSON-able description of the run; compared verbatim on resume.
      k: row width.
      dtype: "float32" or "bfloat16" (stored as uint16 bits; rounding is nearest-even).
      layout: optional named column blocks [{name, offset, size, shape?}].
      total_rows: expected number of rows, if known; the store is marked complete when reached.
      resume: continue an existing run dir instead of refusing it.
      required_meta: keys every metadata dict must carry.
      info: JSON-able provenance that may change between sessions of one run (git commit, host,
        time); not compared on resume, appended to the manifest's `sessions` list instead.
    """

    def __init__(self, workdir: str | os.PathLike, *, config: dict, k: int, dtype: str = "float32",
                 layout: Sequence[dict] | None = None, total_rows: int | None = None,
                 resume: bool = False, required_meta: Sequence[str] = REQUIRED_META,
                 info: dict | None = None) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"lmgrad.store: dtype must be one of {DTYPES}, got {dtype!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"lmgrad.store: k must be a positive int, got {k!r}")
        if not isinstance(config, dict):
            raise TypeError(f"lmgrad.store: config must be a dict, got {type(config).__name__}")
        if total_rows is not None and (int(total_rows) != total_rows or total_rows < 0):
            raise ValueError(f"lmgrad.store: total_rows must be a non-negative int or None, got {total_rows!r}")
        self.workdir = Path(workdir)
        self.k = int(k)
        self.dtype = dtype
        self.config = normalize_json(config, "config")
        self.layout = normalize_layout(layout, self.k)
        self.total_rows = None if total_rows is None else int(total_rows)
        self.required_meta = tuple(required_meta)
        self.info = normalize_json(info or {}, "info")
        self._closed = False
        self._lock_fd: int | None = None

        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / SHARD_DIR).mkdir(exist_ok=True)
        self._acquire_lock()
        try:
            self._open_or_create(resume)
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------------ setup

    def _acquire_lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(f"lmgrad.store: {self.workdir} is being written by another live "
                                   f"process (lock {self.workdir / LOCK_FILE} is held)") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _open_or_create(self, resume: bool) -> None:
        mpath = self.workdir / MANIFEST
        if mpath.exists():
            if not resume:
                raise StoreExistsError(
                    f"lmgrad.store: {mpath} already exists; pass --resume (resume=True) to continue "
                    f"that run, or use a new workdir")
            man = read_manifest(self.workdir)
            self._check_same_run(man)
            for entry in man["shards"]:
                check_shard(self.workdir, entry, self.k, self.dtype, verify=True)
            self._manifest = man
            self._sweep_garbage()
            if self.info:
                man.setdefault("sessions", []).append({**self.info, "resumed_at_row": self.rows_done})
                self._write_manifest(man)
        else:
            # No manifest: nothing was ever committed, so anything in shards/ is garbage.
            self._sweep_garbage(listed=set())
            now = _now()
            self._manifest = {
                "format": FORMAT, "config": self.config, "k": self.k, "dtype": self.dtype,
                "layout": self.layout, "total_rows": self.total_rows, "shards": [],
                "complete": self.total_rows == 0, "created": now, "updated": now,
                "sessions": [{**self.info, "resumed_at_row": 0}] if self.info else [],
            }
            self._write_manifest(self._manifest)

    def _check_same_run(self, man: dict) -> None:
        diffs: list[str] = []
        diffs += diff_values(man["config"], self.config, "config")
        for key in ("k", "dtype", "total_rows"):
            diffs += diff_values(man[key], getattr(self, key), key)
        # A manifest written before layouts carried module/layer/type gets them derived from the
        # block names, as the new layout does; only real differences refuse a resume.
        diffs += diff_values(normalize_layout(man["layout"], man["k"]), self.layout, "layout")
        if diffs:
            raise StoreMismatchError(
                f"lmgrad.store: refusing to resume {self.workdir / MANIFEST}: this run differs in "
                f"{len(diffs)} key(s): " + "; ".join(diffs[:20])
                + ("; ..." if len(diffs) > 20 else "")
                + ". Use a new workdir to write a different configuration.")

    def _sweep_garbage(self, listed: set[str] | None = None) -> None:
        """Delete temp files and shard files without a manifest entry (left by a killed run)."""
        if listed is None:
            listed = {Path(e[key]).name for e in self._manifest["shards"]
                      for key in ("file", "meta_file")}
        for d in (self.workdir, self.workdir / SHARD_DIR):
            for name in os.listdir(d):
                stale_shard = d.name == SHARD_DIR and SHARD_NAME.match(name) and name not in listed
                if lio.is_temp_name(name) or stale_shard:
                    lio.remove_quietly(d / name)

    # ------------------------------------------------------------------ state

    @property
    def rows_done(self) -> int:
        """Rows committed so far (the caller skips this many items on resume)."""
        return sum(e["rows"] for e in self._manifest["shards"])

    @property
    def shards(self) -> list[dict]:
        """Manifest entries of the committed shards (copies)."""
        return [dict(e) for e in self._manifest["shards"]]

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def manifest(self) -> dict:
        return dict(self._manifest)

    # ------------------------------------------------------------------ writing

    def _prepare(self, rows: np.ndarray, meta: Sequence[dict], start: int) -> tuple[np.ndarray, list[dict]]:
        """Validate and cast one shard; returns (stored array, metadata records with 'row')."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.k:
            raise ValueError(f"lmgrad.store: rows must have shape [n, k={self.k}], got {list(rows.shape)}")
        n = rows.shape[0]
        if len(meta) != n:
            raise ValueError(f"lmgrad.store: got {n} rows but {len(meta)} metadata dicts")
        if self.total_rows is not None and start + n > self.total_rows:
            raise ValueError(f"lmgrad.store: writing rows [{start}, {start + n}) would exceed "
                             f"total_rows={self.total_rows}")
        if not (rows.dtype.kind in "fiu" or rows.dtype.name == "bfloat16"):
            raise TypeError(f"lmgrad.store: rows of dtype {rows.dtype} cannot be stored as {self.dtype}")
        records: list[dict] = []
        for i, m in enumerate(meta):
            row = start + i
            if not isinstance(m, dict):
                raise TypeError(f"lmgrad.store: meta[{i}] (row {row}) must be a dict, got {type(m).__name__}")
            missing = [key for key in self.required_meta if key not in m]
            if missing:
                raise ValueError(f"lmgrad.store: meta[{i}] ({_describe_row(m, row)}) is missing "
                                 f"field(s) {missing}")
            if "row" in m and m["row"] != row:
                raise ValueError(f"lmgrad.store: meta[{i}] says row {m['row']!r} but it would be "
                                 f"stored as row {row}; rows must be written contiguously in order")
            records.append({"row": row, **{key: v for key, v in m.items() if key != "row"}})

        if self.dtype == "bfloat16":
            stored = to_bf16_bits(rows)
            bad = bf16_nonfinite(stored).any(axis=1)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                stored = np.ascontiguousarray(rows, dtype=np.float32) if rows.dtype.name != "bfloat16" \
                    else (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            bad = ~np.isfinite(stored).all(axis=1)
        if bad.any():
            idx = np.flatnonzero(bad)
            named = ", ".join(_describe_row(records[i], start + i) for i in idx[:5])
            overflow = " (some finite inputs overflow the storage dtype)" if np.isfinite(
                rows[idx].astype(np.float64, copy=False)).all() else ""
            raise NonFiniteError(f"lmgrad.store: {len(idx)} row(s) contain NaN/Inf{overflow}: {named}"
                                 f"{', ...' if len(idx) > 5 else ''}; nothing was written for this shard")
        return np.ascontiguousarray(stored), records

    def write(self, rows: np.ndarray, meta: Sequence[dict]) -> None:
        """Append one shard of rows [n, k] with one metadata dict per row, starting at rows_done.

        Validation failures (shape, dtype, metadata, NaN/Inf → NonFiniteError) write nothing.
        An OSError while committing (e.g. ENOSPC) removes this shard's files, leaves the manifest
        untouched and raises StoreIOError (an OSError with the same errno) naming the workdir.
        """
        if self._closed:
            raise StoreError(f"lmgrad.store: writer for {self.workdir} is closed")
        start = self.rows_done
        stored, records = self._prepare(rows, meta, start)
        if stored.shape[0] == 0:
            return
        idx = len(self._manifest["shards"])
        sdir = self.workdir / SHARD_DIR
        data_name, meta_name = f"{idx:06d}.npy", f"{idx:06d}.meta.jsonl"

        buf = io.BytesIO()
        np.lib.format.write_array(buf, stored, allow_pickle=False)
        data_bytes = buf.getbuffer()
        meta_bytes = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
        entry = {"file": f"{SHARD_DIR}/{data_name}", "meta_file": f"{SHARD_DIR}/{meta_name}",
                 "start": start, "rows": int(stored.shape[0]),
                 "sha256": lio.sha256_bytes(data_bytes),
                 "meta_sha256": lio.sha256_bytes(meta_bytes)}
        new_manifest = dict(self._manifest)
        new_manifest["shards"] = self._manifest["shards"] + [entry]
        new_manifest["updated"] = _now()
        if self.total_rows is not None and start + entry["rows"] == self.total_rows:
            new_manifest["complete"] = True

        tmp_data = lio.temp_path(sdir, data_name)
        tmp_meta = lio.temp_path(sdir, meta_name)
        placed: list[Path] = []
        try:
            lio.write_temp(tmp_data, data_bytes)
            lio.write_temp(tmp_meta, meta_bytes)
            os.replace(tmp_data, sdir / data_name)
            placed.append(sdir / data_name)
            os.replace(tmp_meta, sdir / meta_name)
            placed.append(sdir / meta_name)
            lio.fsync_dir(sdir)
            self._write_manifest(new_manifest)
        except OSError as e:
            for p in (tmp_data, tmp_meta, *placed):
                lio.remove_quietly(p)
            raise StoreIOError(e.errno, f"lmgrad.store: committing shard {idx} (rows {start}.."
                               f"{start + entry['rows'] - 1}) in {self.workdir} failed: "
                               f"{e.strerror or e}; the store is unchanged at {start} rows",
                               str(self.workdir)) from e
        self._manifest = new_manifest

    def _write_manifest(self, man: dict) -> None:
        lio.atomic_write(self.workdir / MANIFEST, (dumps(man, indent=1) + "\n").encode("utf-8"))

    def close(self, complete: bool = True) -> None:
        """Finish: mark the store complete if asked and all rows are in; release the lock.

        With total_rows known the store is complete exactly when rows_done == total_rows (set at
        the last write); with total_rows None, `complete=True` marks it complete here.
        """
        if self._closed:
            return
        try:
            if complete and not self._manifest["complete"]:
                if self.total_rows is None:
                    man = dict(self._manifest, complete=True, updated=_now())
                    self._write_manifest(man)
                    self._manifest = man
                else:
                    warnings.warn(f"lmgrad.store: closing {self.workdir} with {self.rows_done} of "
                                  f"{self.total_rows} rows; left incomplete (resume to finish)",
                                  stacklevel=2)
        finally:
            self._closed = True
            self._release_lock()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(complete=exc_type is None)

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            self._release_lock()

    def __repr__(self) -> str:
        return (f"StoreWriter({str(self.workdir)!r}, k={self.k}, dtype={self.dtype!r}, "
                f"rows_done={self.rows_done}, total_rows={self.total_rows})")
