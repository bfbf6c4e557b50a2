"""BLiMP (Warstadt et al. 2020), shipped inside the package as one gzip per paradigm.

See ``data/blimp/LICENSE_AND_ATTRIBUTION.md`` for the licence (CC BY 4.0), the source
commit and the changes made.
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
from typing import Iterable

from lmgrad.tasks.pairs import Task, TaskDataError, normalise_field, parse_jsonl

__all__ = ["blimp_uids", "load_blimp", "blimp_taxonomy", "BLIMP_SOURCE"]

BLIMP_SOURCE = "blimp"
_SUFFIX = ".jsonl.gz"


def _data_dir():
    return importlib.resources.files("lmgrad.tasks").joinpath("data", "blimp")


@functools.lru_cache(maxsize=None)
def _uids() -> tuple[str, ...]:
    names = [p.name for p in _data_dir().iterdir() if p.name.endswith(_SUFFIX)]
    return tuple(sorted(n[: -len(_SUFFIX)] for n in names))


def blimp_uids() -> list[str]:
    """The 67 BLiMP paradigm UIDs, sorted."""
    return list(_uids())


@functools.lru_cache(maxsize=None)
def _load_one(uid: str) -> Task:
    data = gzip.decompress(_data_dir().joinpath(uid + _SUFFIX).read_bytes())
    (task,) = parse_jsonl(data, name=f"lmgrad/tasks/data/blimp/{uid}{_SUFFIX}",
                          default_uid=uid, source=BLIMP_SOURCE)
    return task


def load_blimp(uids: Iterable[str] | None = None) -> list[Task]:
    """Load BLiMP paradigms (all 67 when `uids` is None), sorted by UID.

    Each Task has ``source="blimp"`` and ``sha256`` of its paradigm's uncompressed JSONL.
    Results are cached; Tasks are immutable.

    Raises:
      TaskDataError: for a UID that is not a BLiMP paradigm (the message lists them).
    """
    known = _uids()
    wanted = known if uids is None else sorted(set(uids))
    unknown = [u for u in wanted if u not in known]
    if unknown:
        raise TaskDataError(f"unknown BLiMP UID(s) {unknown}; valid UIDs: {', '.join(known)}")
    return [_load_one(u) for u in wanted]


@functools.lru_cache(maxsize=None)
def _taxonomy() -> tuple[tuple[str, str | None, str | None], ...]:
    # Every paradigm has one field and one term (parse_jsonl enforces it), so the first
    # line suffices; this keeps `select_tasks("term:...")` from parsing all 67,000 pairs.
    out = []
    for uid in _uids():
        with _data_dir().joinpath(uid + _SUFFIX).open("rb") as raw, gzip.open(raw) as fh:
            obj = json.loads(fh.readline())
        out.append((uid, normalise_field(obj.get("field")), obj.get("linguistics_term")))
    return tuple(out)


def blimp_taxonomy() -> dict[str, dict[str, str | None]]:
    """``{uid: {"field": ..., "linguistics_term": ...}}`` for all 67 paradigms."""
    return {uid: {"field": f, "linguistics_term": t} for uid, f, t in _taxonomy()}
