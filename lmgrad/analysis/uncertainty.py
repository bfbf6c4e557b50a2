"""Uncertainty of a task space: bootstrap CIs per entry and split-half reliability.

Both resample *pairs within tasks*: the pairs are the sampled units (a task's minimal pairs are
a sample of the phenomenon), while the task set itself is fixed by the benchmark.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from lmgrad.analysis.space import (check_sketches, group_sums, require_pairs, require_tasks,
                                   similarity, task_index)

MIN_BOOT_PAIRS = 5  # below this a percentile interval is too coarse to mean anything: NaN + warn


@dataclasses.dataclass
class BootstrapResult:
    """Percentile bootstrap of every entry of a task similarity matrix."""
    names: np.ndarray     # [T]
    estimate: np.ndarray  # [T, T] on the full data
    low: np.ndarray       # [T, T] lower percentile bound (NaN for tasks with too few pairs)
    high: np.ndarray      # [T, T]
    samples: np.ndarray   # [B, T, T]
    alpha: float
    n_boot: int
    counts: np.ndarray    # [T] pairs per task
    method: str = "percentile"

    @property
    def width(self) -> np.ndarray:
        return self.high - self.low


def _task_blocks(sketch_nk: np.ndarray, idx: np.ndarray, t: int) -> list[np.ndarray]:
    return [np.asarray(sketch_nk[idx == i], np.float64) for i in range(t)]


def bootstrap_similarity(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *,
                         n_boot: int = 200, seed: int = 0, kind: str = "cosine",
                         alpha: float = 0.05, min_pairs: int = MIN_BOOT_PAIRS,
                         method: str = "percentile", chunk: int = 16) -> BootstrapResult:
    """Percentile CIs (level 1 − alpha) for each similarity entry, resampling pairs per task.

    ``method="percentile"`` gives plain percentile intervals; ``"bc"`` bias-corrects them, which
    matters for cosines of means: they shrink toward 0 under resampling, so a plain percentile
    interval can sit entirely below the estimate for weak, noisy tasks. Neither method can
    contain an estimate that exceeds every resample (strongly aligned, noisy tasks).
    Each resample draws every task's pairs with replacement (multinomial counts, seeded), takes
    the weighted means and recomputes the matrix. Tasks with < 2 pairs raise (ValueError naming
    them); tasks with < ``min_pairs`` get NaN intervals in their rows and columns, with a warning.
    Cost is O(B·N·K) in ``chunk``-sized batches of resamples.
    """
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    names, idx = task_index(labels)
    require_tasks(names)
    counts = np.bincount(idx, minlength=len(names))
    require_pairs(names, counts, 2, "bootstrap")
    if n_boot < 1:
        raise ValueError(f"n_boot: expected >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    blocks = _task_blocks(sketch_nk, idx, len(names))
    t, k = len(names), sketch_nk.shape[1]
    samples = np.empty((n_boot, t, t))
    for s in range(0, n_boot, chunk):
        b = min(chunk, n_boot - s)
        means_btk = np.empty((b, t, k))
        for i, x in enumerate(blocks):
            n = x.shape[0]
            w_bn = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
            means_btk[:, i] = (w_bn @ x) / n
        for j in range(b):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                samples[s + j] = similarity(means_btk[j], kind)
    estimate = similarity(group_sums(sketch_nk, idx, t) / counts[:, None], kind)
    if method == "percentile":
        q_lo = np.full((t, t), alpha / 2)
        q_hi = np.full((t, t), 1 - alpha / 2)
    elif method == "bc":
        # Bias-corrected percentile (Efron 1987): the cosine of resampled means is biased toward
        # 0 (resampling noise inflates norms), so plain percentiles can exclude the estimate.
        below = (samples < estimate).mean(0) + 0.5 * (samples == estimate).mean(0)
        z0 = sps.norm.ppf(np.clip(below, 1 / (n_boot + 1), n_boot / (n_boot + 1)))
        q_lo = sps.norm.cdf(2 * z0 + sps.norm.ppf(alpha / 2))
        q_hi = sps.norm.cdf(2 * z0 + sps.norm.ppf(1 - alpha / 2))
    else:
        raise ValueError(f"method: expected 'percentile' or 'bc', got {method!r}")
    low, high = _entry_quantiles(samples, q_lo), _entry_quantiles(samples, q_hi)
    few = counts < min_pairs
    if few.any():
        warnings.warn(f"bootstrap: fewer than {min_pairs} pairs in "
                      f"{', '.join(f'{n} ({c})' for n, c in zip(names[few], counts[few]))}; "
                      "their CIs are NaN", stacklevel=2)
        low[few, :] = low[:, few] = np.nan
        high[few, :] = high[:, few] = np.nan
    return BootstrapResult(names, estimate, low, high, samples, alpha, n_boot, counts, method)


def _entry_quantiles(samples_btt: np.ndarray, q_tt: np.ndarray) -> np.ndarray:
    """Per-entry quantile (linear interpolation, NaNs ignored) at a per-entry level q."""
    srt = np.sort(samples_btt, axis=0)  # NaNs sort last
    n_ok = np.isfinite(srt).sum(0)
    pos = q_tt * np.maximum(n_ok - 1, 0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(n_ok - 1, 0))
    frac = pos - lo
    a = np.take_along_axis(srt, lo[None], 0)[0]
    b = np.take_along_axis(srt, hi[None], 0)[0]
    return np.where(n_ok > 0, a + frac * (b - a), np.nan)


def offdiag(mat_tt: np.ndarray) -> np.ndarray:
    """Upper-triangle entries above the diagonal, row-major: the T(T−1)/2 distinct pairs."""
    mat_tt = np.asarray(mat_tt)
    return mat_tt[np.triu_indices(mat_tt.shape[0], 1)]


@dataclasses.dataclass
class Reliability:
    """Split-half reliability of a whole task similarity matrix."""
    r_half: float            # mean over splits of corr(offdiag(half A), offdiag(half B))
    r_half_sd: float         # spread over splits
    spearman_brown: float    # 2 r / (1 + r): reliability at the full sample size
    n_splits: int
    n_tasks: int
    interpretation: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reliability_label(sb: float) -> str:
    """Plain-language reading of a Spearman–Brown reliability."""
    if not np.isfinite(sb):
        return "reliability could not be estimated"
    if sb < 0.7:
        return "the task space is not reliable at this sample size"
    if sb < 0.9:
        return "the task space is moderately reliable"
    return "the task space is highly reliable"


def split_half_reliability(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *,
                           n_splits: int = 20, seed: int = 0, kind: str = "cosine"
                           ) -> Reliability:
    """Split each task's pairs into random halves, build the matrix from each half, correlate the
    off-diagonal entries (Pearson), average over ``n_splits`` and apply Spearman–Brown
    (each half has half the pairs, so the raw correlation understates full-data reliability).

    Needs >= 2 pairs per task (ValueError naming the tasks) and >= 3 tasks for a correlation of
    entries (with 2 tasks the result is NaN with an explanation).
    """
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    names, idx = task_index(labels)
    require_tasks(names)
    counts = np.bincount(idx, minlength=len(names))
    require_pairs(names, counts, 2, "split-half reliability")
    t = len(names)
    if t < 3:
        return Reliability(float("nan"), float("nan"), float("nan"), 0, t,
                           "reliability needs >= 3 tasks (a 2-task matrix has one entry)")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(idx == i) for i in range(t)]
    rs = []
    for _ in range(n_splits):
        half = np.zeros(len(idx), bool)
        for m in members:
            half[rng.permutation(m)[: len(m) // 2]] = True
        sims = []
        for h in (half, ~half):
            c = np.bincount(idx[h], minlength=t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sims.append(similarity(group_sums(sketch_nk[h], idx[h], t) / c[:, None], kind))
        a, b = offdiag(sims[0]), offdiag(sims[1])
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() >= 2 and a[ok].std() > 0 and b[ok].std() > 0:
            rs.append(np.corrcoef(a[ok], b[ok])[0, 1])
    if not rs:
        return Reliability(float("nan"), float("nan"), float("nan"), n_splits, t,
                           "reliability could not be estimated (constant or undefined entries)")
    r = float(np.mean(rs))
    sb = 2 * r / (1 + r) if r > -1 else float("nan")
    return Reliability(r, float(np.std(rs)), float(sb), len(rs), t, reliability_label(sb))
