"""Exceptions raised by lmgrad.store; each message names the run dir, file or row concerned."""
from __future__ import annotations


class StoreError(Exception):
    """Base class for every error raised by lmgrad.store."""


class StoreExistsError(StoreError, FileExistsError):
    """A manifest already exists and the writer was not asked to resume."""


class StoreMismatchError(StoreError, ValueError):
    """Resuming with a config/k/dtype/layout that differs from the stored manifest."""


class StoreCorruptError(StoreError):
    """A manifest-listed file is missing, truncated or fails its sha256 check."""


class StoreLockedError(StoreError):
    """Another live writer holds the run dir's lock."""


class NonFiniteError(StoreError, ValueError):
    """A row to be written contains NaN or Inf (after casting to the storage dtype)."""


class StoreIOError(StoreError, OSError):
    """An OSError (e.g. ENOSPC) while committing a shard; the store was left as it was.

    Keeps ``errno`` so callers can test ``err.errno == errno.ENOSPC``.
    """
