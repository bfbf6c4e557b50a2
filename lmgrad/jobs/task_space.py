"""The task-space stage: open a store (or two), analyse it, write every output file."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmgrad import store as lstore
from lmgrad.analysis import (analyze, check_sketches, provenance_from_manifest, resolve_hypothesis, save,
                             taxonomy_from_meta)
from lmgrad.jobs.schema import check_choices, option

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


@dataclasses.dataclass(frozen=True)
class TaskSpaceOptions:
    """How a store becomes a task space and how it is tested against a hypothesis."""

    hypothesis: str = option("linguistics_term", "Taxonomy column (linguistics_term, field) or a hypothesis "
                             "file (.json {task: category}, .csv / .npz square matrix).")
    similarity: str = option("cosine", "Similarity of task means.", choices=("cosine", "pearson"))
    group_by: str = option("layer", "How per-module sketch blocks are grouped for the per-group view.",
                           choices=("layer", "module_type", "block"))
    n_boot: int = option(200, "Bootstrap resamples for per-entry CIs.")
    ci_method: str = option("percentile", "Bootstrap interval: plain percentile or bias-corrected percentile.",
                            choices=("percentile", "bc"))
    n_perm: int = option(1000, "Permutations for Mantel / within-between / ARI tests.")
    n_splits: int = option(20, "Random split-halves for the reliability estimate.")
    resample_seed: int = option(0, "Seed of every resampling step (bootstrap, permutations, splits).")
    task_column: str = option("UID", "Meta column naming the task of each pair.")
    allow_incomplete: bool = option(False, "Analyse a store whose run has not finished.")
    nonfinite: str = option("raise", "Rows with NaN/inf: raise (naming them) or drop with a warning.",
                            choices=("raise", "drop"))

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("n_boot", "n_perm", "n_splits"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskSpaceOptions.{name} must be >= 1, got {getattr(self, name)}")


def run(options: TaskSpaceOptions, store: str | os.PathLike, workdir: str | os.PathLike, *,
        store_b: str | os.PathLike | None = None) -> Mapping[str, str]:
    """Opens the store (and `store_b`, a second store over the same tasks for the sketch-error
    check), analyses it, writes every output into `workdir`; returns ``{kind: path}``."""
    o = options
    store = str(store)
    st = _open(store, o.allow_incomplete)
    sketches, tasks = check_sketches(st.sketches, _tasks(st, store, o.task_column), nonfinite=o.nonfinite)
    names = np.unique(tasks)
    meta = {k: np.asarray(v) for k, v in st.meta.items()}
    if o.nonfinite == "drop":  # keep meta aligned with the surviving rows
        keep = np.isfinite(np.asarray(st.sketches)).all(axis=1)
        meta = {k: v[keep] for k, v in meta.items()}
    try:
        taxonomy = taxonomy_from_meta(meta, o.task_column)
    except ValueError:
        if o.hypothesis in ("linguistics_term", "field"):
            raise
        taxonomy = None
    hyp = resolve_hypothesis(o.hypothesis, names, taxonomy)
    sketch_b = tasks_b = None
    if store_b:
        store_b = str(store_b)
        st_b = _open(store_b, o.allow_incomplete)
        sketch_b, tasks_b = check_sketches(st_b.sketches, _tasks(st_b, store_b, o.task_column))
    result = analyze(sketches, tasks, hyp, layout=st.layout, kind=o.similarity, group_by=o.group_by,
                     n_boot=o.n_boot, n_perm=o.n_perm, n_splits=o.n_splits, seed=o.resample_seed,
                     ci_method=o.ci_method, sketch_b=sketch_b, tasks_b=tasks_b)
    provenance = provenance_from_manifest(st.manifest)
    provenance["store"] = os.path.abspath(store)
    if store_b:
        provenance["store_b"] = os.path.abspath(store_b)
    return save(result, str(workdir), provenance)
