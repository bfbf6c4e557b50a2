"""Analyse one task space and save it: sketches → matrices, uncertainty, hypothesis tests, files.

``analyze`` is pure (arrays in, a `TaskSpaceResult` out); ``save`` writes the npz, stats.json,
figures and report.md, each atomically (a reader never sees a half-written file). The launch
script ``launch/task_space.py`` is a thin wrapper over the two.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmgrad import io as lio
from lmgrad.analysis import figures, report
from lmgrad.analysis.hypothesis import Hypothesis
from lmgrad.analysis.result import TaskSpaceResult
from lmgrad.analysis.space import (block_similarities_from_means, check_sketches,
                                   is_global_layout, normalize_layout, pair_cosine_matrix,
                                   require_pairs, require_tasks, similarity, task_index,
                                   task_means)
from lmgrad.analysis.stats import (StatResult, cluster_agreement, compare_task_spaces, jsonable,
                                   mantel, min_attainable_p, offdiag_correlation, within_between)
from lmgrad.analysis.uncertainty import bootstrap_similarity, split_half_reliability


def analyze(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, hypothesis: Hypothesis, *,
            layout: Sequence[Mapping[str, Any]] | None = None, kind: str = "cosine",
            group_by: str = "layer", n_boot: int = 200, n_perm: int = 1000, n_splits: int = 20,
            seed: int = 0, alpha: float = 0.05, ci_method: str = "percentile", sketch_b: np.ndarray | None = None,
            tasks_b: Sequence[Any] | None = None) -> TaskSpaceResult:
    """Task space of ``sketch_nk`` compared with ``hypothesis``; optional second store
    (``sketch_b``/``tasks_b``, same tasks) for the sketch-error check.

    Raises ValueError for < 2 tasks, a task with < 2 pairs (named), NaN rows (named), or a
    hypothesis over different tasks. Statistics needing >= 3 tasks are skipped with a note.
    """
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    names, idx = task_index(labels)
    require_tasks(names)
    counts = np.bincount(idx, minlength=len(names))
    require_pairs(names, counts, 2, "task-space analysis")
    if list(hypothesis.tasks) != list(names):
        raise ValueError(f"hypothesis {hypothesis.name!r} is over tasks "
                         f"{list(hypothesis.tasks)[:5]}..., expected the store's {list(names)[:5]}...")
    layout = normalize_layout(layout, sketch_nk.shape[1])
    _, means = task_means(sketch_nk, labels)
    sim = similarity(means, kind)
    global_only = is_global_layout(layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # global layout is reported, not warned
        groups = block_similarities_from_means(means, layout, "block" if global_only else group_by,
                                               kind)
    _, _, pcos = pair_cosine_matrix(sketch_nk, labels)
    boot = bootstrap_similarity(sketch_nk, labels, n_boot=n_boot, seed=seed, kind=kind,
                                alpha=alpha, method=ci_method)
    rel = split_half_reliability(sketch_nk, labels, n_splits=n_splits, seed=seed, kind=kind)

    stats: dict[str, StatResult] = {}
    if len(names) >= 3:
        stats["spearman"] = offdiag_correlation(sim, hypothesis.matrix, "spearman")
        stats["pearson"] = offdiag_correlation(sim, hypothesis.matrix, "pearson")
        stats["mantel"] = mantel(sim, hypothesis.matrix, n_perm=n_perm, seed=seed)
        if hypothesis.categories is not None:
            stats["within_between"] = within_between(sim, hypothesis.categories, n_perm=n_perm,
                                                     seed=seed)
            if np.isfinite(sim).all():
                stats["cluster_ari"] = cluster_agreement(sim, hypothesis.categories,
                                                         n_perm=n_perm, seed=seed)
    check = None
    if sketch_b is not None:
        if tasks_b is None:
            raise ValueError("sketch_b given without tasks_b")
        names_b, means_b = task_means(sketch_b, tasks_b)
        check = compare_task_spaces(sim, similarity(means_b, kind), names, names_b)
    settings = dict(kind=kind, group_by=group_by, n_boot=n_boot, n_perm=n_perm,
                    n_splits=n_splits, seed=seed, alpha=alpha, ci_method=ci_method, k=int(sketch_nk.shape[1]),
                    n_pairs=int(sketch_nk.shape[0]), n_tasks=int(len(names)))
    return TaskSpaceResult(names, counts, kind, sim, pcos, group_by, groups, global_only, boot,
                           rel, hypothesis, stats, check, settings)


def _group_key(name: str) -> str:
    return "layer_" + name.replace("/", "_")


def stats_dict(result: TaskSpaceResult, provenance: Mapping[str, Any] | None = None) -> dict:
    """JSON-ready summary of every statistic (what stats.json holds)."""
    bw = result.bootstrap.width
    iu = np.triu_indices(len(result.names), 1)
    coh = np.diag(result.pair_cosine)
    return jsonable({
        "settings": result.settings,
        "provenance": dict(provenance or {}),
        "hypothesis": {"name": result.hypothesis.name,
                       "n_categories": result.hypothesis.n_categories,
                       "min_attainable_p": (min_attainable_p(result.hypothesis.categories)
                                            if result.hypothesis.categories is not None
                                            else None)},
        "n_tasks": len(result.names),
        "pairs_per_task": {"min": int(result.counts.min()), "median": float(np.median(result.counts)),
                           "max": int(result.counts.max())},
        "counts": dict(zip(result.names.tolist(), result.counts.tolist())),
        "tests": {k: v.as_dict() for k, v in result.stats.items()},
        "reliability": result.reliability.as_dict(),
        "bootstrap": {"n_boot": result.bootstrap.n_boot, "alpha": result.bootstrap.alpha,
                      "method": result.bootstrap.method,
                      "n_estimate_outside": int(np.sum(
                          (result.similarity[iu] < result.bootstrap.low[iu])
                          | (result.similarity[iu] > result.bootstrap.high[iu]))),
                      "ci_width_median": float(np.nanmedian(bw[iu])) if np.isfinite(bw[iu]).any()
                      else None,
                      "ci_width_max": float(np.nanmax(bw[iu])) if np.isfinite(bw[iu]).any()
                      else None},
        "coherence": dict(zip(result.names.tolist(), coh.tolist())),
        "offdiag_similarity": {"mean": float(np.nanmean(result.similarity[iu])),
                               "min": float(np.nanmin(result.similarity[iu])),
                               "max": float(np.nanmax(result.similarity[iu]))},
        "groups": list(result.groups),
        "global_only": result.global_only,
        "sketch_check": result.sketch_check.as_dict() if result.sketch_check else None,
    })


def save(result: TaskSpaceResult, workdir: str, provenance: Mapping[str, Any] | None = None
         ) -> dict[str, str]:
    """Write task_space.npz, stats.json, heatmap.png, layers.png, hypothesis.png, report.md
    (each atomically); returns ``{kind: path}``."""
    os.makedirs(workdir, exist_ok=True)
    paths = {k: os.path.join(workdir, f) for k, f in [
        ("npz", "task_space.npz"), ("stats", "stats.json"), ("heatmap", "heatmap.png"),
        ("layers", "layers.png"), ("hypothesis", "hypothesis.png"), ("report", "report.md")]}
    group_names = list(result.groups)
    arrays = {"similarity": result.similarity, "tasks": result.names.astype(str),
              "counts": result.counts, "ci_low": result.bootstrap.low,
              "ci_high": result.bootstrap.high, "pair_cosine": result.pair_cosine,
              "coherence": np.diag(result.pair_cosine), "hypothesis": result.hypothesis.matrix,
              "groups": np.array(group_names, dtype=str),
              "group_similarity": np.stack([result.groups[g] for g in group_names]),
              "group_by": np.array("block" if result.global_only else result.group_by),
              "kind": np.array(result.kind)}
    if result.hypothesis.categories is not None:
        arrays["categories"] = result.hypothesis.categories.astype(str)
    for g in group_names:
        arrays[_group_key(g)] = result.groups[g]
    lio.write_npz(paths["npz"], **arrays)

    summary = stats_dict(result, provenance)
    lio.write_json(paths["stats"], summary, indent=2, allow_nan=False)

    cats = result.hypothesis.categories
    order = figures.plot_heatmap(result.similarity, result.names, paths["heatmap"],
                                 categories=cats,
                                 title=f"Task similarity ({result.kind}), clustered; colour bar: "
                                       f"{result.hypothesis.name}")
    note = ("single global sketch block: no per-layer view" if result.global_only else
            f"Task similarity per {result.group_by} (same task order as the heatmap)")
    figures.plot_groups(result.groups, result.names, order, paths["layers"], note=note)
    figures.plot_hypothesis(result.similarity, result.hypothesis.matrix, paths["hypothesis"],
                            categorical=cats is not None,
                            title=f"similarity vs {result.hypothesis.name}")
    lio.write_text(paths["report"], report.render(result, summary, provenance or {}))
    return paths
