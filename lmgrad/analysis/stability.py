"""Stability of task-space structure under resampling of pairs.

A dendrogram cut of one task space says nothing about which of its clusters would survive another
sample of pairs. :func:`bootstrap_coclustering` resamples pairs within tasks, recomputes the task
space with the default (unbiased) estimator, clusters it, and counts how often two tasks share a
cluster; :func:`block_stability` scores each reported cluster by its mean within-cluster
co-clustering and by Hennig's (2007) clusterwise stability, the mean over resamples of the best
Jaccard match of the cluster in the resampled partition (Hennig, Cluster-wise assessment of
cluster stability, CSDA 52:258–271; ≤ 0.5 reads as dissolved, ≥ 0.75 as stable).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.cluster import hierarchy

from lmgrad.analysis.estimators import resampled_spaces, task_similarity
from lmgrad.analysis.stats import cluster_linkage

DISSOLVED, STABLE = 0.5, 0.75  # Hennig (2007)'s reading of mean Jaccard


def cluster(sim_tt: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Average-linkage clusters (distance 1 − similarity) cut into ``k``: ``(labels [T], n_nan)``.

    Undefined entries (a task whose ‖μ‖² estimate is ≤ 0) count as similarity 0, "no evidence
    of alignment", so that the task still gets a cluster; ``n_nan`` says how many there were.
    """
    sim = np.asarray(sim_tt, np.float64).copy()
    off = ~np.eye(sim.shape[0], dtype=bool)
    n_nan = int((~np.isfinite(sim) & off).sum() // 2)
    sim[~np.isfinite(sim)] = 0.0
    np.fill_diagonal(sim, 1.0)
    return hierarchy.fcluster(cluster_linkage(sim), t=k, criterion="maxclust"), n_nan


@dataclasses.dataclass
class CoClustering:
    """How often two tasks share a cluster over bootstrap resamples of pairs."""
    names: np.ndarray     # [T]
    co: np.ndarray        # [T, T] fraction of resamples in which i and j share a cluster
    labels: np.ndarray    # [T] clusters of the full-data task space
    labels_bt: np.ndarray  # [B, T] clusters of each resample
    k: int
    n_boot: int
    n_with_undefined: int  # resamples in which some entry was undefined (imputed as 0)
    kind: str


def coclustering_matrix(labels_bt: np.ndarray) -> np.ndarray:
    """[T, T] fraction of rows of ``labels_bt`` in which two items share a label."""
    lab = np.asarray(labels_bt)
    return (lab[:, :, None] == lab[:, None, :]).mean(0)


def bootstrap_coclustering(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, k: int, *,
                           n_boot: int = 200, seed: int = 0, kind: str = "unbiased"
                           ) -> CoClustering:
    """Bootstrap co-clustering of tasks into ``k`` average-linkage clusters.

    Resamples pairs within each task (as :func:`lmgrad.analysis.estimators.resampled_spaces`:
    for the unbiased kind, copies of one pair are never paired with each other) and clusters each
    resampled task space.
    """
    if k < 2:
        raise ValueError(f"k: expected >= 2 clusters, got {k}")
    full = task_similarity(x_nk, tasks, kind)
    if k > len(full.names):
        raise ValueError(f"k={k} clusters for {len(full.names)} tasks")
    labels, _ = cluster(full.sim, k)
    names, sims = resampled_spaces(x_nk, tasks, n_boot=n_boot, seed=seed, kind=kind)
    lab_bt = np.empty((n_boot, len(names)), int)
    n_undef = 0
    for b in range(n_boot):
        lab_bt[b], nan = cluster(sims[b], k)
        n_undef += nan > 0
    return CoClustering(names, coclustering_matrix(lab_bt), labels, lab_bt, k, n_boot, n_undef,
                        kind)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def block_stability(cc: CoClustering, partition: Sequence[Any] | None = None) -> list[dict]:
    """Per block of ``partition`` (default: the full-data clusters ``cc.labels``):

    ``within``: mean co-clustering over the block's task pairs (NaN for a singleton);
    ``outside``: mean co-clustering of its tasks with the other tasks;
    ``jaccard``: mean over resamples of the best Jaccard match in the resampled partition
    (Hennig 2007), with ``verdict`` ``stable`` (≥ 0.75), ``dissolved`` (≤ 0.5) or ``unclear``.
    """
    part = np.asarray(cc.labels if partition is None else partition).astype(str)
    if part.shape != cc.names.shape:
        raise ValueError(f"partition: expected {len(cc.names)} labels, got shape {part.shape}")
    out = []
    for g in sorted(set(part), key=lambda s: (len(s), s)):
        mem = part == g
        idx = np.flatnonzero(mem)
        sub = cc.co[np.ix_(idx, idx)]
        within = float(sub[~np.eye(len(idx), dtype=bool)].mean()) if len(idx) > 1 else np.nan
        outside = float(cc.co[np.ix_(idx, np.flatnonzero(~mem))].mean()) if (~mem).any() \
            else np.nan
        jac = [max(_jaccard(mem, lab == c) for c in np.unique(lab)) for lab in cc.labels_bt]
        j = float(np.mean(jac))
        verdict = "stable" if j >= STABLE else "dissolved" if j <= DISSOLVED else "unclear"
        out.append({"block": g, "tasks": [str(n) for n in cc.names[idx]], "within": within,
                    "outside": outside, "jaccard": j, "verdict": verdict})
    return out
