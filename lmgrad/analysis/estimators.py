"""Task similarity that estimates a population quantity: U-statistics without self-pair terms.

Model. Task i's pairs are draws x = μᵢ + ε (ε zero-mean, covariance Σᵢ). The task space we want is
cos(μᵢ, μⱼ). The cosine of sample means is pulled toward 0, because E‖x̄ᵢ‖² = ‖μᵢ‖² + tr Σᵢ/nᵢ:
noise inflates every norm by an amount that depends on the pair count and on the task's coherence,
so two runs with different sample sizes are not comparable. The default estimator removes that:

* ⟨μᵢ, μⱼ⟩, i ≠ j: ⟨x̄ᵢ, x̄ⱼ⟩ (independent samples, so the product of means is already unbiased);
* ‖μᵢ‖²: the U-statistic (‖Σₐ xₐ‖² − Σₐ ‖xₐ‖²) / (n(n−1)), the mean of ⟨xₐ, x_b⟩ over a ≠ b;
* the disattenuated cosine ⟨μᵢ,μⱼ⟩ / √(‖μᵢ‖² ‖μⱼ‖²).

The ratio is undefined when a task's ‖μ‖² estimate is ≤ 0: its signal is below the noise at this
sample size. Such a task gets NaN rows and a note naming it, never a number.

Kinds (``kind=``): ``"unbiased"`` (default, above), ``"raw"`` (cosine of sample means, shrinks with
the sample), ``"pair"`` (mean cosine over pairs of pairs, a different estimand: it mixes the
alignment of the means with each task's coherence).

Intervals: :func:`jackknife` (default; delete-one-pair within each task, normal interval). It was
chosen over the bootstrap after simulation (``bench/bench_stats.py``,
``bench/results/stats_coverage.json``): see its docstring. :func:`bootstrap` resamples pairs
within tasks and recomputes the *same* U-statistic with ties removed, for all kinds.

Everything reduces to per-task sums S [T, K], sums of squared row norms, and (for the jackknife) the
row–sum products X Sᵀ [N, T]; rows are read in chunks and accumulated in float64, so N and K of
~10⁵ (a memory-mapped store) need O(T·K) memory, not O(N·K).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from lmgrad.analysis.space import check_sketches, task_index
from lmgrad.analysis.uncertainty import Reliability, offdiag, reliability_label

KINDS = ("unbiased", "raw", "pair")
INTERVAL_METHODS = ("jackknife", "percentile", "bca")
# Where simulation (bench/bench_stats.py) shows the default interval reaching 90–99% coverage.
# Outside it the report must warn: see :func:`regime_warnings`.
VALIDATED_MIN_PAIRS = 12
VALIDATED_MIN_COHERENCE = 0.1
CHUNK_BYTES = 1 << 27  # float64 working set per chunk of rows or columns (128 MiB)


# ---------------------------------------------------------------------------------------------
# One pass over the rows: per-task moments
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskMoments:
    """Sufficient statistics of every kind here: per-task sums, in float64."""
    names: np.ndarray               # [T] sorted task names
    counts: np.ndarray              # [T] pairs per task
    sums_tk: np.ndarray             # [T, K] Σ x over the task's rows
    sq_norms_t: np.ndarray          # [T] Σ ‖x‖²
    unit_sums_tk: np.ndarray | None = None  # [T, K] Σ x/‖x‖ (only for kind="pair")


def _row_chunk(k: int, budget: int = CHUNK_BYTES) -> int:
    return max(1, budget // (8 * max(k, 1)))


def _onehot(idx: np.ndarray, t: int) -> np.ndarray:
    oh = np.zeros((t, len(idx)), np.float64)
    oh[idx, np.arange(len(idx))] = 1.0
    return oh


def task_moments(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *, unit: bool = False
                 ) -> TaskMoments:
    """Per-task sums of rows, of squared row norms and (``unit=True``) of unit rows.

    ``x_nk`` may be a memory-mapped [N, K] array: rows are upcast to float64 a chunk at a time.
    NaN/inf rows raise (ValueError naming them), as in :func:`lmgrad.analysis.space.check_sketches`.
    """
    x_nk, labels = check_sketches(x_nk, tasks)
    names, idx = task_index(labels)
    t, (n, k) = len(names), x_nk.shape
    sums = np.zeros((t, k))
    sq = np.zeros(t)
    usums = np.zeros((t, k)) if unit else None
    step = _row_chunk(k)
    for s in range(0, n, step):
        xc = np.asarray(x_nk[s:s + step], np.float64)
        ic = idx[s:s + step]
        oh = _onehot(ic, t)  # a one-hot matmul: BLAS speed, no np.add.at
        sums += oh @ xc
        r2 = np.einsum("nk,nk->n", xc, xc)
        sq += np.bincount(ic, r2, minlength=t)
        if unit:
            if (r2 == 0).any():
                raise ValueError(f"sketches: all-zero row(s) {np.flatnonzero(r2 == 0)[:10] + s} "
                                 "(cosine undefined for kind='pair')")
            usums += oh @ (xc / np.sqrt(r2)[:, None])
    return TaskMoments(names, np.bincount(idx, minlength=t), sums, sq, usums)


def inner_products(m: TaskMoments) -> np.ndarray:
    """[T, T] unbiased ⟨μᵢ, μⱼ⟩; the diagonal is the U-statistic for ‖μᵢ‖² (NaN if nᵢ < 2)."""
    n = m.counts.astype(np.float64)
    g = m.sums_tk @ m.sums_tk.T
    with np.errstate(invalid="ignore", divide="ignore"):
        out = g / np.outer(n, n)
        diag = (np.diag(g) - m.sq_norms_t) / (n * (n - 1))
    np.fill_diagonal(out, np.where(n >= 2, diag, np.nan))
    return out


# ---------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskSpace:
    """A task similarity matrix with what is needed to judge each entry."""
    names: np.ndarray        # [T]
    sim: np.ndarray          # [T, T]; NaN rows/columns for undefined tasks
    kind: str
    counts: np.ndarray       # [T] pairs per task
    inner: np.ndarray        # [T, T] the quantity before normalising (kind-specific, see below)
    defined: np.ndarray      # [T] bool
    notes: dict[str, str]    # task → why it is undefined

    @property
    def undefined(self) -> list[str]:
        return [str(n) for n, d in zip(self.names, self.defined) if not d]


def _cosine(inner_tt: np.ndarray, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    d = np.diag(inner_tt)
    ok = np.isfinite(d) & (d > 0)
    s = np.sqrt(np.where(ok, d, np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = inner_tt / np.outer(s, s)
    if clip:  # the unbiased ratio can leave [−1, 1] by noise; the population cosine cannot
        sim = np.clip(sim, -1.0, 1.0)
    np.fill_diagonal(sim, np.where(ok, 1.0, np.nan))
    return sim, ok


def similarity_from_moments(m: TaskMoments, kind: str = "unbiased", *, clip: bool = True
                            ) -> TaskSpace:
    """Task space of ``kind`` from :func:`task_moments`.

    ``inner``: unbiased, the U-statistic ⟨μᵢ,μⱼ⟩ (diagonal ‖μᵢ‖²); raw, ⟨x̄ᵢ, x̄ⱼ⟩; pair, the mean
    pair cosine (diagonal: within-task coherence, self-pairs excluded). ``clip`` bounds the
    unbiased cosine to [−1, 1] (it is ±1 beyond, "as aligned as the data can tell").
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    n = m.counts.astype(np.float64)
    notes: dict[str, str] = {}
    if kind == "unbiased":
        inner = inner_products(m)
        sim, ok = _cosine(inner, clip)
        for name, c, v in zip(m.names, m.counts, np.diag(inner)):
            if c < 2:
                notes[str(name)] = f"{c} pair(s): ‖μ‖² needs >= 2 pairs"
            elif not v > 0:
                notes[str(name)] = (f"‖μ‖² estimate {v:.3g} <= 0 over {c} pairs: "
                                    "its signal is below the noise at this sample size")
    elif kind == "raw":
        means = m.sums_tk / n[:, None]
        inner = means @ means.T
        sim, ok = _cosine(inner, False)
        for name in m.names[~ok]:
            notes[str(name)] = "mean differential is zero"
    else:
        if m.unit_sums_tk is None:
            raise ValueError("kind='pair' needs task_moments(..., unit=True)")
        g = m.unit_sums_tk @ m.unit_sums_tk.T
        denom = np.outer(n, n)
        np.fill_diagonal(denom, n * (n - 1))
        np.fill_diagonal(g, np.diag(g) - n)  # self-pairs: u·u = 1
        with np.errstate(invalid="ignore", divide="ignore"):
            inner = np.where(denom > 0, g / np.where(denom > 0, denom, 1), np.nan)
        sim = inner.copy()
        ok = np.ones(len(n), bool)
    return TaskSpace(m.names, sim, kind, m.counts, inner, ok, notes)


