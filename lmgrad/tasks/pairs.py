"""Minimal-pair schema (`Pair`, `Task`) and the JSONL loader.

A pairs file has one JSON object per line (blank lines allowed)::

    {"sentence_good": "...", "sentence_bad": "...", "UID": "passive_1", "pairID": "0",
     "field": "syntax", "linguistics_term": "argument_structure", ...}

Only the two sentences are required. Every other key is kept in `Pair.meta`, so BLiMP's
method flags and `one_prefix_*` / `two_prefix_*` fields survive a round trip.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
from typing import Any, Mapping

__all__ = ["TaskDataError", "Pair", "Task", "load_jsonl", "parse_jsonl", "normalise_field"]


class TaskDataError(ValueError):
    """Bad task data or selection; the message names the file:line and field at fault."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One minimal pair: a grammatical and an ungrammatical sentence."""

    sentence_good: str
    sentence_bad: str
    UID: str
    pairID: str
    field: str | None = None
    linguistics_term: str | None = None
    # A dict (not a MappingProxy) so Pairs pickle for multiprocessing; excluded from hash.
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


@dataclasses.dataclass(frozen=True)
class Task:
    """All pairs sharing one UID, with provenance (`source`, `sha256` of the source bytes).

    `degenerate_pair_ids` lists pairs of the source left out because their two sentences
    are identical (see `lmgrad.tasks.drop_degenerate`); `sha256` still hashes the source.
    """

    uid: str
    pairs: tuple[Pair, ...]
    field: str | None
    linguistics_term: str | None
    source: str
    sha256: str
    degenerate_pair_ids: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)


# BLiMP writes `syntax/semantics` once (principle_A_case_2) and `syntax_semantics` elsewhere.
_FIELD_ALIASES = {"syntax/semantics": "syntax_semantics"}

_KNOWN = ("sentence_good", "sentence_bad", "UID", "pairID", "field", "linguistics_term")


def normalise_field(field: str | None) -> str | None:
    """Map spelling variants of a `field` value to one canonical name."""
    return _FIELD_ALIASES.get(field, field) if field is not None else None


def load_jsonl(path: str | os.PathLike, *, default_uid: str | None = None) -> list[Task]:
    """Load a JSONL (or ``.jsonl.gz``) pairs file and group its pairs by UID.

    Args:
      path: the file; gzip-compressed when its name ends in ``.gz``.
      default_uid: UID for lines without one (default: the file stem, e.g. ``pairs``
        for ``pairs.jsonl``).

    Returns:
      One `Task` per UID, in order of first appearance; pairs keep file order.

    Raises:
      TaskDataError: naming ``file:line`` and the field, for malformed JSON, a line that
        is not an object, a missing / non-string / empty sentence, a bad UID or pairID,
        a duplicate (UID, pairID), two different fields or terms within a UID, or no
        pairs. Lines of a UID may omit field / term; the Task takes the stated one.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise TaskDataError(f"{path}: cannot read pairs file: {e}") from e
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise TaskDataError(f"{path}: not a valid gzip file: {e}") from e
    if default_uid is None:
        default_uid = _stem(path)
    return parse_jsonl(raw, name=path, default_uid=default_uid, source=path)


def parse_jsonl(data: bytes, *, name: str, default_uid: str, source: str) -> list[Task]:
    """Parse uncompressed JSONL bytes into Tasks; `name` is used in error messages.

    `sha256` of every returned Task is the hash of `data` (the uncompressed bytes), so it
    does not depend on how a file was compressed.
    """
    sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{name}: not UTF-8 ({e})") from e

    groups: dict[str, list[Pair]] = collections.OrderedDict()
    labels: dict[str, dict[str, tuple[str, int]]] = {}
    seen: dict[tuple[str, str], int] = {}
    # split("\n"), not splitlines(): the latter also breaks on U+2028 etc., which JSON
    # strings may hold unescaped, and would shift line numbers in error messages.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise TaskDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        pair = _pair_from_obj(obj, where, default_uid=default_uid, line_index=lineno - 1)
        key = (pair.UID, pair.pairID)
        if key in seen:
            raise TaskDataError(
                f"{where}: field 'pairID': duplicate pairID {pair.pairID!r} for UID "
                f"{pair.UID!r} (first at line {seen[key]})"
            )
        seen[key] = lineno
        if pair.UID not in groups:
            groups[pair.UID] = []
            labels[pair.UID] = {}
        # A task has one field and one term; lines may omit them (None) but not disagree.
        for attr in ("field", "linguistics_term"):
            v = getattr(pair, attr)
            if v is None:
                continue
            prev = labels[pair.UID].setdefault(attr, (v, lineno))
            if prev[0] != v:
                raise TaskDataError(
                    f"{where}: field {attr!r}: {v!r} differs from {prev[0]!r} at line "
                    f"{prev[1]} for UID {pair.UID!r}"
                )
        groups[pair.UID].append(pair)
    if not groups:
        raise TaskDataError(f"{name}: no pairs in file")
    return [
        Task(uid=uid, pairs=tuple(ps), field=labels[uid].get("field", (None,))[0],
             linguistics_term=labels[uid].get("linguistics_term", (None,))[0],
             source=source, sha256=sha)
        for uid, ps in groups.items()
    ]


def _pair_from_obj(obj: dict, where: str, *, default_uid: str, line_index: int) -> Pair:
    sentences = []
    for key in ("sentence_good", "sentence_bad"):
        if key not in obj:
            raise TaskDataError(f"{where}: missing required field {key!r}")
        v = obj[key]
        if not isinstance(v, str):
            raise TaskDataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise TaskDataError(f"{where}: field {key!r} is empty")
        sentences.append(v)

    uid = obj.get("UID", default_uid)
    if not isinstance(uid, str) or not uid.strip():
        raise TaskDataError(f"{where}: field 'UID' must be a non-empty string, got {uid!r}")

    pid = obj.get("pairID", str(line_index))
    # BLiMP stores pairID as a string; accept ints from hand-written files but keep str.
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid:
        raise TaskDataError(f"{where}: field 'pairID' must be a non-empty string, got {pid!r}")

    opt = {}
    for key in ("field", "linguistics_term"):
        v = obj.get(key)
        if v is not None and not isinstance(v, str):
            raise TaskDataError(f"{where}: field {key!r} must be a string or null, got {type(v).__name__}")
        opt[key] = v
    meta = {k: v for k, v in obj.items() if k not in _KNOWN}
    return Pair(
        sentence_good=sentences[0], sentence_bad=sentences[1], UID=uid, pairID=pid,
        field=normalise_field(opt["field"]), linguistics_term=opt["linguistics_term"], meta=meta,
    )


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (".gz", ".jsonl", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base
