"""Comparing a task space with a hypothesis space (and with another task space).

All tests use the T(T−1)/2 off-diagonal entries. Entries of a similarity matrix are not
independent (each task appears in T−1 of them), so the parametric p-values of Spearman/Pearson
are reported for reference only; the Mantel and label-permutation tests permute *tasks*, which
respects that dependence, and are the ones to read.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from lmgrad.analysis.uncertainty import offdiag

ALPHA = 0.05


@dataclasses.dataclass
class StatResult:
    """One comparison statistic with what a reader needs to judge it."""
    name: str
    statistic: float
    p_value: float | None
    n: int                        # number of off-diagonal entries (or tasks, for clustering)
    interpretation: str
    extra: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return jsonable(d)


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars and arrays as Python values and non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def p_floor(n_perm: int | None) -> float | None:
    """Smallest p a permutation test with ``n_perm`` permutations can return: 1/(n_perm + 1)."""
    return None if not n_perm else 1.0 / (n_perm + 1)


def format_p(p: float | None, n_perm: int | None = None) -> str:
    """A p-value for a table: 2 significant digits, "n/a" when missing, and "≤ 1/(n_perm+1)"
    when a permutation p sits at its floor (no permutation reached the observed value, so the
    true p is only bounded)."""
    if p is None or not np.isfinite(p):
        return "n/a"
    floor = p_floor(n_perm)
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"≤ {floor:.2g}"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def p_text(p: float | None, n_perm: int | None = None) -> str:
    """``p = 0.03``, ``p ≤ 0.0005`` at the permutation floor, or ``p n/a``: for sentences."""
    f = format_p(p, n_perm)
    return f"p {f}" if f.startswith("≤") else f"p = {f}" if f != "n/a" else "p n/a"


def _paired_offdiag(sim: np.ndarray, hyp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim, hyp = np.asarray(sim, np.float64), np.asarray(hyp, np.float64)
    if sim.shape != hyp.shape or sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"matrices must be square and equal in shape: {sim.shape} vs {hyp.shape}")
    if sim.shape[0] < 3:
        raise ValueError(f"comparison needs >= 3 tasks (got {sim.shape[0]}): "
                         "with 2 tasks there is one off-diagonal entry")
    x, y = offdiag(sim), offdiag(hyp)
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def offdiag_correlation(sim: np.ndarray, hyp: np.ndarray, method: str = "spearman") -> StatResult:
    """Spearman or Pearson correlation of off-diagonal entries (scipy's parametric p, which
    ignores the dependence among entries: prefer :func:`mantel` for inference)."""
    x, y = _paired_offdiag(sim, hyp)
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method: expected 'spearman' or 'pearson', got {method!r}")
    if x.std() == 0 or y.std() == 0:
        return StatResult(method, float("nan"), None, len(x),
                          "undefined: one of the matrices is constant off the diagonal")
    res = sps.spearmanr(x, y) if method == "spearman" else sps.pearsonr(x, y)
    r, p = float(res[0]), float(res[1])
    return StatResult(method, r, p, len(x),
                      f"{method} r={r:.3f} over {len(x)} task pairs (parametric p={format_p(p)} "
                      "treats entries as independent; see Mantel)")


def _rank_matrix(mat: np.ndarray) -> np.ndarray:
    """Matrix whose off-diagonal entries are replaced by their (average) ranks."""
    out = np.zeros_like(mat, dtype=np.float64)
    iu = np.triu_indices(mat.shape[0], 1)
    out[iu] = sps.rankdata(mat[iu])
    return out + out.T


def mantel(sim: np.ndarray, hyp: np.ndarray, *, n_perm: int = 1000, seed: int = 0,
           method: str = "pearson") -> StatResult:
    """Mantel permutation test of positive association between two [T, T] matrices.

    The hypothesis matrix's task labels are permuted jointly on rows and columns (seeded);
    p = (1 + #{r_perm >= r_obs}) / (1 + n_perm), one-sided. ``method="spearman"`` ranks the
    off-diagonal entries first (a joint permutation only moves entries, so ranks permute too).
    """
    sim, hyp = np.asarray(sim, np.float64), np.asarray(hyp, np.float64)
    _paired_offdiag(sim, hyp)  # shape checks
    if not np.isfinite(offdiag(hyp)).all():
        raise ValueError("mantel: hypothesis matrix has NaN/inf off-diagonal entries")
    if method == "spearman":
        # Only sim's upper triangle is read below; hyp is indexed anywhere, so it stays symmetric.
        hyp = _rank_matrix(hyp)
        iu = np.triu_indices(sim.shape[0], 1)
        vals = sim[iu]
        ok = np.isfinite(vals)
        vals[ok] = sps.rankdata(vals[ok])
        sim = np.full_like(sim, np.nan)
        sim[iu] = vals
    elif method != "pearson":
        raise ValueError(f"method: expected 'pearson' or 'spearman', got {method!r}")
    iu = np.triu_indices(sim.shape[0], 1)
    x = sim[iu]
    ok = np.isfinite(x)
    rows, cols = iu[0][ok], iu[1][ok]
    x = x[ok] - x[ok].mean()
    y0 = hyp[rows, cols]
    if x.std() == 0 or y0.std() == 0:
        return StatResult(f"mantel_{method}", float("nan"), None, len(x),
                          "undefined: one of the matrices is constant off the diagonal")
    xn = x / np.linalg.norm(x)

    def corr(y: np.ndarray) -> float:
        yc = y - y.mean()
        return float(xn @ yc / np.linalg.norm(yc))

    r = corr(y0)
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        p = rng.permutation(sim.shape[0])
        null[i] = corr(hyp[p[rows], p[cols]])
    pval = (1 + np.sum(null >= r - 1e-12)) / (1 + n_perm)
    verdict = ("the task space agrees with the hypothesis beyond chance" if pval < ALPHA
               else "no evidence of agreement beyond chance")
    return StatResult(f"mantel_{method}", r, float(pval), len(x),
                      f"Mantel r={r:.3f}, {p_text(pval, n_perm)} ({n_perm} permutations): {verdict}",
                      {"n_perm": n_perm, "null_mean": float(null.mean()),
                       "null_sd": float(null.std()), "null_q95": float(np.quantile(null, 0.95))})


def _within_between(sim_off: np.ndarray, same_off: np.ndarray) -> tuple[float, float]:
    return float(sim_off[same_off].mean()), float(sim_off[~same_off].mean())


def within_between(sim: np.ndarray, categories: Sequence[Any], *, n_perm: int = 1000,
                   seed: int = 0) -> StatResult:
    """Mean similarity of same-category task pairs vs different-category pairs.

    The statistic is the difference (within − between); the ratio is reported too but is only
    meaningful when the between mean is positive. p is one-sided from permuting category labels
    over tasks (seeded): p = (1 + #{diff_perm >= diff_obs}) / (1 + n_perm).
    """
    sim = np.asarray(sim, np.float64)
    cats = np.asarray(categories).astype(str)
    if cats.shape != (sim.shape[0],):
        raise ValueError(f"categories: expected {sim.shape[0]} labels, got shape {cats.shape}")
    iu = np.triu_indices(sim.shape[0], 1)
    x = sim[iu]
    ok = np.isfinite(x)
    rows, cols, x = iu[0][ok], iu[1][ok], x[ok]
    same = cats[rows] == cats[cols]
    if same.all() or not same.any():
        return StatResult("within_between", float("nan"), None, len(x),
                          "undefined: needs a category with >= 2 tasks and >= 2 categories")
    w, b = _within_between(x, same)
    diff = w - b
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        pc = cats[rng.permutation(len(cats))]
        s = pc[rows] == pc[cols]
        null[i] = np.subtract(*_within_between(x, s))
    pval = (1 + np.sum(null >= diff - 1e-12)) / (1 + n_perm)
    ratio = w / b if b > 0 else float("nan")
    ratio_txt = f"ratio {ratio:.2f}" if np.isfinite(ratio) else "ratio undefined (between <= 0)"
    verdict = ("same-category tasks are more similar than others" if pval < ALPHA
               else "no evidence that same-category tasks are more similar")
    return StatResult("within_between", diff, float(pval), len(x),
                      f"within {w:.3f} vs between {b:.3f} ({ratio_txt}, difference {diff:.3f}, "
                      f"{p_text(pval, n_perm)}): {verdict}",
                      {"within": w, "between": b, "ratio": ratio, "n_within": int(same.sum()),
                       "n_between": int((~same).sum()), "n_perm": n_perm})


def adjusted_rand_index(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two partitions of the same items."""
    a, b = np.asarray(labels_a).astype(str), np.asarray(labels_b).astype(str)
    if a.shape != b.shape:
        raise ValueError(f"partitions differ in length: {a.shape} vs {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(table, (ia.ravel(), ib.ravel()), 1)
    comb2 = lambda n: n * (n - 1) / 2.0  # noqa: E731
    sum_ij = comb2(table).sum()
    sum_a, sum_b = comb2(table.sum(1)).sum(), comb2(table.sum(0)).sum()
    expected = sum_a * sum_b / comb2(len(a)) if len(a) > 1 else 0.0
    max_index = (sum_a + sum_b) / 2
    if max_index == expected:  # both partitions trivial (all singletons or one cluster)
        return 1.0
    return float((sum_ij - expected) / (max_index - expected))


def cluster_linkage(sim: np.ndarray) -> np.ndarray:
    """Average-linkage tree on distance 1 − similarity (NaN entries are an error)."""
    sim = np.asarray(sim, np.float64)
    d = 1.0 - (sim + sim.T) / 2
    np.fill_diagonal(d, 0.0)
    if not np.isfinite(d).all():
        raise ValueError("clustering: similarity matrix has NaN entries")
    return hierarchy.linkage(squareform(np.clip(d, 0, None), checks=False), method="average")


def cluster_agreement(sim: np.ndarray, categories: Sequence[Any], *, n_perm: int = 1000,
                      seed: int = 0) -> StatResult:
    """Cut the average-linkage tree into as many clusters as categories and score with ARI.

    The permutation baseline shuffles category labels over tasks: its mean is ~0 by
    construction of ARI, and its upper tail shows how high ARI gets by chance at this T.
    """
    cats = np.asarray(categories).astype(str)
    n_cat = len(np.unique(cats))
    clusters = hierarchy.fcluster(cluster_linkage(sim), t=n_cat, criterion="maxclust")
    ari = adjusted_rand_index(clusters, cats)
    rng = np.random.default_rng(seed)
    null = np.array([adjusted_rand_index(clusters, cats[rng.permutation(len(cats))])
                     for _ in range(n_perm)])
    pval = (1 + np.sum(null >= ari - 1e-12)) / (1 + n_perm)
    verdict = ("clusters recover the hypothesis categories beyond chance" if pval < ALPHA
               else "clusters do not recover the categories beyond chance")
    return StatResult("cluster_ari", ari, float(pval), len(cats),
                      f"ARI={ari:.3f} with {n_cat} clusters (chance mean {null.mean():.3f}, "
                      f"95th pct {np.quantile(null, 0.95):.3f}; {p_text(pval, n_perm)}): {verdict}",
                      {"n_clusters": n_cat, "clusters": clusters.tolist(), "n_perm": n_perm,
                       "null_mean": float(null.mean()),
                       "null_q95": float(np.quantile(null, 0.95))})


def compare_task_spaces(sim_a: np.ndarray, sim_b: np.ndarray, names_a: Sequence[str] | None = None,
                        names_b: Sequence[str] | None = None) -> StatResult:
    """Agreement between two task spaces over the same tasks (e.g. two projector seeds, or an
    exact vs a sketched run): Pearson r of off-diagonal entries, plus Spearman and max |Δ|.

    With names given, ``sim_b`` is reordered to ``names_a``; differing task sets raise.
    """
    sim_a, sim_b = np.asarray(sim_a, np.float64), np.asarray(sim_b, np.float64)
    if names_a is not None and names_b is not None:
        na, nb = list(map(str, names_a)), list(map(str, names_b))
        if set(na) != set(nb):
            raise ValueError(f"task spaces cover different tasks: only in A {sorted(set(na) - set(nb))}, "
                             f"only in B {sorted(set(nb) - set(na))}")
        order = [nb.index(t) for t in na]
        sim_b = sim_b[np.ix_(order, order)]
    x, y = _paired_offdiag(sim_a, sim_b)
    r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
    rho = float(sps.spearmanr(x, y)[0]) if x.std() > 0 and y.std() > 0 else float("nan")
    max_abs = float(np.max(np.abs(x - y)))
    if not np.isfinite(r):
        verdict = "correlation undefined (constant entries)"
    elif r >= 0.95:
        verdict = "the two task spaces agree closely: k is adequate"
    elif r >= 0.8:
        verdict = "the two task spaces broadly agree; a larger k would reduce sketch error"
    else:
        verdict = "the two task spaces disagree: sketch error is large, increase k"
    return StatResult("compare_task_spaces", r, None, len(x),
                      f"Pearson r={r:.3f}, Spearman {rho:.3f}, max |Δ|={max_abs:.3f} over "
                      f"{len(x)} task pairs: {verdict}",
                      {"spearman": rho, "max_abs_diff": max_abs,
                       "rmse": float(np.sqrt(np.mean((x - y) ** 2)))})


def min_attainable_p(categories: Sequence[Any]) -> float:
    """Smallest p any task-permutation test can reach for a grouping: the share of permutations
    that map the grouping onto itself, Π n_c! · Π m_s! / T! (n_c category sizes, m_s number of
    categories of size s). With 6 tasks in 3 pairs it is 1/15, so p < 0.05 is unreachable."""
    from math import exp, lgamma
    cats = np.asarray(categories).astype(str)
    _, sizes = np.unique(cats, return_counts=True)
    _, mult = np.unique(sizes, return_counts=True)
    log_p = (sum(lgamma(s + 1) for s in sizes) + sum(lgamma(m + 1) for m in mult)
             - lgamma(len(cats) + 1))
    return float(exp(log_p))
