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
from lmgrad.analysis.precondition import DAMPING
from lmgrad.analysis.task_space import CONTROL_TESTS, INTERVALS, KINDS
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
    similarity: str = option("unbiased", "Task similarity: unbiased (disattenuated cosine of task means from "
                             "U-statistics, no self-pair terms; a task whose ||mu||^2 estimate is <= 0 is "
                             "reported as undefined), raw (cosine of sample means, shrinks with fewer or "
                             "noisier pairs) or pair (mean cosine over pairs of pairs). All three are saved; "
                             "this one is tested and reported.", choices=KINDS)
    interval: str = option("jackknife", "Per-entry interval: jackknife (delete-one-pair, normal; unbiased "
                           "only), bca or percentile (stratified bootstrap, n_boot resamples).",
                           choices=INTERVALS)
    group_by: str = option("layer", "How per-module sketch blocks are grouped for the per-group view.",
                           choices=("layer", "module_type", "block"))
    n_boot: int = option(200, "Bootstrap resamples for co-clustering (and for bca/percentile intervals).")
    n_perm: int = option(1000, "Permutations of every permutation test (Mantel, within-between, ARI, "
                         "controlled MRQAP, surface fits); p-values at the floor print as p <= 1/(n_perm+1).")
    n_splits: int = option(20, "Random split-halves for the reliability estimate.")
    surface_controls: bool = option(True, "Build surface task spaces from the pairs' sentences (word overlap "
                                    "of what differs, bag of words, length) and lead with the hypothesis "
                                    "test controlled for them.")
    control_test: str = option("freedman_lane", "Controlled test: MRQAP with Freedman-Lane permutations "
                               "(Dekker, Krackhardt & Snijders 2007), MRQAP double semi-partialling (dsp), "
                               "or the partial Mantel test.", choices=CONTROL_TESTS)
    robustness: bool = option(True, "Robustness table: headline statistics under equal block weighting, "
                              "without norms, without embedding/head, and preconditioned.")
    precondition_reference: str = option("pairs", "Reference set of the curvature preconditioner: 'pairs' "
                                         "(the analysed pairs' own differential sketches) or a store "
                                         "directory with the same layout.")
    damping: float = option(DAMPING, "Preconditioner damping: delta_b = damping * tr(Sigma_b) / d_b per block.")
    n_clusters: int = option(0, "Clusters for bootstrap co-clustering (0: as many as hypothesis categories; "
                             "a free-matrix hypothesis then skips co-clustering).")
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
        if self.interval == "jackknife" and self.similarity != "unbiased":
            raise ValueError(f"TaskSpaceOptions.interval='jackknife' is for similarity='unbiased' only; "
                             f"use interval='bca' or 'percentile' with similarity={self.similarity!r}")
        if self.damping <= 0:
            raise ValueError(f"TaskSpaceOptions.damping must be > 0, got {self.damping}")
        if self.n_clusters < 0 or self.n_clusters == 1:
            raise ValueError(f"TaskSpaceOptions.n_clusters must be 0 (from the hypothesis) or >= 2, "
                             f"got {self.n_clusters}")


def _reference(o: TaskSpaceOptions, st: Any) -> tuple[np.ndarray | None, str | None]:
    if o.precondition_reference == "pairs" or not o.robustness:
        return None, None
    path = o.precondition_reference
    ref = _open(path, o.allow_incomplete)
    if list(ref.layout) != list(st.layout):
        raise ValueError(f"precondition_reference {path}: its layout differs from the store's")
    return np.asarray(ref.sketches), f"the store {os.path.abspath(path)} ({len(ref)} rows)"


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
    reference, reference_name = _reference(o, st)
    result = analyze(sketches, tasks, hyp, layout=st.layout, meta=meta, kind=o.similarity,
                     interval=o.interval, group_by=o.group_by, n_boot=o.n_boot, n_perm=o.n_perm,
                     n_splits=o.n_splits, seed=o.resample_seed, surface=o.surface_controls,
                     control_test=o.control_test, robustness=o.robustness, damping=o.damping,
                     reference=reference, reference_name=reference_name, n_clusters=o.n_clusters,
                     sketch_b=sketch_b, tasks_b=tasks_b)
    provenance = provenance_from_manifest(st.manifest)
    provenance["store"] = os.path.abspath(store)
    if store_b:
        provenance["store_b"] = os.path.abspath(store_b)
    log.info("task-space timings (s): %s", result.timings)
    return save(result, str(workdir), provenance)