def task_similarity(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray,
                    kind: str = "unbiased", *, clip: bool = True) -> TaskSpace:
    """Task space straight from per-pair sketch rows [N, K] and their task labels."""
    return similarity_from_moments(task_moments(x_nk, tasks, unit=kind == "pair"), kind, clip=clip)


# ---------------------------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Interval:
    """Per-entry confidence intervals (level 1 − alpha) of a task space."""
    names: np.ndarray
    estimate: np.ndarray     # [T, T] point estimate (same as TaskSpace.sim)
    low: np.ndarray          # [T, T]
    high: np.ndarray         # [T, T]
    se: np.ndarray           # [T, T] standard error (jackknife, or bootstrap SD)
    method: str
    alpha: float
    kind: str
    counts: np.ndarray
    defined: np.ndarray      # [T] point estimate defined
    notes: dict[str, str]
    warnings: list[str]
    samples: np.ndarray | None = None  # [B, T, T] bootstrap replicates

    def covers(self, truth_tt: np.ndarray) -> np.ndarray:
        """[T, T] bool: the interval contains ``truth`` (False where undefined)."""
        with np.errstate(invalid="ignore"):
            return (self.low <= truth_tt) & (truth_tt <= self.high)


def _row_sum_products(x_nk: np.ndarray, sums_tk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """P = X Sᵀ [N, T] and squared row norms [N], one chunked pass."""
    n, k = x_nk.shape
    p = np.empty((n, sums_tk.shape[0]))
    q = np.empty(n)
    step = _row_chunk(k)
    for s in range(0, n, step):
        xc = np.asarray(x_nk[s:s + step], np.float64)
        p[s:s + step] = xc @ sums_tk.T
        q[s:s + step] = np.einsum("nk,nk->n", xc, xc)
    return p, q


def jackknife_replicates(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray,
                         m: TaskMoments | None = None) -> tuple[TaskMoments, np.ndarray]:
    """Delete-one-pair replicates of the unbiased cosine: ``(moments, loo [N, T])``.

    Row a (of task i), column j: the cosine of tasks i and j with pair a left out (NaN for j = i,
    for nᵢ < 3, or where dropping a makes ‖μᵢ‖² ≤ 0). Exact and O(N·K·T), from
    ⟨Sᵢ − xₐ, Sⱼ⟩ = G_ij − P_aj and ‖Sᵢ − xₐ‖² − (Qᵢ − qₐ) = G_ii − Qᵢ − 2(P_ai − qₐ).
    """
    x_nk, labels = check_sketches(x_nk, tasks)
    m = m if m is not None else task_moments(x_nk, labels)
    _, idx = task_index(labels)
    p, q = _row_sum_products(x_nk, m.sums_tk)
    n = m.counts.astype(np.float64)
    g = m.sums_tk @ m.sums_tk.T
    b = np.diag(inner_products(m))  # full-sample ‖μⱼ‖²
    ni = n[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        b_loo = (g[idx, idx] - m.sq_norms_t[idx] - 2 * (p[np.arange(len(idx)), idx] - q)) \
            / ((ni - 1) * (ni - 2))
        a_loo = (g[idx] - p) / ((ni - 1)[:, None] * n[None, :])
        den = np.sqrt(np.where(b_loo > 0, b_loo, np.nan))[:, None] \
            * np.sqrt(np.where(b > 0, b, np.nan))[None, :]
        loo = a_loo / den
    loo[np.arange(len(idx)), idx] = np.nan
    loo[ni < 3] = np.nan
    return m, loo


def jackknife(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *, alpha: float = 0.05,
              clip: bool = True) -> Interval:
    """Default intervals for the unbiased cosine: delete-one-pair jackknife SE, normal interval.

    For an entry (i, j) the SE² is the multi-sample jackknife (Arvesen 1969) over both tasks'
    pairs: Σ over tasks s ∈ {i, j} of (nₛ−1)/nₛ Σₐ (r₍₋ₐ₎ − r̄₍₋·₎)². The interval is r ± z·SE, on
    the unclipped ratio, then clipped to [−1, 1]. Why this and not the bootstrap: both reach
    the target coverage where the estimator is usable (bench/results/stats_coverage.json: ≈ 0.96–
    0.97 at 12 pairs, coherence 0.1, K = 500, the jackknife being mildly conservative, as its
    variance estimate is known to be), but the jackknife is exact and deterministic (no seed, no
    Monte Carlo error) and costs one extra pass over the rows instead of B, which matters at
    N, K ~ 10⁵; it also needs no decision about repeated pairs, which a bootstrap of a
    U-statistic must make (see :func:`resampled_spaces`).
    Needs >= 3 pairs per task for an interval; an entry is NaN where either task is undefined or
    dropping one pair makes a task's ‖μ‖² ≤ 0 (named in ``warnings``).
    """
    x_nk, labels = check_sketches(x_nk, tasks)
    m, loo = jackknife_replicates(x_nk, labels)
    sp = similarity_from_moments(m, "unbiased", clip=False)
    _, idx = task_index(labels)
    t = len(m.names)
    n = m.counts.astype(np.float64)
    contrib = np.full((t, t), np.nan)  # contrib[i, j]: task i's share of var(r_ij)
    unstable = []
    for i in range(t):
        r = loo[idx == i]
        if len(r) < 3 or not sp.defined[i]:
            continue
        bad = ~np.isfinite(r).any(axis=1)
        if bad.any():
            unstable.append(f"{m.names[i]} (dropping {int(bad.sum())} of {len(r)} pairs makes "
                            "‖μ‖² <= 0)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            dev = r - np.mean(r, axis=0)
        contrib[i] = (n[i] - 1) / n[i] * np.sum(dev ** 2, axis=0)
    se = np.sqrt(contrib + contrib.T)
    z = sps.norm.ppf(1 - alpha / 2)
    est = sp.sim
    low, high = est - z * se, est + z * se
    lim = (lambda a: np.clip(a, -1, 1)) if clip else (lambda a: a)
    est, low, high = lim(est), lim(low), lim(high)
    for a in (est, low, high, se):
        np.fill_diagonal(a, np.nan)
    np.fill_diagonal(est, np.where(sp.defined, 1.0, np.nan))
    warn = regime_warnings(m.names, m.counts, _coherence_from(x_nk, labels))
    if unstable:
        warn.append("jackknife undefined (NaN interval) for: " + "; ".join(unstable))
    return Interval(m.names, est, low, high, se, "jackknife", alpha, "unbiased", m.counts,
                    sp.defined, sp.notes, warn)


def _coherence_from(x_nk: np.ndarray, labels: np.ndarray) -> np.ndarray:
    try:
        return np.diag(task_similarity(x_nk, labels, "pair").inner)
    except ValueError:  # all-zero rows: coherence undefined, regime check skips it
        return np.full(len(np.unique(labels)), np.nan)


def resampled_spaces(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *, n_boot: int,
                     seed: int = 0, kind: str = "unbiased", clip: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified bootstrap replicates of a task space: ``(names, sims [B, T, T])``.

    Each replicate draws every task's pairs with replacement (multinomial weights w, seeded) and
    recomputes the same estimator. For ``unbiased`` the U-statistic skips pairs of copies of one
    original pair: Σ_{a≠b} wₐw_b⟨xₐ,x_b⟩ = ‖Σ wₐxₐ‖² − Σ wₐ²‖xₐ‖², over n² − Σ wₐ² terms; counting
    copies as distinct would put self-pair terms back (biasing ‖μ‖² up by about tr Σ/n).
    Columns are processed in chunks, so memory is O(B·T·chunk), not O(B·T·K).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    x_nk, labels = check_sketches(x_nk, tasks)
    names, idx = task_index(labels)
    t, k = len(names), x_nk.shape[1]
    members = [np.flatnonzero(idx == i) for i in range(t)]
    rng = np.random.default_rng(seed)
    w = [rng.multinomial(len(mb), np.full(len(mb), 1.0 / len(mb)), size=n_boot).astype(float)
         for mb in members]
    gram = np.zeros((n_boot, t, t))
    sq = np.zeros((n_boot, t))
    step = max(1, CHUNK_BYTES // (8 * n_boot * t))
    # kind="pair": row norms need whole rows, so they are computed before the column chunks.
    norms = [_norms(x_nk, mb) for mb in members] if kind == "pair" else None
    for c in range(0, k, step):
        cols = slice(c, min(k, c + step))
        s_btk = np.empty((n_boot, t, cols.stop - cols.start))
        for i, mb in enumerate(members):
            xi = np.asarray(x_nk[mb, cols], np.float64)
            if kind == "pair":
                xi = xi / norms[i][:, None]
            s_btk[:, i] = w[i] @ xi
            if kind == "unbiased":
                sq[:, i] += (w[i] ** 2) @ np.einsum("nk,nk->n", xi, xi)
        gram += np.einsum("btk,bsk->bts", s_btk, s_btk)
    n = np.array([len(mb) for mb in members], float)
    sims = np.empty((n_boot, t, t))
    for b in range(n_boot):
        if kind == "raw":
            inner = gram[b] / np.outer(n, n)
            sims[b] = _cosine(inner, False)[0]
            continue
        w2 = np.array([np.sum(wi[b] ** 2) for wi in w])
        inner = gram[b] / np.outer(n, n)
        if kind == "unbiased":
            with np.errstate(invalid="ignore", divide="ignore"):
                np.fill_diagonal(inner, (np.diag(gram[b]) - sq[b]) / (n ** 2 - w2))
            sims[b] = _cosine(inner, clip)[0]
        else:  # pair: Σ_{a≠b} wₐw_b uₐ·u_b, self-pairs (and copies) have u·u = 1
            with np.errstate(invalid="ignore", divide="ignore"):
                np.fill_diagonal(inner, (np.diag(gram[b]) - w2) / (n ** 2 - w2))
            sims[b] = inner
    return names, sims


def _norms(x_nk: np.ndarray, rows: np.ndarray) -> np.ndarray:
    xr = np.asarray(x_nk[rows], np.float64)
    return np.sqrt(np.einsum("nk,nk->n", xr, xr))


def bootstrap(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *, n_boot: int = 1000,
              seed: int = 0, kind: str = "unbiased", method: str = "bca", alpha: float = 0.05,
              clip: bool = True) -> Interval:
    """Stratified bootstrap intervals of any kind (replicates from :func:`resampled_spaces`).

    ``method="percentile"`` or ``"bca"`` (Efron 1987: bias correction from the share of
    replicates below the estimate, acceleration from the delete-one-pair jackknife of the same
    entry; for raw/pair kinds the acceleration is taken as 0, i.e. BC). Kept as the alternative
    to :func:`jackknife`; the coverage map in ``bench/results/stats_coverage.json`` compares them.
    """
    if method not in ("percentile", "bca"):
        raise ValueError(f"method: expected 'percentile' or 'bca', got {method!r}")
    x_nk, labels = check_sketches(x_nk, tasks)
    m = task_moments(x_nk, labels, unit=kind == "pair")
    sp = similarity_from_moments(m, kind, clip=clip)
    names, samples = resampled_spaces(x_nk, labels, n_boot=n_boot, seed=seed, kind=kind, clip=clip)
    est = sp.sim
    t = len(names)
    if method == "percentile":
        q_lo, q_hi = np.full((t, t), alpha / 2), np.full((t, t), 1 - alpha / 2)
    else:
        with np.errstate(invalid="ignore"):
            below = np.nanmean(samples < est, 0) + 0.5 * np.nanmean(samples == est, 0)
        z0 = sps.norm.ppf(np.clip(below, 1 / (n_boot + 1), n_boot / (n_boot + 1)))
        acc = np.zeros((t, t))
        if kind == "unbiased":
            _, loo = jackknife_replicates(x_nk, labels, m)
            _, idx = task_index(labels)
            num, den = np.zeros((t, t)), np.zeros((t, t))
            for i in range(t):
                r = loo[idx == i]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    d = np.nanmean(r, 0) - r
                num[i], den[i] = np.nansum(d ** 3, 0), np.nansum(d ** 2, 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                acc = np.nan_to_num((num + num.T) / (6 * (den + den.T) ** 1.5))
        zl, zh = sps.norm.ppf(alpha / 2), sps.norm.ppf(1 - alpha / 2)
        q_lo = sps.norm.cdf(z0 + (z0 + zl) / (1 - acc * (z0 + zl)))
        q_hi = sps.norm.cdf(z0 + (z0 + zh) / (1 - acc * (z0 + zh)))
    low, high = _entry_quantiles(samples, q_lo), _entry_quantiles(samples, q_hi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.nanstd(samples, 0)
    und = ~sp.defined
    for a in (low, high, se):
        a[und, :] = a[:, und] = np.nan
        np.fill_diagonal(a, np.nan)
    return Interval(names, est, low, high, se, method, alpha, kind, m.counts, sp.defined,
                    sp.notes, regime_warnings(names, m.counts, _coherence_from(x_nk, labels)),
                    samples)


def _entry_quantiles(samples_btt: np.ndarray, q_tt: np.ndarray) -> np.ndarray:
    """Per-entry quantile at a per-entry level (linear interpolation; NaN replicates ignored)."""
    srt = np.sort(samples_btt, axis=0)  # NaNs sort last
    n_ok = np.isfinite(srt).sum(0)
    pos = np.nan_to_num(q_tt) * np.maximum(n_ok - 1, 0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(n_ok - 1, 0))
    a = np.take_along_axis(srt, lo[None], 0)[0]
    b = np.take_along_axis(srt, hi[None], 0)[0]
    return np.where(n_ok > 0, a + (pos - lo) * (b - a), np.nan)


def similarity_interval(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *,
                        method: str = "jackknife", alpha: float = 0.05, n_boot: int = 1000,
                        seed: int = 0, kind: str = "unbiased") -> Interval:
    """One entry point: ``method`` in ``jackknife`` (default, unbiased kind only), ``percentile``
    or ``bca`` (bootstrap, any kind)."""
    if method == "jackknife":
        if kind != "unbiased":
            raise ValueError("the jackknife interval is implemented for kind='unbiased' only; "
                             "use method='bca' or 'percentile' for the alternatives")
        return jackknife(x_nk, tasks, alpha=alpha)
    if method in ("percentile", "bca"):
        return bootstrap(x_nk, tasks, n_boot=n_boot, seed=seed, kind=kind, method=method,
                         alpha=alpha)
    raise ValueError(f"method: expected one of {INTERVAL_METHODS}, got {method!r}")


def regime_warnings(names: Sequence[str], counts: Sequence[int],
                    coherence: Sequence[float]) -> list[str]:
    """Warnings for tasks outside the simulated regime where the default interval is calibrated
    (>= ``VALIDATED_MIN_PAIRS`` pairs and coherence >= ``VALIDATED_MIN_COHERENCE``)."""
    out = []
    few = [f"{n} ({c})" for n, c in zip(names, counts) if c < VALIDATED_MIN_PAIRS]
    if few:
        out.append(f"fewer than {VALIDATED_MIN_PAIRS} pairs in {', '.join(few)}: intervals may "
                   "under-cover (see bench/results/stats_coverage.json)")
    weak = [f"{n} ({c:.3f})" for n, c in zip(names, coherence)
            if np.isfinite(c) and c < VALIDATED_MIN_COHERENCE]
    if weak:
        out.append(f"coherence below {VALIDATED_MIN_COHERENCE} in {', '.join(weak)}: entries are "
                   "noisy and intervals may under-cover (see bench/results/stats_coverage.json)")
    return out


# ---------------------------------------------------------------------------------------------
# Split-half reliability with the same estimator
# ---------------------------------------------------------------------------------------------

def split_half(x_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *, n_splits: int = 20,
               seed: int = 0, kind: str = "unbiased") -> Reliability:
    """Split-half reliability of the task space under ``kind`` (default: the unbiased cosine).

    Each split halves every task's pairs at random, computes the task space on each half with the
    same estimator, and correlates off-diagonal entries (Pearson, entries defined in both halves);
    Spearman–Brown gives the full-sample reliability. Needs >= 4 pairs per task for the unbiased
    kind (2 per half).
    """
    x_nk, labels = check_sketches(x_nk, tasks)
    names, idx = task_index(labels)
    t = len(names)
    counts = np.bincount(idx, minlength=t)
    need = 4 if kind == "unbiased" else 2
    few = [f"{n} ({c})" for n, c in zip(names, counts) if c < need]
    if few:
        raise ValueError(f"split-half needs >= {need} pairs per task; too few in: {', '.join(few)}")
    if t < 3:
        return Reliability(float("nan"), float("nan"), float("nan"), 0, t,
                           "reliability needs >= 3 tasks (a 2-task matrix has one entry)")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(idx == i) for i in range(t)]
    rs = []
    for _ in range(n_splits):
        half = np.zeros(len(idx), bool)
        for mb in members:
            half[rng.permutation(mb)[: len(mb) // 2]] = True
        a, b = (offdiag(task_similarity(x_nk[h], labels[h], kind).sim) for h in (half, ~half))
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() >= 2 and a[ok].std() > 0 and b[ok].std() > 0:
            rs.append(np.corrcoef(a[ok], b[ok])[0, 1])
    if not rs:
        return Reliability(float("nan"), float("nan"), float("nan"), n_splits, t,
                           "reliability could not be estimated (constant or undefined entries)")
    r = float(np.mean(rs))
    sb = 2 * r / (1 + r) if r > -1 else float("nan")
    return Reliability(r, float(np.std(rs)), float(sb), len(rs), t, reliability_label(sb))


# ---------------------------------------------------------------------------------------------
# Planted truth
# ---------------------------------------------------------------------------------------------

def block_cosines(sizes: Sequence[int], within: float, between: float = 0.0) -> np.ndarray:
    """[T, T] population cosines: ``within`` inside each block of tasks, ``between`` across,
    1 on the diagonal."""
    lab = np.repeat(np.arange(len(sizes)), sizes)
    c = np.where(lab[:, None] == lab[None, :], within, between).astype(np.float64)
    np.fill_diagonal(c, 1.0)
    return c


@dataclasses.dataclass
class SimulatedTaskSpace:
    """Rows with a known population task space."""
    x_nk: np.ndarray          # [N, K] rows, grouped by task
    tasks: np.ndarray         # [N] labels
    names: np.ndarray         # [T] sorted names (t00, t01, …)
    true_cos: np.ndarray      # [T, T] cos(μᵢ, μⱼ)
    mu_tk: np.ndarray         # [T, K] population means
    coherence: np.ndarray     # [T] ‖μ‖² / (‖μ‖² + tr Σ): the large-K limit of the mean pair cosine


def simulate_task_space(n_tasks: int, n_pairs: int | Sequence[int], k: int,
                        true_cos: np.ndarray | None = None, coherence: float | Sequence[float]
                        = 0.1, seed: int = 0, *, blocks: Sequence[int] | None = None,
                        within: float = 0.5, between: float = 0.0, noise_sd: float = 1.0,
                        dtype: Any = np.float32) -> SimulatedTaskSpace:
    """Rows x = μᵢ + ε, ε ~ N(0, σ²I_K), with cos(μᵢ, μⱼ) = ``true_cos`` exactly and coherence cᵢ.

    ``true_cos`` (a PSD matrix with unit diagonal) defaults to :func:`block_cosines` over
    ``blocks`` (sizes; default one block of all tasks) with ``within``/``between``. Means are
    μᵢ = sᵢ·Q fᵢ with FFᵀ = true_cos and Q orthonormal [K, T] (random, seeded), scaled so that
    ‖μᵢ‖² = cᵢ/(1 − cᵢ)·Kσ²: the expected cosine of two of the task's pairs then tends to cᵢ as K
    grows (for K in the hundreds it is within ~1/√K of it).
    """
    rng = np.random.default_rng(seed)
    if true_cos is None:
        true_cos = block_cosines(blocks if blocks is not None else [n_tasks], within, between)
    c = np.asarray(true_cos, np.float64)
    if c.shape != (n_tasks, n_tasks) or not np.allclose(np.diag(c), 1) or not np.allclose(c, c.T):
        raise ValueError(f"true_cos: expected a symmetric [{n_tasks}, {n_tasks}] matrix with unit "
                         f"diagonal, got shape {c.shape}")
    if k < n_tasks:
        raise ValueError(f"k={k} < n_tasks={n_tasks}: cannot plant {n_tasks} independent means")
    e, v = np.linalg.eigh(c)
    if e.min() < -1e-9:
        raise ValueError(f"true_cos is not positive semi-definite (min eigenvalue {e.min():.3g})")
    f = v * np.sqrt(np.clip(e, 0, None))  # rows fᵢ with ⟨fᵢ, fⱼ⟩ = c_ij
    q, _ = np.linalg.qr(rng.standard_normal((k, n_tasks)))
    coh = np.broadcast_to(np.asarray(coherence, np.float64), (n_tasks,)).copy()
    if not ((coh > 0) & (coh < 1)).all():
        raise ValueError(f"coherence must be in (0, 1), got {coh}")
    scale = np.sqrt(coh / (1 - coh) * k) * noise_sd
    mu = scale[:, None] * (f @ q.T)
    npairs = np.broadcast_to(np.asarray(n_pairs, int), (n_tasks,))
    names = np.array([f"t{i:02d}" for i in range(n_tasks)])
    x = np.repeat(mu, npairs, axis=0) + noise_sd * rng.standard_normal((int(npairs.sum()), k))
    return SimulatedTaskSpace(x.astype(dtype), np.repeat(names, npairs), names, c, mu, coh)
