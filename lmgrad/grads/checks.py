"""Refusing non-finite differentials, with the pair that produced them named."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


class NonFiniteGradientError(FloatingPointError):
    """A pair's differential (or sketch) has a NaN or infinite entry."""


def _describe(meta: Sequence[Any] | Mapping[int, Any] | None, item: int) -> str:
    if meta is None:
        return f"pair #{item}"
    try:
        m = meta[item]
    except (IndexError, KeyError):
        return f"pair #{item} (no metadata)"
    get = (lambda k: m.get(k)) if isinstance(m, Mapping) else (lambda k: getattr(m, k, None))
    uid, pid = get("UID") or get("uid"), get("pairID") or get("pair_id")
    return f"pair #{item} (UID={uid!r}, pairID={pid!r})"


def check_finite(
    rows: Mapping[str, Any] | Any,
    index: Sequence[int] | np.ndarray,
    meta: Sequence[Any] | Mapping[int, Any] | None = None,
) -> None:
    """Raise `NonFiniteGradientError` if any valid row of `rows` has a non-finite entry.

    Args:
      rows: per-example differentials {name: [B, ...]} or a sketch array [B, K].
      index: [B] pair index per row (`Batch.index`); rows with index < 0 are padding and skipped.
      meta: per-pair metadata indexed by pair index: `Pair` objects or mappings with `UID` and
        `pairID` (e.g. `task.pairs`), used to name the pair in the message.
    """
    leaves = dict(rows) if isinstance(rows, Mapping) else {"sketch": rows}
    index = np.asarray(index)
    bad_rows: dict[int, list[str]] = {}
    for name, value in leaves.items():
        v = np.asarray(value)
        if v.shape[:1] != index.shape:
            raise ValueError(f"check_finite: {name!r} has {v.shape[:1]} rows but index has {index.shape}")
        finite = np.isfinite(v.reshape(v.shape[0], -1)).all(axis=1)
        for r in np.flatnonzero(~finite & (index >= 0)):
            bad_rows.setdefault(int(r), []).append(name)
    if bad_rows:
        parts = [
            f"{_describe(meta, int(index[r]))} in {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for r, names in sorted(bad_rows.items())[:5]
        ]
        more = f" (and {len(bad_rows) - 5} more rows)" if len(bad_rows) > 5 else ""
        raise NonFiniteGradientError("non-finite gradient differential for " + "; ".join(parts) + more)
