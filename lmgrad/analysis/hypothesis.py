"""Hypothesis spaces: which tasks *should* be similar, as a [T, T] matrix over the same tasks.

A hypothesis is either categorical (tasks grouped into categories: 1 for same category, 0
otherwise) or a free matrix from a file. Categorical hypotheses also support the within/between
ratio and the clustering score; free matrices support the correlation and Mantel tests.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TAXONOMY_COLUMNS = ("field", "linguistics_term")


@dataclasses.dataclass
class Hypothesis:
    """A hypothesis matrix aligned to ``tasks``; ``categories`` is set when it is a grouping."""
    name: str
    tasks: np.ndarray               # [T]
    matrix: np.ndarray              # [T, T] float64, symmetric
    categories: np.ndarray | None   # [T] labels, or None for a free matrix

    @property
    def n_categories(self) -> int | None:
        return None if self.categories is None else len(np.unique(self.categories))


def taxonomy_from_meta(meta: Mapping[str, np.ndarray], task_column: str = "UID",
                       columns: Sequence[str] = TAXONOMY_COLUMNS) -> dict[str, dict[str, str]]:
    """``{task: {column: value}}`` from per-pair meta columns.

    Columns absent from meta are skipped; a task whose pairs disagree on a column raises
    (naming the task, column and values), since the grouping would then be ambiguous.
    """
    if task_column not in meta:
        raise ValueError(f"meta: no {task_column!r} column (have {sorted(meta)})")
    tasks = np.asarray(meta[task_column]).astype(str)
    out: dict[str, dict[str, str]] = {str(t): {} for t in np.unique(tasks)}
    for col in columns:
        if col not in meta:
            continue
        values = np.asarray(meta[col]).astype(str)
        if values.shape != tasks.shape:
            raise ValueError(f"meta[{col!r}]: shape {values.shape} != {task_column} {tasks.shape}")
        for t in out:
            vals = np.unique(values[tasks == t])
            if len(vals) > 1:
                raise ValueError(f"meta[{col!r}]: task {t!r} has several values {vals.tolist()}")
            out[t][col] = str(vals[0])
    return out


def categorical(tasks: Sequence[str], categories: Sequence[Any], name: str) -> Hypothesis:
    """Hypothesis matrix from one category label per task (1 same category, 0 otherwise)."""
    tasks = np.asarray(tasks).astype(str)
    cats = np.asarray(categories).astype(str)
    if cats.shape != tasks.shape:
        raise ValueError(f"hypothesis {name!r}: {len(cats)} categories for {len(tasks)} tasks")
    mat = (cats[:, None] == cats[None, :]).astype(np.float64)
    return Hypothesis(name, tasks, mat, cats)


def hypothesis_matrix(tasks: Sequence[str], taxonomy: Mapping[str, Any],
                      by: str = "linguistics_term") -> Hypothesis:
    """Categorical hypothesis from a taxonomy ``{task: {by: category}}`` (or ``{task: category}``).

    Tasks missing from the taxonomy, or lacking the ``by`` field, raise a ValueError listing them.
    """
    tasks = np.asarray(tasks).astype(str)
    missing, cats = [], []
    for t in tasks:
        entry = taxonomy.get(t)
        value = entry.get(by) if isinstance(entry, Mapping) else entry
        if value is None:
            missing.append(t)
        cats.append(value)
    if missing:
        raise ValueError(f"hypothesis {by!r}: no category for task(s) {missing}")
    return categorical(tasks, cats, by)


def _check_names(path: str, names: Sequence[str], tasks: np.ndarray) -> None:
    known = set(tasks.tolist())
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{path}: unknown task name(s) {unknown} (not in the store)")
    missing = sorted(known - set(names))
    if missing:
        raise ValueError(f"{path}: no entry for task(s) {missing}")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"{path}: duplicated task name(s) {dup}")


def _matrix_hypothesis(path: str, names: list[str], mat: np.ndarray, tasks: np.ndarray
                       ) -> Hypothesis:
    mat = np.asarray(mat, np.float64)
    if mat.shape != (len(names), len(names)):
        raise ValueError(f"{path}: matrix shape {mat.shape} does not match {len(names)} task names")
    _check_names(path, names, tasks)
    if not np.isfinite(mat).all():
        raise ValueError(f"{path}: matrix has NaN/inf entries")
    if not np.allclose(mat, mat.T):
        raise ValueError(f"{path}: hypothesis matrix is not symmetric")
    order = [names.index(t) for t in tasks]
    mat = mat[np.ix_(order, order)]
    name = os.path.basename(path)
    cats = _categories_if_grouping(mat)
    return Hypothesis(name, tasks, mat, cats)


def _categories_if_grouping(mat: np.ndarray) -> np.ndarray | None:
    """Recover category labels when a 0/1 matrix is an equivalence relation, else None."""
    off = mat.copy()
    np.fill_diagonal(off, 1.0)
    if not np.isin(off, (0.0, 1.0)).all():
        return None
    labels = np.full(len(off), -1)
    for i in range(len(off)):
        if labels[i] < 0:
            labels[off[i] == 1] = i
    grouping = (labels[:, None] == labels[None, :]).astype(float)
    return labels.astype(str) if np.array_equal(grouping, off) else None


def load_hypothesis(path: str, tasks: Sequence[str]) -> Hypothesis:
    """Hypothesis from a file, aligned to ``tasks``.

    - ``.json``: ``{task: category}`` grouping.
    - ``.csv``: square matrix with a header row of task names; each row starts with its task name
      (the header's first cell is ignored).
    - ``.npz``: arrays ``tasks`` [T] and ``matrix`` [T, T].

    Task names not in ``tasks`` raise ValueError naming them; tasks absent from the file raise
    ValueError listing them.
    """
    tasks = np.asarray(tasks).astype(str)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        with open(path) as f:
            groups = json.load(f)
        if not isinstance(groups, dict):
            raise ValueError(f"{path}: expected a JSON object {{task: category}}, "
                             f"got {type(groups).__name__}")
        bad = [k for k, v in groups.items() if not isinstance(v, (str, int))]
        if bad:
            raise ValueError(f"{path}: category must be a string or int for task(s) {bad}")
        _check_names(path, list(groups), tasks)
        return categorical(tasks, [str(groups[t]) for t in tasks], os.path.basename(path))
    if ext == ".csv":
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if not rows:
            raise ValueError(f"{path}: empty file")
        header = [c.strip() for c in rows[0][1:]]
        mat, row_names = [], []
        for line, r in enumerate(rows[1:], start=2):
            if len(r) != len(header) + 1:
                raise ValueError(f"{path}:{line}: expected {len(header) + 1} cells, got {len(r)}")
            row_names.append(r[0].strip())
            try:
                mat.append([float(c) for c in r[1:]])
            except ValueError as e:
                raise ValueError(f"{path}:{line}: non-numeric cell ({e})") from None
        if row_names != header:
            raise ValueError(f"{path}: row names {row_names} differ from header {header}")
        return _matrix_hypothesis(path, header, np.array(mat), tasks)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            for key in ("tasks", "matrix"):
                if key not in z:
                    raise ValueError(f"{path}: missing array {key!r} (have {list(z.keys())})")
            return _matrix_hypothesis(path, z["tasks"].astype(str).tolist(), z["matrix"], tasks)
    raise ValueError(f"{path}: unsupported hypothesis file type {ext!r} (use .json, .csv or .npz)")


def resolve_hypothesis(spec: str, tasks: Sequence[str],
                       taxonomy: Mapping[str, Mapping[str, str]] | None) -> Hypothesis:
    """``spec`` is a taxonomy column (``linguistics_term``, ``field``) or a hypothesis file path."""
    if spec in TAXONOMY_COLUMNS or (taxonomy and not os.path.exists(spec)
                                    and any(spec in v for v in taxonomy.values())):
        if not taxonomy:
            raise ValueError(f"hypothesis {spec!r}: the store's meta has no taxonomy columns")
        return hypothesis_matrix(tasks, taxonomy, by=spec)
    if not os.path.exists(spec):
        raise ValueError(f"hypothesis {spec!r}: neither a taxonomy column {TAXONOMY_COLUMNS} "
                         "nor an existing file")
    return load_hypothesis(spec, tasks)
