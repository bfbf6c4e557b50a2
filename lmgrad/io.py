"""Durable file writes and content hashes, shared by every stage.

A write goes to a temp file in the target directory, is fsynced, renamed over the target with
`os.replace` and the directory fsynced: a reader (or a resumed run) sees the old file or the new
one, never a mix. Every byte goes through `write_all`, so tests can monkeypatch it to simulate a
full disk (ENOSPC) at any point.
"""
from __future__ import annotations

import hashlib
import io as _stdio
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable

import numpy as np

_CHUNK = 8 << 20  # bytes per os.write call; several calls per shard lets tests fail mid-file


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` to the file descriptor (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:_CHUNK])
        view = view[n:]


def temp_path(directory: Path, final_name: str) -> Path:
    """A unique hidden temp name beside `final_name`; the `.tmp-` marker lets resume sweep it."""
    return directory / f".{final_name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def write_temp(path: Path, data: bytes | memoryview) -> None:
    """Create `path` (must not exist), write `data`, fsync. Removes the file on any failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    os.close(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so renames inside it survive power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old or the new file, never a mix."""
    path = Path(path)
    tmp = temp_path(path.parent, path.name)
    write_temp(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort: a leftover file is swept as garbage on the next resume


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace `path` with UTF-8 `text`."""
    atomic_write(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, allow_nan: bool = True,
               default: Any = None) -> None:
    """Atomically replace `path` with `obj` as JSON."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan, default=default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Atomically replace `path` with one JSON object per line."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """Atomically replace `path` with an uncompressed .npz of `arrays`."""
    buf = _stdio.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
