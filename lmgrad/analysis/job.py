"""The task-space job: open a store (or two), analyse it, write every output file."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmgrad import store as lstore
from lmgrad.analysis.hypothesis import resolve_hypothesis, taxonomy_from_meta
from lmgrad.analysis.pipeline import analyze, save
from lmgrad.analysis.report import provenance_from_manifest
from lmgrad.analysis.space import check_sketches

log = logging.getLogger(__name__)


def _open(path: str, allow_incomplete: bool) -> Any:
    st = lstore.open(path)
    if not st.complete:
        if not allow_incomplete:
            raise ValueError(f"{path}: store is incomplete ({len(st)} of {st.total_rows} rows); "
                             "finish the run or pass --allow_incomplete")
        log.warning("%s: analysing an incomplete store (%d rows)", path, len(st))
    return st


def _tasks(st: Any, path: str, column: str) -> np.ndarray:
    if column not in st.meta:
        raise ValueError(f"{path}: meta has no {column!r} column (have {sorted(st.meta)})")
    return np.asarray(st.meta[column]).astype(str)


def run_task_space(store: str, workdir: str, hypothesis: str = "linguistics_term", *,
                   similarity: str = "cosine", group_by: str = "layer", n_boot: int = 200,
                   n_perm: int = 1000, n_splits: int = 20, seed: int = 0,
                   ci_method: str = "percentile", store_b: str | None = None, task_column: str = "UID",
                   allow_incomplete: bool = False, nonfinite: str = "raise") -> Mapping[str, str]:
    """Open the store(s), analyse, write every output; returns ``{kind: path}``."""
    st = _open(store, allow_incomplete)
    sketches, tasks = check_sketches(st.sketches, _tasks(st, store, task_column),
                                              nonfinite=nonfinite)
    names = np.unique(tasks)
    meta = {k: np.asarray(v) for k, v in st.meta.items()}
    if nonfinite == "drop":  # keep meta aligned with the surviving rows
        keep = np.isfinite(np.asarray(st.sketches)).all(axis=1)
        meta = {k: v[keep] for k, v in meta.items()}
    try:
        taxonomy = taxonomy_from_meta(meta, task_column)
    except ValueError:
        if hypothesis in ("linguistics_term", "field"):
            raise
        taxonomy = None
    hyp = resolve_hypothesis(hypothesis, names, taxonomy)
    sketch_b = tasks_b = None
    if store_b:
        st_b = _open(store_b, allow_incomplete)
        sketch_b, tasks_b = check_sketches(st_b.sketches,
                                                    _tasks(st_b, store_b, task_column))
    result = analyze(sketches, tasks, hyp, layout=st.layout, kind=similarity,
                              group_by=group_by, n_boot=n_boot, n_perm=n_perm,
                              n_splits=n_splits, seed=seed, ci_method=ci_method,
                              sketch_b=sketch_b, tasks_b=tasks_b)
    provenance = provenance_from_manifest(st.manifest)
    provenance["store"] = os.path.abspath(store)
    if store_b:
        provenance["store_b"] = os.path.abspath(store_b)
    return save(result, workdir, provenance)


