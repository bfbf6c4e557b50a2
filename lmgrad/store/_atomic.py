"""Low-level durable file writes: temp file in the target directory, fsync, os.replace, fsync dir.

Every byte the store writes goes through `write_all`, so tests can monkeypatch it to simulate
a full disk (ENOSPC) at any point of a commit.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

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


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: readers see the old or the new file, never a mix."""
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
