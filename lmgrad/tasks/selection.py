"""`select_tasks`: a small selector language over BLiMP and user pair files."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from typing import Any, Sequence

import numpy as np

from lmgrad.tasks.blimp import BLIMP_UIDS, blimp_taxonomy, blimp_uids, load_blimp
from lmgrad.tasks.pairs import Task, TaskDataError, load_jsonl, normalise_field

__all__ = ["select_tasks", "subsample", "drop_degenerate", "task_provenance"]

_KINDS = {
    "blimp": "uid", "uid": "uid",
    "term": "term", "linguistics_term": "term",
    "field": "field",
    "file": "file",
}


def select_tasks(
    selector: str,
    *,
    max_pairs_per_task: int | None = None,
    seed: int = 0,
    blimp_dir: str | os.PathLike | None = None,
) -> list[Task]:
    """Resolve a selector string to Tasks, sorted by uid and de-duplicated.

    Grammar: clauses joined by ``,`` or ``+`` (union). A clause is ``kind:value``; a bare
    item after a clause is one more value of that clause's kind, so
    ``blimp:passive_1,passive_2`` names two UIDs. Kinds:

    - ``blimp``                         all 67 BLiMP paradigms
    - ``blimp:UID`` or ``uid:UID``      one BLiMP paradigm (a bare first item is a UID too)
    - ``term:T`` / ``linguistics_term:T``  BLiMP paradigms with that linguistics_term,
      e.g. ``term:island_effects``
    - ``field:F``                       BLiMP paradigms with that field (morphology, syntax,
      semantics, syntax_semantics; ``syntax/semantics`` is accepted)
    - ``file:PATH``                     every Task in a JSONL (or .jsonl.gz) pairs file;
      PATH may not contain ``,`` or ``+``. A bare item that is an existing file ending in
      ``.jsonl`` or ``.jsonl.gz`` is read as ``file:`` too.

    Example: ``"term:binding+field:morphology,file:extra.jsonl"``.

    Pairs whose good and bad sentences are identical (BLiMP has 7) are dropped, with a
    warning, before sampling (see `drop_degenerate`; `task_provenance` records them).

    Args:
      selector: the selector string.
      max_pairs_per_task: keep at most this many pairs per Task, a seeded sample without
        replacement in original order (see `subsample`).
      seed: non-negative sampling seed.
      blimp_dir: where to read BLiMP from (see `lmgrad.tasks.blimp`); default: the
        configured directory, ``$LMGRAD_BLIMP_DIR``, else the download cache.

    Raises:
      TaskDataError: unknown UID / term / field (listing valid values; a UID that looks
        like a path suggests ``file:``), a clause without a value, the same uid from two
        different sources, or an empty selection.
    """
    uids: list[str] = []
    terms: list[str] = []
    fields: list[str] = []
    files: list[str] = []
    bucket = {"uid": uids, "term": terms, "field": fields, "file": files}
    kind: str | None = None
    for item in re.split(r"[,+]", selector):
        item = item.strip()
        if not item:
            continue
        prefix, sep, value = item.partition(":")
        if sep and prefix.strip().lower() in _KINDS:
            kind = _KINDS[prefix.strip().lower()]
            value = value.strip()
            if not value:
                if prefix.strip().lower() == "blimp":
                    uids.extend(blimp_uids())
                    continue
                raise TaskDataError(f"selector {selector!r}: clause {item!r} needs a value")
            bucket[kind].append(value)
        elif item.lower() == "blimp":
            uids.extend(blimp_uids())
            kind = "uid"
        elif (kind or "uid") == "uid" and _is_pairs_file(item):
            # A bare path is unambiguous: no BLiMP UID ends in .jsonl. Later bare items
            # keep the clause's kind, as the user did not write `file:`.
            files.append(item)
        else:
            bucket[kind or "uid"].append(item)

    pathlike = sorted({u for u in uids if u not in BLIMP_UIDS and ("/" in u or u.endswith(_PAIRS_SUFFIXES))})
    if pathlike:
        hint = "; ".join(f"did you mean file:{u}?" + ("" if os.path.exists(u) else " (no such file)")
                         for u in pathlike)
        raise TaskDataError(f"selector {selector!r}: unknown BLiMP UID(s) {pathlike}: {hint}")

    tax = blimp_taxonomy(blimp_dir=blimp_dir) if (terms or fields) else {}
    _check_known(selector, "BLiMP UID", uids, BLIMP_UIDS)
    valid_terms = {v["linguistics_term"] for v in tax.values()}
    _check_known(selector, "linguistics_term", terms, valid_terms)
    fields = [normalise_field(f) for f in fields]
    valid_fields = {v["field"] for v in tax.values()}
    _check_known(selector, "field", fields, valid_fields)

    chosen = set(uids)
    chosen |= {u for u, v in tax.items() if v["linguistics_term"] in terms}
    chosen |= {u for u, v in tax.items() if v["field"] in fields}
    tasks = load_blimp(chosen, blimp_dir=blimp_dir) if chosen else []
    seen_files = set()
    for path in files:
        real = os.path.realpath(path)
        if real not in seen_files:
            seen_files.add(real)
            tasks.extend(load_jsonl(path))

    by_uid: dict[str, Task] = {}
    for t in tasks:
        prev = by_uid.get(t.uid)
        if prev is not None and (prev.source, prev.sha256) != (t.source, t.sha256):
            raise TaskDataError(
                f"selector {selector!r}: task uid {t.uid!r} comes from both {prev.source!r} "
                f"and {t.source!r}; rename one UID"
            )
        by_uid.setdefault(t.uid, t)
    if not by_uid:
        raise TaskDataError(f"selector {selector!r} selects no tasks")
    out = []
    for u in sorted(by_uid):  # a loop, not a comprehension: its frame would shift stacklevel
        out.append(_drop_degenerate(by_uid[u], stacklevel=3))
    if max_pairs_per_task is not None:
        out = [subsample(t, max_pairs_per_task, seed=seed) for t in out]
    return out


def subsample(task: Task, n: int, *, seed: int = 0) -> Task:
    """At most `n` pairs of `task`, sampled without replacement, in original order.

    The generator is seeded from (seed, a stable hash of the uid), so one task's sample
    does not change when other tasks join or leave a selection. `source` and `sha256`
    still describe the full source; record (n, seed) beside them (see `task_provenance`).
    """
    if n < 1:
        raise ValueError(f"max_pairs_per_task must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if len(task.pairs) <= n:
        return task
    rng = np.random.default_rng([seed, _stable_hash(task.uid)])
    idx = np.sort(rng.choice(len(task.pairs), size=n, replace=False))
    return dataclasses.replace(task, pairs=tuple(task.pairs[i] for i in idx))


def drop_degenerate(task: Task) -> Task:
    """`task` without the pairs whose sentences are equal after stripping whitespace.

    Such a pair has a gradient differential of exactly zero, which breaks per-task
    statistics. Their pairIDs go to ``Task.degenerate_pair_ids`` (kept across calls) and a
    warning names them. A task without any is returned as is.
    """
    return _drop_degenerate(task, stacklevel=3)


def _drop_degenerate(task: Task, *, stacklevel: int) -> Task:
    bad = [p.pairID for p in task.pairs if p.sentence_good.strip() == p.sentence_bad.strip()]
    if not bad:
        return task
    # stacklevel: the warning points at the user's call (drop_degenerate or select_tasks).
    warnings.warn(
        f"task {task.uid!r} ({task.source}): dropped {len(bad)} pair(s) whose good and bad "
        f"sentences are identical, pairID(s) {bad}", stacklevel=stacklevel)
    dropped = set(bad)
    keep = tuple(p for p in task.pairs if p.pairID not in dropped)
    return dataclasses.replace(task, pairs=keep, degenerate_pair_ids=task.degenerate_pair_ids + tuple(bad))


def task_provenance(tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """JSON-ready provenance rows for a run manifest: one per task.

    `pair_ids_sha256` hashes the chosen pairIDs (newline-joined), so a subsample is
    pinned down without listing every ID. `n_degenerate_dropped` and
    `degenerate_pair_ids` say which source pairs `drop_degenerate` left out.
    """
    rows = []
    for t in tasks:
        ids = "\n".join(p.pairID for p in t.pairs).encode("utf-8")
        rows.append({
            "uid": t.uid, "source": t.source, "sha256": t.sha256, "n_pairs": len(t.pairs),
            "field": t.field, "linguistics_term": t.linguistics_term,
            "pair_ids_sha256": hashlib.sha256(ids).hexdigest(),
            "n_degenerate_dropped": len(t.degenerate_pair_ids),
            "degenerate_pair_ids": list(t.degenerate_pair_ids),
        })
    return rows


def _stable_hash(s: str) -> int:
    # Python's hash() is salted per process; this is stable across runs and hosts.
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "little")


_PAIRS_SUFFIXES = (".jsonl", ".jsonl.gz")


def _is_pairs_file(item: str) -> bool:
    return item.endswith(_PAIRS_SUFFIXES) and os.path.isfile(item)


def _check_known(selector: str, what: str, values, valid) -> None:
    unknown = sorted({v for v in values if v not in valid})
    if unknown:
        raise TaskDataError(
            f"selector {selector!r}: unknown {what}(s) {unknown}; valid: {', '.join(sorted(valid))}"
        )
