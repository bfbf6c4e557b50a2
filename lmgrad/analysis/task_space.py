"""Analyse one task space and save it: sketches → matrices, uncertainty, controlled tests, files.

``analyze`` is pure (arrays in, a `TaskSpaceResult` out); ``save`` writes the npz, stats.json,
figures and report.md, each atomically (a reader never sees a half-written file). The stage
``lmgrad.jobs.task_space`` is a thin wrapper over the two.

What the analysis estimates, in order of the report:

1. The task space: by default the unbiased (U-statistic) disattenuated cosine of task mean
   differentials (:mod:`lmgrad.analysis.estimators`), with delete-one-pair jackknife intervals; a
   task whose ‖μ‖² estimate is ≤ 0 is *undefined* (its signal is below the noise at this sample
   size): it is named, gets NaN rows, and is left out of every test. The raw cosine of means and
   the mean pair cosine are kept as named alternatives.
2. The hypothesis test controlled for surface similarity (:mod:`lmgrad.analysis.surface`: MRQAP
   with Freedman–Lane permutations, Dekker, Krackhardt & Snijders 2007), next to the uncontrolled
   Mantel test and each surface space's own fit to the hypothesis.
3. The same statistics under other geometries (:mod:`lmgrad.analysis.geometry`): equal block
   weighting, without norms, without embedding/head, preconditioned.
4. Stability of the structure: bootstrap co-clustering (:mod:`lmgrad.analysis.stability`).

Everything runs on N × N Gram matrices of the rows (one pass over the K columns), so the cost of
resampling does not grow with K.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmgrad import io as lio
from lmgrad.analysis import estimators as est
from lmgrad.analysis import figures, report
from lmgrad.analysis import stability as stab
from lmgrad.analysis import surface as surf
from lmgrad.analysis.geometry import GEOMETRIES, gram_pass, moments_from_gram, rows_from_gram
from lmgrad.analysis.hypothesis import Hypothesis
from lmgrad.analysis.precondition import DAMPING
from lmgrad.analysis.result import RobustnessRow, Stability, TaskSpaceResult
from lmgrad.analysis.space import (check_sketches, is_global_layout, require_pairs,
                                   require_tasks, task_index)
from lmgrad.analysis.stats import (StatResult, cluster_agreement, compare_task_spaces, jsonable,
                                   mantel, min_attainable_p, offdiag_correlation, within_between)
from lmgrad.analysis.threads import blas_threads
from lmgrad.analysis.uncertainty import Reliability

KINDS = est.KINDS
INTERVALS = est.INTERVAL_METHODS
CONTROL_TESTS = (surf.FREEDMAN_LANE, surf.DSP, "partial_mantel")
SENTENCE_COLUMNS = ("sentence_good", "sentence_bad")
TOKEN_COLUMNS = ("n_tokens_good", "n_tokens_bad")
NO_SENTENCES = "surface controls unavailable: store has no sentences"


# ---------------------------------------------------------------------------------------------
# Surface spaces from the store's meta
# ---------------------------------------------------------------------------------------------

def surface_from_meta(meta: Mapping[str, Any] | None, labels: np.ndarray
                      ) -> tuple[surf.SurfaceSpaces | None, str | None]:
    """Surface task spaces from per-row ``sentence_good``/``sentence_bad`` (and ``n_tokens_*``).

    Returns ``(spaces, note)``; spaces is None with the note :data:`NO_SENTENCES` when the store
    predates sentences in meta. Token lengths add ``length_tokens`` (−|Δ mean tokens|); token
    ids are not stored, so token-overlap spaces are not built.
    """
    if meta is None or any(c not in meta for c in SENTENCE_COLUMNS):
        return None, NO_SENTENCES
    good, bad = (np.asarray(meta[c]).astype(str) for c in SENTENCE_COLUMNS)
    if good.shape != labels.shape or bad.shape != labels.shape:
        raise ValueError(f"meta sentences: {good.shape[0]} rows for {labels.shape[0]} sketch rows")
    empty = (np.char.str_len(good) == 0) | (np.char.str_len(bad) == 0)
    if empty.any():
        return None, (f"{NO_SENTENCES} for {int(empty.sum())} row(s) (e.g. task "
                      f"{labels[np.flatnonzero(empty)[0]]})")
    pairs: dict[str, list[tuple[str, str]]] = {}
    for lab, g, b in zip(labels, good, bad):
        pairs.setdefault(str(lab), []).append((str(g), str(b)))
    sp = surf.surface_spaces(pairs)
    notes = []
    undefined = [str(n) for n, v in zip(sp.names, np.diag(sp.spaces["diff_words"]))
                 if not np.isfinite(v)]
    if undefined:
        notes.append(f"diff_words undefined for {', '.join(undefined)} (their pairs differ only "
                     "in word order): overlap set to 0 in the tests")
    if all(c in meta for c in TOKEN_COLUMNS):
        ntok = (np.asarray(meta[TOKEN_COLUMNS[0]], np.float64)
                + np.asarray(meta[TOKEN_COLUMNS[1]], np.float64)) / 2
        names, idx = task_index(labels)
        mean_len = np.bincount(idx, ntok, len(names)) / np.bincount(idx, minlength=len(names))
        sp.spaces["length_tokens"] = -np.abs(mean_len[:, None] - mean_len[None, :])
        sp.description["length_tokens"] = "-|difference of mean sentence length in tokens|"
    return sp, "; ".join(notes) or None


def _controls(sp: surf.SurfaceSpaces, keep: np.ndarray) -> list[np.ndarray]:
    return [np.nan_to_num(m, nan=0.0)[np.ix_(keep, keep)] for m in sp.spaces.values()]


def _controlled_test(y: np.ndarray, hyp: np.ndarray, controls: list[np.ndarray], names: np.ndarray,
                     *, method: str, n_perm: int, seed: int) -> surf.PermutationTest:
    if method == "partial_mantel":
        return surf.partial_mantel(y, hyp, controls, n_perm=n_perm, seed=seed, names=names)
    return surf.mrqap(y, [hyp, *controls], n_perm=n_perm, seed=seed, method=method, names=names)


# ---------------------------------------------------------------------------------------------
# Tests of one task space against the hypothesis, over its defined tasks
# ---------------------------------------------------------------------------------------------

def hypothesis_tests(sim: np.ndarray, hypothesis: Hypothesis, keep: np.ndarray, *, n_perm: int,
                     seed: int, full: bool = True) -> dict[str, StatResult]:
    """Mantel, within/between and ARI (``full``: also Spearman/Pearson) over tasks ``keep``."""
    out: dict[str, StatResult] = {}
    if len(keep) < 3:
        return out
    s = sim[np.ix_(keep, keep)]
    h = hypothesis.matrix[np.ix_(keep, keep)]
    if full:
        out["spearman"] = offdiag_correlation(s, h, "spearman")
        out["pearson"] = offdiag_correlation(s, h, "pearson")
    out["mantel"] = mantel(s, h, n_perm=n_perm, seed=seed)
    if hypothesis.categories is not None:
        cats = hypothesis.categories[keep]
        out["within_between"] = within_between(s, cats, n_perm=n_perm, seed=seed)
        if 1 < len(np.unique(cats)) < len(cats) and np.isfinite(s).all():
            out["cluster_ari"] = cluster_agreement(s, cats, n_perm=n_perm, seed=seed)
    return out


def _n_clusters(n_clusters: int, hypothesis: Hypothesis, t: int) -> tuple[int | None, str]:
    if n_clusters:
        k = n_clusters
        how = f"{k} clusters (n_clusters)"
    elif hypothesis.categories is not None:
        k = hypothesis.n_categories
        how = f"{k} clusters, as many as `{hypothesis.name}` categories"
    else:
        return None, ("co-clustering skipped: the hypothesis is a free matrix; set n_clusters to "
                      "choose the number of clusters")
    if not 2 <= k < t:
        return None, f"co-clustering skipped: {k} clusters for {t} tasks"
    return k, how


def analyze(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, hypothesis: Hypothesis, *,
            layout: Sequence[Mapping[str, Any]] | None = None,
            meta: Mapping[str, Any] | None = None, kind: str = "unbiased",
            interval: str = "jackknife", group_by: str = "layer", n_boot: int = 200,
            n_perm: int = 1000, n_splits: int = 20, seed: int = 0, alpha: float = 0.05,
            surface: bool = True, control_test: str = surf.FREEDMAN_LANE,
            robustness: bool = True, damping: float = DAMPING,
            reference: np.ndarray | None = None, reference_name: str | None = None,
            n_clusters: int = 0, sketch_b: np.ndarray | None = None,
            tasks_b: Sequence[Any] | None = None, n_blas_threads: int | None = 1
            ) -> TaskSpaceResult:
    """Task space of ``sketch_nk`` [N, K] compared with ``hypothesis``.

    ``meta`` (per-row columns; ``sentence_good``/``sentence_bad``/``n_tokens_*``) feeds the surface
    controls; ``reference`` [M, K] (same layout) is the preconditioner's reference set (None: the
    analysed pairs' own differential sketches); ``sketch_b``/``tasks_b`` is a second store over
    the same tasks for the sketch-error check. One ``seed`` drives every resampling step.

    Raises ValueError for < 2 tasks, a task with < 2 pairs (named), NaN rows (named), or a
    hypothesis over different tasks. Runs with ``n_blas_threads`` BLAS threads (default 1, see
    :mod:`lmgrad.analysis.threads`; None leaves the library's setting).
    """
    with blas_threads(n_blas_threads):
        return _analyze(sketch_nk, tasks, hypothesis, layout=layout, meta=meta, kind=kind,
                        interval=interval, group_by=group_by, n_boot=n_boot, n_perm=n_perm,
                        n_splits=n_splits, seed=seed, alpha=alpha, surface=surface,
                        control_test=control_test, robustness=robustness, damping=damping,
                        reference=reference, reference_name=reference_name,
                        n_clusters=n_clusters, sketch_b=sketch_b, tasks_b=tasks_b)


def _analyze(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, hypothesis: Hypothesis, *,
            layout: Sequence[Mapping[str, Any]] | None = None,
            meta: Mapping[str, Any] | None = None, kind: str = "unbiased",
            interval: str = "jackknife", group_by: str = "layer", n_boot: int = 200,
            n_perm: int = 1000, n_splits: int = 20, seed: int = 0, alpha: float = 0.05,
            surface: bool = True, control_test: str = surf.FREEDMAN_LANE,
            robustness: bool = True, damping: float = DAMPING,
            reference: np.ndarray | None = None, reference_name: str | None = None,
            n_clusters: int = 0, sketch_b: np.ndarray | None = None,
            tasks_b: Sequence[Any] | None = None) -> TaskSpaceResult:
    """:func:`analyze` with the BLAS threads already set."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if interval not in INTERVALS:
        raise ValueError(f"interval: expected one of {INTERVALS}, got {interval!r}")
    if interval == "jackknife" and kind != "unbiased":
        raise ValueError(f"interval='jackknife' is implemented for kind='unbiased' only; use "
                         f"interval='bca' or 'percentile' with kind={kind!r}")
    if control_test not in CONTROL_TESTS:
        raise ValueError(f"control_test: expected one of {CONTROL_TESTS}, got {control_test!r}")
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    names, idx = task_index(labels)
    require_tasks(names)
    counts = np.bincount(idx, minlength=len(names))
    require_pairs(names, counts, 2, "task-space analysis")
    if list(hypothesis.tasks) != list(names):
        raise ValueError(f"hypothesis {hypothesis.name!r} is over tasks "
                         f"{list(hypothesis.tasks)[:5]}..., expected the store's {list(names)[:5]}...")
    n, k = sketch_nk.shape
    t = len(names)
    global_only = is_global_layout(layout)
    ref_name = reference_name or (f"the analysed pairs' own differential sketches ({n} rows)"
                                  if reference is None else f"a reference set of "
                                  f"{reference.shape[0]} rows")

    # 1. One pass over the columns: Gram matrices of every geometry, per-group moments.
    gp = gram_pass(sketch_nk, names, idx, layout, group_by=group_by,
                   geometries=GEOMETRIES if robustness else ("euclidean",), damping=damping,
                   reference=reference, reference_name=ref_name, unit_groups=kind == "pair")
    gram = gp.geometries["euclidean"].gram
    lap("gram_pass")

    # 2. The task space under every estimator; the headline one with intervals.
    mom = moments_from_gram(gram, names, idx, unit=True)
    spaces = {kd: est.similarity_from_moments(mom, kd) for kd in KINDS}
    head = spaces[kind]
    sim = head.sim
    defined = head.defined.copy()
    undefined_notes = dict(head.notes)
    keep = np.flatnonzero(defined)
    norm2 = np.diag(est.inner_products(mom)).copy()
    pair_cos = spaces["pair"].inner
    # Stand-in rows: the sketches themselves when they are narrower than N, else a Gram root.
    rows = np.asarray(sketch_nk, np.float64) if k <= n else rows_from_gram(gram)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if interval == "jackknife":
            ival = est.jackknife(rows, labels, alpha=alpha)
        else:
            ival = est.bootstrap(rows, labels, n_boot=n_boot, seed=seed, kind=kind,
                                 method=interval, alpha=alpha)
    lap("interval")
    try:
        rel = est.split_half(rows, labels, n_splits=n_splits, seed=seed, kind=kind)
    except ValueError as e:
        rel = Reliability(float("nan"), float("nan"), float("nan"), 0, t, str(e))
    groups = {g: est.similarity_from_moments(m, kind).sim for g, m in gp.groups.items()}
    lap("reliability_groups")

    # 3. Tests over the defined tasks: uncontrolled, then controlled for surface similarity.
    stats = hypothesis_tests(sim, hypothesis, keep, n_perm=n_perm, seed=seed)
    sp, surface_note = (surface_from_meta(meta, labels) if surface
                        else (None, "surface controls switched off (surface_controls=False)"))
    fits: dict[str, StatResult] = {}
    controlled = None
    if sp is not None:
        if list(sp.names) != list(names):
            raise ValueError("surface spaces: task order differs from the sketches'")
        fits = surf.surface_fits(sp, hypothesis.matrix, n_perm=n_perm, seed=seed)
        try:
            controlled = _controlled_test(sim[np.ix_(keep, keep)],
                                          hypothesis.matrix[np.ix_(keep, keep)],
                                          _controls(sp, keep), names[keep], method=control_test,
                                          n_perm=n_perm, seed=seed)
        except ValueError as e:
            surface_note = "; ".join(filter(None, [surface_note,
                                                   f"controlled test not possible: {e}"]))
    lap("tests")

    # 4. Robustness: the same statistics under each geometry.
    rob: list[RobustnessRow] = []
    for name, geo in gp.geometries.items():
        if geo.gram is None:
            rob.append(RobustnessRow(name, geo.label, geo.note, False))
            continue
        if name == "euclidean":
            g_sim, g_def, g_tests, g_ctrl = sim, defined, stats, controlled
        else:
            g_sp = est.similarity_from_moments(
                moments_from_gram(geo.gram, names, idx, unit=kind == "pair"), kind)
            g_sim, g_def = g_sp.sim, g_sp.defined
            g_keep = np.flatnonzero(g_def)
            g_tests = hypothesis_tests(g_sim, hypothesis, g_keep, n_perm=n_perm, seed=seed,
                                       full=False)
            g_ctrl = None
            if sp is not None and controlled is not None:
                try:
                    g_ctrl = _controlled_test(g_sim[np.ix_(g_keep, g_keep)],
                                              hypothesis.matrix[np.ix_(g_keep, g_keep)],
                                              _controls(sp, g_keep), names[g_keep],
                                              method=control_test, n_perm=n_perm, seed=seed)
                except ValueError:
                    g_ctrl = None
        both = np.flatnonzero(defined & g_def)
        agree = None
        if len(both) >= 3:
            agree = compare_task_spaces(sim[np.ix_(both, both)],
                                        g_sim[np.ix_(both, both)]).statistic
        rob.append(RobustnessRow(name, geo.label, geo.note, True,
                                 [str(x) for x in names[~g_def]], dict(g_tests), g_ctrl, agree))
    lap("robustness")

    # 5. Stability of the structure: bootstrap co-clustering.
    n_cl, how = _n_clusters(n_clusters, hypothesis, t)
    stability, stability_note = None, None
    if n_cl is None:
        stability_note = how
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cc = stab.bootstrap_coclustering(rows, labels, n_cl, n_boot=n_boot, seed=seed,
                                             kind=kind)
        cat_blocks = (stab.block_stability(cc, hypothesis.categories)
                      if hypothesis.categories is not None else None)
        stability = Stability(cc, cat_blocks, stab.block_stability(cc), how)
    lap("stability")

    # 6. Sketch-error check against a second store over the same pairs (another projection).
    # On the raw cosine, always defined: both stores hold the same pairs, so the sampling noise
    # is shared and what differs is sketch error; the headline estimator's agreement, over the
    # tasks defined in both, is reported beside it.
    check = None
    if sketch_b is not None:
        if tasks_b is None:
            raise ValueError("sketch_b given without tasks_b")
        mb = est.task_moments(sketch_b, tasks_b, unit=kind == "pair")
        raw_b = est.similarity_from_moments(mb, "raw")
        check = compare_task_spaces(spaces["raw"].sim, raw_b.sim, names, raw_b.names)
        check.extra["estimator"] = "raw"
        if kind != "raw":
            head_b = est.similarity_from_moments(mb, kind)
            order = [list(head_b.names).index(x_) for x_ in names]
            both = np.flatnonzero(defined & head_b.defined[order])
            hc = (compare_task_spaces(sim[np.ix_(both, both)],
                                      head_b.sim[np.ix_(order, order)][np.ix_(both, both)])
                  if len(both) >= 3 else None)
            check.extra[kind] = None if hc is None else {
                "r": hc.statistic, "n": hc.n, "interpretation": hc.interpretation}
            check.interpretation = (f"raw cosine: {check.interpretation}; {kind}: "
                                    + (hc.interpretation if hc is not None else
                                       "fewer than 3 tasks defined in both stores"))
    lap("sketch_check")

    warn = []
    if not defined.all():
        warn.append(f"{int((~defined).sum())} task(s) undefined under the {kind} estimator and "
                    f"left out of every test: " + "; ".join(f"{n_} ({why})" for n_, why
                                                            in undefined_notes.items()))
    warn += list(ival.warnings)  # the regime warnings cite the coverage map themselves
    if stability is not None and stability.coclustering.n_with_undefined:
        warn.append(f"co-clustering: {stability.coclustering.n_with_undefined} of {n_boot} "
                    "resamples had undefined entries (counted as similarity 0)")
    settings = dict(kind=kind, interval=interval, group_by=group_by, n_boot=n_boot,
                    n_perm=n_perm, n_splits=n_splits, seed=seed, alpha=alpha,
                    surface_controls=surface, control_test=control_test, robustness=robustness,
                    damping=damping, preconditioner_reference=ref_name, n_clusters=n_clusters,
                    k=int(k), n_pairs=int(n), n_tasks=int(t))
    return TaskSpaceResult(names, counts, kind, sim, {kd: s.sim for kd, s in spaces.items()},
                           norm2, defined, undefined_notes, pair_cos, ival, group_by, groups,
                           global_only, rel, hypothesis, stats, controlled, sp, fits,
                           surface_note, rob, stability, stability_note, gp.preconditioner,
                           check, warn, settings, timings)


# ---------------------------------------------------------------------------------------------
# stats.json, npz, figures, report
# ---------------------------------------------------------------------------------------------

def _group_key(name: str) -> str:
    return "layer_" + name.replace("/", "_")


def _summary_of(mat: np.ndarray) -> dict[str, float | None]:
    iu = np.triu_indices(len(mat), 1)
    v = mat[iu]
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def stats_dict(result: TaskSpaceResult, provenance: Mapping[str, Any] | None = None) -> dict:
    """JSON-ready summary of every statistic (what stats.json holds)."""
    r = result
    iu = np.triu_indices(len(r.names), 1)
    width = (r.interval.high - r.interval.low)[iu]
    ok = np.isfinite(width)
    coh = np.diag(r.pair_cosine)
    names = r.names.tolist()
    stab_d = None
    if r.stability is not None:
        cc = r.stability.coclustering
        stab_d = {"k": cc.k, "how_k": r.stability.how_k, "n_boot": cc.n_boot, "kind": cc.kind,
                  "n_with_undefined": cc.n_with_undefined,
                  "clusters_full_data": dict(zip(names, cc.labels.tolist())),
                  "categories": r.stability.categories, "clusters": r.stability.clusters,
                  "thresholds": {"stable": stab.STABLE, "dissolved": stab.DISSOLVED,
                                 "reference": "Hennig (2007), CSDA 52:258-271"}}
    headline = None
    if r.controlled is not None:
        headline = {"test": "controlled", **r.controlled.as_dict()}
    elif "mantel" in r.stats:
        headline = {"test": "uncontrolled_mantel", **r.stats["mantel"].as_dict(),
                    "note": r.surface_note}
    return jsonable({
        "settings": r.settings,
        "provenance": dict(provenance or {}),
        "hypothesis": {"name": r.hypothesis.name, "n_categories": r.hypothesis.n_categories,
                       "min_attainable_p": (min_attainable_p(r.hypothesis.categories)
                                            if r.hypothesis.categories is not None else None)},
        "n_tasks": len(r.names),
        "pairs_per_task": {"min": int(r.counts.min()), "median": float(np.median(r.counts)),
                           "max": int(r.counts.max())},
        "counts": dict(zip(names, r.counts.tolist())),
        "headline": headline,
        "similarity": {"kind": r.kind, "alternatives": sorted(r.alternatives),
                       "defined": dict(zip(names, r.defined.tolist())),
                       "undefined": r.undefined_notes,
                       "norm2_estimate": dict(zip(names, r.norm2.tolist())),
                       "offdiag": {kd: _summary_of(m) for kd, m in r.alternatives.items()}},
        "interval": {"method": r.interval.method, "alpha": r.interval.alpha,
                     "n_boot": r.settings["n_boot"] if r.interval.method != "jackknife" else None,
                     "width_median": float(np.median(width[ok])) if ok.any() else None,
                     "width_max": float(np.max(width[ok])) if ok.any() else None,
                     "n_undefined_entries": int((~ok).sum()), "warnings": r.interval.warnings},
        "tests": {kk: v.as_dict() for kk, v in r.stats.items()},
        "controlled": r.controlled.as_dict() if r.controlled is not None else None,
        "surface": {"available": r.surface is not None, "note": r.surface_note,
                    "spaces": dict(r.surface.description) if r.surface is not None else {},
                    "fits": {kk: v.as_dict() for kk, v in r.surface_fits.items()}},
        "robustness": [row.as_dict() for row in r.robustness],
        "preconditioner": r.preconditioner,
        "stability": stab_d, "stability_note": r.stability_note,
        "reliability": r.reliability.as_dict(),
        "coherence": dict(zip(names, coh.tolist())),
        "offdiag_similarity": _summary_of(r.similarity),
        "groups": list(r.groups),
        "global_only": r.global_only,
        "sketch_check": r.sketch_check.as_dict() if r.sketch_check else None,
        "warnings": r.warnings,
        "timings_s": r.timings,
    })


def save(result: TaskSpaceResult, workdir: str, provenance: Mapping[str, Any] | None = None
         ) -> dict[str, str]:
    """Write task_space.npz, stats.json, heatmap.png, layers.png, hypothesis.png,
    coclustering.png (when co-clustering ran) and report.md, each atomically; returns
    ``{kind: path}``."""
    os.makedirs(workdir, exist_ok=True)
    files = [("npz", "task_space.npz"), ("stats", "stats.json"), ("heatmap", "heatmap.png"),
             ("layers", "layers.png"), ("hypothesis", "hypothesis.png"), ("report", "report.md")]
    if result.stability is not None:
        files.append(("coclustering", "coclustering.png"))
    paths = {kk: os.path.join(workdir, f) for kk, f in files}
    r = result
    group_names = list(r.groups)
    arrays = {"similarity": r.similarity, "tasks": r.names.astype(str), "counts": r.counts,
              "kind": np.array(r.kind), "defined": r.defined, "norm2": r.norm2,
              "ci_low": r.interval.low, "ci_high": r.interval.high, "ci_se": r.interval.se,
              "interval": np.array(r.interval.method),
              "pair_cosine": r.pair_cosine, "coherence": np.diag(r.pair_cosine),
              "hypothesis": r.hypothesis.matrix,
              "groups": np.array(group_names, dtype=str),
              "group_similarity": np.stack([r.groups[g] for g in group_names]),
              "group_by": np.array("block" if r.global_only else r.group_by)}
    for kd, m in r.alternatives.items():
        arrays[f"similarity_{kd}"] = m
    if r.hypothesis.categories is not None:
        arrays["categories"] = r.hypothesis.categories.astype(str)
    for g in group_names:
        arrays[_group_key(g)] = r.groups[g]
    if r.surface is not None:
        for name_, m in r.surface.spaces.items():
            arrays[f"surface_{name_}"] = m
    if r.stability is not None:
        arrays["coclustering"] = r.stability.coclustering.co
        arrays["clusters"] = r.stability.coclustering.labels
    lio.write_npz(paths["npz"], **arrays)

    summary = stats_dict(r, provenance)
    lio.write_json(paths["stats"], summary, indent=2, allow_nan=False)

    cats = r.hypothesis.categories
    order = figures.plot_heatmap(r.similarity, r.names, paths["heatmap"], categories=cats,
                                 title=f"Task similarity ({r.kind}), clustered; colour bar: "
                                       f"{r.hypothesis.name}")
    note = ("single global sketch block: no per-layer view" if r.global_only else
            f"Task similarity per {r.group_by} (same task order as the heatmap)")
    figures.plot_groups(r.groups, r.names, order, paths["layers"], note=note)
    figures.plot_hypothesis(r.similarity, r.hypothesis.matrix, paths["hypothesis"],
                            categorical=cats is not None,
                            title=f"similarity vs {r.hypothesis.name}")
    if r.stability is not None:
        cc = r.stability.coclustering
        figures.plot_heatmap(cc.co, r.names, paths["coclustering"], categories=cats,
                             title=f"Bootstrap co-clustering ({cc.k} clusters, {cc.n_boot} "
                                   "resamples): share of resamples in one cluster")
    lio.write_text(paths["report"], report.render(r, summary, provenance or {}))
    return paths
