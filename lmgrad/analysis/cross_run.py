"""Cross-run analysis of a sweep: how task spaces differ between model sizes and checkpoints.

Inputs are pipeline workdirs (`lmgrad.jobs.sweep`), one per run, over the same pair sample. What is
compared, and how its uncertainty is measured:

* Pairs are aligned by (UID, pairID) across runs (a pair a tokenizer dropped in one run is dropped
  from all), so every run's task space is estimated on the same pairs.
* Uncertainty comes from one **joint** stratified bootstrap of pair IDs: replicate b draws each
  task's pairs with replacement once, and every run is recomputed on that same draw (the unbiased
  estimator of `lmgrad.analysis.estimators`, copies of one pair never paired with themselves, as in
  `estimators.resampled_spaces`). Two runs' spaces share their pairs' noise; the joint draw keeps
  that dependence in every statistic that compares them.
* RSA between two runs: the Pearson (or Spearman) correlation of their off-diagonal unbiased
  similarities. Pair noise attenuates it. With the default **basic** bootstrap interval
  (2·estimate − quantiles of the replicates) the reported RSA is the matching bias-corrected
  estimate 2·raw − mean(replicates) (the raw correlation is kept as `rsa_raw`): resampling adds
  noise of the same size again, so the replicates' shortfall estimates the raw estimate's. The
  interval is centred on the corrected estimate, never on the raw one, which it can exclude when
  the attenuation is large. Bias and coverage against a planted population RSA are checked by
  simulation (tests/test_sweep.py).
* Noise ceiling: each run's split-half reliability (Spearman–Brown, `estimators.split_half`); for two
  runs √(rel_a·rel_b) is the RSA two noisy copies of one population space would reach with
  independent noise. Runs of one sweep share their pairs, so their noise is correlated and an RSA
  can exceed that ceiling. The **disattenuated RSA** avoids it: over random halvings of every
  task's pairs, run a's space on one half is correlated with run b's on the other (disjoint pairs,
  so independent noise), and divided by √(r_aa·r_bb), the same cross-half correlation of each run
  with itself (Spearman's correction for attenuation). It estimates the RSA of the two population
  spaces: about 1 for one space seen twice, whatever the noise shares.
* Per run: the taxonomy fit controlled for surface similarity, read from the run's
  `task_space/stats.json` (not recomputed); within-category sharing (mean unbiased similarity of
  task pairs in the same category minus different categories) and BLiMP accuracy, with percentile
  bootstrap intervals (sharing's raw estimate is close to unbiased on planted block spaces, where
  a bias-corrected or basic interval over-corrects at low coherence: tests/test_sweep.py).
* Trends (metric vs log size, or vs log(1 + step) within a size): Spearman's ρ over runs with its
  exact run-level permutation p (whose floor, 2/R! for R runs, says how little R runs can show), and
  the least-squares slope with an interval from the joint pair bootstrap (which says whether the
  ordering of *these* runs survives pair noise, not whether it generalises to other models).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from lmgrad import io as lio
from lmgrad.analysis.estimators import split_half
from lmgrad.analysis.stats import jsonable

MIN_PAIRS = 4  # split halves need 2 pairs per task per half
CHUNK_BYTES = 1 << 27


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run directory and what it is plotted against."""
    name: str
    path: str
    size: str = ""
    num_params: int | None = None
    step: int | None = None


# ---------------------------------------------------------------------------------------------
# Joint resampling of pairs and the unbiased task space per replicate
# ---------------------------------------------------------------------------------------------

def gram_factor(x_nk: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """[N, d] float64 Y with Y Yᵀ = X Xᵀ (d ≤ min(N, K)): every inner product, hence every unbiased
    similarity, of the selected rows, in at most N columns. Columns are read in chunks (X may be a
    memory-mapped store)."""
    rows = np.arange(x_nk.shape[0]) if rows is None else np.asarray(rows)
    n, k = len(rows), x_nk.shape[1]
    if k <= n:
        return np.asarray(x_nk[rows], np.float64)
    g = np.zeros((n, n))
    step = max(1, CHUNK_BYTES // (8 * n))
    for c in range(0, k, step):
        xc = np.asarray(x_nk[rows, c:c + step], np.float64)
        g += xc @ xc.T
    lam, v = np.linalg.eigh(g)
    keep = lam > lam.max() * 1e-12 if lam.max() > 0 else np.zeros_like(lam, bool)
    return v[:, keep] * np.sqrt(lam[keep])


def joint_weights(task_idx: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[B, N] multinomial counts: each task's pairs drawn with replacement, one draw per replicate,
    to be applied to every run (rows aligned by pair ID)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(task_idx)))
    for i in range(int(task_idx.max()) + 1):
        m = np.flatnonzero(task_idx == i)
        w[:, m] = rng.multinomial(len(m), np.full(len(m), 1.0 / len(m)), size=n_boot)
    return w


def weighted_spaces(y_nd: np.ndarray, task_idx: np.ndarray, w_bn: np.ndarray, *, clip: bool = True
                    ) -> np.ndarray:
    """[B, T, T] unbiased cosines under pair weights w (all ones: the plain estimator).

    ⟨μᵢ,μⱼ⟩ = ⟨Sᵢ,Sⱼ⟩/(nᵢnⱼ) with Sᵢ = Σ wₐyₐ; ‖μᵢ‖² = (‖Sᵢ‖² − Σ wₐ²‖yₐ‖²)/(nᵢ² − Σ wₐ²), the
    U-statistic without pairs of copies of one pair. NaN rows for a task whose ‖μ‖² ≤ 0.
    """
    t = int(task_idx.max()) + 1
    members = [np.flatnonzero(task_idx == i) for i in range(t)]
    n = np.array([len(m) for m in members], np.float64)
    r2 = np.einsum("nd,nd->n", y_nd, y_nd)
    b_all = w_bn.shape[0]
    out = np.empty((b_all, t, t))
    step = max(1, CHUNK_BYTES // (8 * t * max(y_nd.shape[1], 1)))
    for s in range(0, b_all, step):
        w = w_bn[s:s + step]
        sums = np.stack([w[:, m] @ y_nd[m] for m in members], axis=1)  # [b, T, d]
        gram = np.einsum("btd,bsd->bts", sums, sums)
        sq = np.stack([(w[:, m] ** 2) @ r2[m] for m in members], axis=1)  # [b, T]
        w2 = np.stack([np.sum(w[:, m] ** 2, axis=1) for m in members], axis=1)
        inner = gram / np.outer(n, n)
        with np.errstate(invalid="ignore", divide="ignore"):
            diag = (np.einsum("btt->bt", gram) - sq) / (n ** 2 - w2)
            root = np.sqrt(np.where(diag > 0, diag, np.nan))
            sim = inner / (root[:, :, None] * root[:, None, :])
        if clip:
            sim = np.clip(sim, -1.0, 1.0)
        idx = np.arange(t)
        sim[:, idx, idx] = np.where(diag > 0, 1.0, np.nan)
        out[s:s + step] = sim
    return out


def _upper(sim_btt: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(sim_btt.shape[-1], 1)
    return sim_btt[..., iu[0], iu[1]]


def correlation(a: np.ndarray, b: np.ndarray, method: str = "pearson") -> float:
    """Correlation of two vectors over the entries finite in both (NaN with < 3 or a constant)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok], b[ok]
    if method == "spearman":
        a, b = sps.rankdata(a), sps.rankdata(b)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def interval(est: float, reps: np.ndarray, alpha: float, kind: str = "basic",
             bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """Bootstrap interval from replicates: basic (2·est − upper/lower quantile) or percentile."""
    reps = np.asarray(reps, float)
    reps = reps[np.isfinite(reps)]
    if not np.isfinite(est) or len(reps) < 10:
        return float("nan"), float("nan")
    q_lo, q_hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    lo, hi = (2 * est - q_hi, 2 * est - q_lo) if kind == "basic" else (q_lo, q_hi)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return float(lo), float(hi)


def sharing(sim_btt: np.ndarray, categories: Sequence[Any]) -> np.ndarray:
    """[B] mean off-diagonal similarity of same-category task pairs minus different-category
    pairs (undefined entries skipped; NaN without both kinds of pairs)."""
    cat = np.asarray(categories)
    iu = np.triu_indices(len(cat), 1)
    same = cat[iu[0]] == cat[iu[1]]
    off = _upper(sim_btt)
    if not same.any() or same.all():
        return np.full(off.shape[:-1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(off[..., same], axis=-1) - np.nanmean(off[..., ~same], axis=-1)


@dataclasses.dataclass
class Comparison:
    """Task spaces of several runs on the same pairs, their replicates and RSA between them."""
    names: list[str]                 # run names [R]
    tasks: np.ndarray                # [T]
    sims: list[np.ndarray]           # per run [T, T] point estimate
    reps: list[np.ndarray]           # per run [B, T, T] joint-bootstrap replicates
    rsa: np.ndarray                  # [R, R]
    rsa_low: np.ndarray
    rsa_high: np.ndarray
    rsa_reps: np.ndarray             # [B, R, R]
    reliability: np.ndarray          # [R] split-half Spearman–Brown
    ceiling: np.ndarray              # [R, R] √(rel_a rel_b)
    rsa_raw: np.ndarray              # [R, R] plain correlation (before the bias correction)
    cross_half: np.ndarray           # [R, R] mean correlation of a's half-space with b's other half
    disattenuated: np.ndarray        # [R, R] cross_half[a, b] / √(cross_half[a, a] cross_half[b, b])
    method: str
    interval: str
    alpha: float


def compare(ys: Sequence[np.ndarray], task_labels: np.ndarray, names: Sequence[str], *, n_boot: int = 200,
            seed: int = 0, alpha: float = 0.05, method: str = "pearson", interval_kind: str = "basic",
            n_splits: int = 20) -> Comparison:
    """RSA between every two runs whose rows `ys[r]` ([N, d], same N pairs in the same order for
    every run) carry `task_labels`; intervals from one joint bootstrap of pairs."""
    tasks, idx = np.unique(np.asarray(task_labels).astype(str), return_inverse=True)
    w = joint_weights(idx, n_boot, seed)
    ones = np.ones((1, len(idx)))
    sims = [weighted_spaces(y, idx, ones)[0] for y in ys]
    reps = [weighted_spaces(y, idx, w) for y in ys]
    r = len(ys)
    off = [_upper(s) for s in sims]
    off_b = [_upper(s) for s in reps]
    raw, rsa = np.eye(r), np.eye(r)
    rsa_reps = np.ones((n_boot, r, r))
    low, high = np.eye(r), np.eye(r)
    for a, b in itertools.combinations(range(r), 2):
        raw[a, b] = raw[b, a] = correlation(off[a], off[b], method)
        rb = np.array([correlation(off_b[a][k], off_b[b][k], method) for k in range(n_boot)])
        rsa_reps[:, a, b] = rsa_reps[:, b, a] = rb
        rsa[a, b] = rsa[b, a] = bias_corrected(raw[a, b], rb) if interval_kind == "basic" else raw[a, b]
        low[a, b], high[a, b] = interval(raw[a, b], rb, alpha, interval_kind, (-1.0, 1.0))
        low[b, a], high[b, a] = low[a, b], high[a, b]
    rel = np.array([split_half(y, task_labels, n_splits=n_splits, seed=seed).spearman_brown for y in ys])
    with np.errstate(invalid="ignore"):
        ceiling = np.sqrt(np.clip(np.outer(rel, rel), 0, None))
    ch = cross_half(ys, idx, n_splits=n_splits, seed=seed, method=method)
    d = np.sqrt(np.clip(np.diag(ch), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        dis = np.where(np.outer(d, d) > 0, ch / np.outer(d, d), np.nan)
    return Comparison(list(names), tasks, sims, reps, rsa, low, high, rsa_reps, rel, ceiling, raw, ch, dis,
                      method, interval_kind, alpha)


def bias_corrected(est: float, reps: np.ndarray) -> float:
    """2·est − mean(replicates), clipped to [-1, 1]: the point estimate the basic interval is
    centred on (the raw estimate when too few replicates are finite)."""
    reps = np.asarray(reps, float)
    reps = reps[np.isfinite(reps)]
    if not np.isfinite(est) or len(reps) < 10:
        return float(est)
    return float(np.clip(2 * est - reps.mean(), -1.0, 1.0))


def cross_half(ys: Sequence[np.ndarray], task_idx: np.ndarray, *, n_splits: int = 20, seed: int = 0,
               method: str = "pearson") -> np.ndarray:
    """[R, R] mean over random halvings of every task's pairs of the correlation between run a's
    task space on one half and run b's on the other (both orders); the diagonal is each run's
    half-sample reliability. Disjoint halves make the two spaces' noise independent even where the
    runs share pairs."""
    rng = np.random.default_rng(seed + 7919)
    t = int(task_idx.max()) + 1
    members = [np.flatnonzero(task_idx == i) for i in range(t)]
    r = len(ys)
    acc, cnt = np.zeros((r, r)), np.zeros((r, r))
    for _ in range(n_splits):
        half = np.zeros(len(task_idx), bool)
        for mb in members:
            half[rng.permutation(mb)[: len(mb) // 2]] = True
        offs = []
        for h in (half, ~half):
            ones = np.ones((1, int(h.sum())))
            offs.append([_upper(weighted_spaces(y[h], task_idx[h], ones)[0]) for y in ys])
        for a in range(r):
            for b in range(a, r):
                vals = [correlation(offs[0][a], offs[1][b], method), correlation(offs[1][a], offs[0][b], method)]
                vals = [v for v in vals if np.isfinite(v)]
                if vals:
                    acc[a, b] += np.mean(vals)
                    cnt[a, b] += 1
    with np.errstate(invalid="ignore"):
        out = np.where(cnt > 0, acc / np.where(cnt > 0, cnt, 1), np.nan)
    return np.triu(out) + np.triu(out, 1).T


def planted_runs(n_tasks: int = 10, n_pairs: int = 20, k: int = 64, *, rank: int = 4, mix: float = 0.5,
                 coherence: float = 0.3, noise_corr: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Two runs' rows on the same pairs with known population task spaces (for checking RSA
    intervals): cos spaces C_a, C_b of random rank-`rank` factors, b's factors a mix of a's and
    fresh ones; rows μᵢ + ε with ε shared between runs at correlation `noise_corr`. Returns
    x_a, x_b, tasks, true_a, true_b and the population RSA (Pearson of their off-diagonals)."""
    rng = np.random.default_rng(seed)

    def unit_rows(f: np.ndarray) -> np.ndarray:
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    fa = unit_rows(rng.standard_normal((n_tasks, rank)))
    fb = unit_rows(np.sqrt(1 - mix) * fa + np.sqrt(mix) * unit_rows(rng.standard_normal((n_tasks, rank))))
    scale = math.sqrt(coherence / (1 - coherence) * k)
    mus = []
    for f in (fa, fb):
        q, _ = np.linalg.qr(rng.standard_normal((k, rank)))
        mus.append(scale * f @ q.T)
    e_a = rng.standard_normal((n_tasks * n_pairs, k))
    e_b = noise_corr * e_a + math.sqrt(1 - noise_corr ** 2) * rng.standard_normal(e_a.shape)
    tasks = np.repeat(np.array([f"t{i:02d}" for i in range(n_tasks)]), n_pairs)
    true_a, true_b = fa @ fa.T, fb @ fb.T
    iu = np.triu_indices(n_tasks, 1)
    return {"x_a": np.repeat(mus[0], n_pairs, 0) + e_a, "x_b": np.repeat(mus[1], n_pairs, 0) + e_b,
            "tasks": tasks, "true_a": true_a, "true_b": true_b,
            "rsa": float(np.corrcoef(true_a[iu], true_b[iu])[0, 1])}


# ---------------------------------------------------------------------------------------------
# Runs on disk
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunData:
    record: RunRecord
    keys: list[tuple[str, str]]      # (UID, pairID) per store row
    sketches: Any                    # [N, K] (memmap)
    category: dict[str, str]         # task → category
    correct: dict[tuple[str, str], bool]
    stats: dict[str, Any]            # task_space/stats.json
    summary: dict[str, Any]          # eval/summary.json
    num_params: int | None


def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise ValueError(f"{path}: missing ({what}); has the run finished?")
    return json.loads(path.read_text())


def load_run(record: RunRecord, category: str = "linguistics_term") -> RunData:
    """A finished pipeline workdir's store rows, scores and task-space stats."""
    from lmgrad import store as lstore

    path = pathlib.Path(record.path)
    st = lstore.open(path / "sketches")
    if not st.complete:
        raise ValueError(f"{path / 'sketches'}: store is incomplete ({len(st)} of {st.total_rows} rows)")
    meta = st.meta
    for col in ("UID", "pairID", category):
        if col not in meta:
            raise ValueError(f"{path / 'sketches'}: meta has no {col!r} column (have {sorted(meta)})")
    keys = list(zip(np.asarray(meta["UID"]).astype(str), np.asarray(meta["pairID"]).astype(str)))
    cats: dict[str, str] = {}
    for uid, c in zip(np.asarray(meta["UID"]).astype(str), np.asarray(meta[category]).astype(str)):
        cats.setdefault(uid, c)
    correct = {}
    scores = path / "eval" / "scores.jsonl"
    if scores.exists():
        for line in scores.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                correct[(str(r["UID"]), str(r["pairID"]))] = bool(r["correct"])
    summary = json.loads((path / "eval" / "summary.json").read_text()) if (path / "eval" / "summary.json").exists() else {}
    stats = _read_json(path / "task_space" / "stats.json", "the task-space stage's stats")
    n_params = record.num_params
    if n_params is None:
        n_params = stats.get("provenance", {}).get("model", {}).get("num_params")
    return RunData(record, keys, st.sketches, cats, correct, stats, summary, n_params)


def align(runs: Sequence[RunData]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (UID, pairID) keys present in every run, sorted, restricted to tasks with >= MIN_PAIRS
    such pairs; and notes on what was left out."""
    common = set(runs[0].keys)
    for r in runs[1:]:
        common &= set(r.keys)
    notes = []
    for r in runs:
        extra = len(set(r.keys) - common)
        if extra:
            notes.append(f"{r.record.name}: {extra} pair(s) absent from another run left out")
    keys = sorted(common)
    counts: dict[str, int] = {}
    for uid, _ in keys:
        counts[uid] = counts.get(uid, 0) + 1
    few = sorted(u for u, c in counts.items() if c < MIN_PAIRS)
    if few:
        notes.append(f"tasks with fewer than {MIN_PAIRS} common pairs left out: {', '.join(few)}")
        keys = [k for k in keys if k[0] not in few]
    if len({k[0] for k in keys}) < 3:
        raise ValueError("cross-run analysis needs >= 3 tasks with >= "
                         f"{MIN_PAIRS} pairs common to every run; have {sorted({k[0] for k in keys})}")
    return keys, notes


# ---------------------------------------------------------------------------------------------
# Trends and claims
# ---------------------------------------------------------------------------------------------

def permutation_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(two-sided exact permutation p of Spearman's ρ over runs, its floor 2/R! or 1/(n_perm+1))."""
    r = len(x)
    rho = correlation(x, y, "spearman")
    if not np.isfinite(rho):
        return float("nan"), float("nan")
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    if r <= 8:
        perms = itertools.permutations(ry)
        null = np.array([np.corrcoef(rx, p)[0, 1] for p in perms])
        floor = 2 / math.factorial(r) if len(set(rx)) == r and len(set(ry)) == r else 1 / len(null)
    else:
        rng = np.random.default_rng(0)
        null = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(9999)])
        null = np.append(null, rho)
        floor = 1 / len(null)
    p = float(np.mean(np.abs(null) >= abs(rho) - 1e-12))
    return p, min(float(floor), 1.0)


def trend(x: Sequence[float], est: Sequence[float], reps: np.ndarray | None, *, alpha: float,
          interval_kind: str, what: str) -> dict[str, Any]:
    """Spearman ρ (run-level permutation p) and least-squares slope of `est` on `x` (interval from
    the joint-bootstrap replicates [B, R] when given)."""
    x, y = np.asarray(x, float), np.asarray(est, float)
    ok = np.isfinite(x) & np.isfinite(y)
    out: dict[str, Any] = {"x": what, "n_runs": int(ok.sum())}
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        out["note"] = "fewer than 2 runs with a value: no trend"
        return out
    slope = float(np.polyfit(x[ok], y[ok], 1)[0])
    out["slope"] = slope
    if ok.sum() >= 3:
        out["spearman"] = correlation(x[ok], y[ok], "spearman")
        out["p_perm"], out["p_floor"] = permutation_p(x[ok], y[ok])
    if reps is not None:
        rb = np.asarray(reps, float)[:, ok]
        good = np.isfinite(rb).all(axis=1)
        slopes = np.array([np.polyfit(x[ok], row, 1)[0] for row in rb[good]])
        out["slope_interval"] = list(interval(slope, slopes, alpha, interval_kind))
        out["slope_share_positive"] = float(np.mean(slopes > 0)) if len(slopes) else float("nan")
    return out


def _direction(t: Mapping[str, Any]) -> str:
    s = t.get("slope")
    if s is None or not np.isfinite(s):
        return "undetermined"
    ci = t.get("slope_interval")
    if ci and np.isfinite(ci[0]):
        if ci[0] > 0:
            return "rises (slope interval above 0)"
        if ci[1] < 0:
            return "falls (slope interval below 0)"
        return "no clear trend (slope interval includes 0)"
    return "rises (point estimates only)" if s > 0 else "falls (point estimates only)"


def _groups(records: Sequence[RunRecord]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        out.setdefault(r.size or r.name, []).append(i)
    for g in out.values():
        g.sort(key=lambda i: (records[i].step is None, records[i].step or 0))
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _ci(lo_hi: Sequence[float] | None) -> str:
    if not lo_hi or not all(np.isfinite(lo_hi)):
        return ""
    return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"


def _p(t: Mapping[str, Any]) -> str:
    if "p_perm" not in t:
        return "too few runs for a permutation test"
    return (f"Spearman ρ = {_fmt(t['spearman'], 2)}, run-level permutation p = {_fmt(t['p_perm'], 3)} "
            f"(smallest attainable with {t['n_runs']} runs: {t['p_floor']:.2g})")


def analyze(records: Sequence[RunRecord], out_dir: str | os.PathLike, *, n_boot: int = 200, seed: int = 0,
            alpha: float = 0.05, rsa: str = "pearson", interval: str = "basic", n_splits: int = 20,
            category: str = "linguistics_term") -> dict[str, Any]:
    """Compares the runs' task spaces; writes OUT/{stats.json, report.md, *.png}; returns the stats."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records)
    runs = [load_run(r, category) for r in records]
    keys, notes = align(runs)
    labels = np.array([k[0] for k in keys])
    ys = []
    for r in runs:
        pos = {k: i for i, k in enumerate(r.keys)}
        ys.append(gram_factor(r.sketches, np.array([pos[k] for k in keys])))
        r.sketches = None  # the factor holds every inner product; let a multi-shard store's rows go
    comp = compare(ys, labels, [r.name for r in records], n_boot=n_boot, seed=seed, alpha=alpha, method=rsa,
                   interval_kind=interval, n_splits=n_splits)
    _, idx = np.unique(labels, return_inverse=True)
    w = joint_weights(idx, n_boot, seed)  # the same draws `compare` used
    cats = [runs[0].category.get(t, "") for t in comp.tasks]
    per_run = []
    share_reps, acc_reps = [], []
    for i, (rec, rd) in enumerate(zip(records, runs)):
        sh = float(sharing(comp.sims[i][None], cats)[0])
        sh_b = sharing(comp.reps[i], cats)
        corr = np.array([rd.correct.get(k, np.nan) for k in keys], float)
        if np.isfinite(corr).all():
            acc_b = (w @ corr) / w.sum(axis=1)
        else:
            acc_b = np.full(n_boot, np.nan)
        acc = rd.summary.get("overall", {}).get("accuracy")
        ctrl = rd.stats.get("controlled") if isinstance(rd.stats.get("controlled"), dict) else None
        share_reps.append(sh_b)
        acc_reps.append(acc_b)
        per_run.append({
            "name": rec.name, "size": rec.size or rec.name, "num_params": rd.num_params, "step": rec.step,
            "n_pairs_compared": len(keys),
            "accuracy": acc, "accuracy_interval": list(interval_fn(acc, acc_b, alpha, "percentile", (0.0, 1.0))),
            "accuracy_n_pairs": rd.summary.get("overall", {}).get("n_pairs"),
            "controlled_fit": None if ctrl is None else {
                k: ctrl.get(k) for k in ("name", "coef", "statistic", "p_value", "p_text", "n_perm")},
            # Percentile, not basic: sharing's raw estimate is nearly unbiased, and at low coherence
            # the replicates' skew would push a basic interval off the truth (simulated in tests).
            "sharing": sh, "sharing_interval": list(interval_fn(sh, sh_b, alpha, "percentile", (-2.0, 2.0))),
            "reliability": float(comp.reliability[i]),
            "n_undefined_tasks": int(np.sum(~np.isfinite(np.diag(comp.sims[i])))),
        })
    share_reps_br = np.stack(share_reps, 1)
    acc_reps_br = np.stack(acc_reps, 1)
    ctrl_est = np.array([np.nan if p["controlled_fit"] is None or p["controlled_fit"]["coef"] is None
                         else p["controlled_fit"]["coef"] for p in per_run], float)
    share_est = np.array([p["sharing"] for p in per_run])
    acc_est = np.array([np.nan if p["accuracy"] is None else p["accuracy"] for p in per_run], float)
    groups = _groups(records)
    tr = dict(alpha=alpha, interval_kind=interval)

    # Claim 1: one run per size (its last step); x = log10 parameters.
    finals = [g[-1] for g in groups.values()]
    params = np.array([np.nan if per_run[i]["num_params"] is None else math.log10(per_run[i]["num_params"])
                       for i in finals])
    claim1: dict[str, Any] = {"runs": [records[i].name for i in finals]}
    claim1["rsa_between_sizes"] = [
        {"a": records[a].name, "b": records[b].name, "rsa": float(comp.rsa[a, b]),
         "interval": [float(comp.rsa_low[a, b]), float(comp.rsa_high[a, b])],
         "disattenuated": float(comp.disattenuated[a, b]), "ceiling": float(comp.ceiling[a, b])}
        for a, b in itertools.combinations(finals, 2)]
    if len(finals) >= 2 and np.isfinite(params).sum() >= 2 and np.ptp(params[np.isfinite(params)]) > 0:
        claim1["controlled_fit"] = trend(params, ctrl_est[finals], None, what="log10 params", **tr)
        claim1["sharing"] = trend(params, share_est[finals], share_reps_br[:, finals], what="log10 params", **tr)
        claim1["accuracy"] = trend(params, acc_est[finals], acc_reps_br[:, finals], what="log10 params", **tr)
    else:
        claim1["note"] = "needs >= 2 sizes with known parameter counts"

    # Claims 2 and 3: within each size, over steps.
    claim2: dict[str, Any] = {}
    claim3: dict[str, Any] = {}
    for size, g in groups.items():
        steps = [records[i].step for i in g]
        if len(g) < 2 or any(s is None for s in steps):
            continue
        x = np.log10(np.asarray(steps, float) + 1)
        if len(g) >= 3:
            claim2[size] = {"runs": [records[i].name for i in g], "steps": steps,
                            "sharing": trend(x, share_est[g], share_reps_br[:, g], what="log10(1+step)", **tr),
                            "controlled_fit": trend(x, ctrl_est[g], None, what="log10(1+step)", **tr)}
        cons = []
        for a, b in zip(g[:-1], g[1:]):
            cons.append({"from": records[a].name, "to": records[b].name, "rsa": float(comp.rsa[a, b]),
                         "interval": [float(comp.rsa_low[a, b]), float(comp.rsa_high[a, b])],
                         "ceiling": float(comp.ceiling[a, b]), "rsa_raw": float(comp.rsa_raw[a, b]),
                         "disattenuated": float(comp.disattenuated[a, b])})
        pts = np.array([c["rsa"] for c in cons])
        for j, c in enumerate(cons):
            others = np.delete(pts, j)
            # A sharp drop: this transition's interval lies wholly below a typical transition's RSA.
            c["sharp_drop"] = bool(len(others) >= 2 and np.isfinite(c["interval"][1])
                                   and c["interval"][1] < np.nanmedian(others))
        claim3[size] = {"consecutive": cons, "min_rsa": float(np.nanmin(pts)) if np.isfinite(pts).any() else None,
                        "first_last_rsa": float(comp.rsa[g[0], g[-1]]),
                        "first_last_interval": [float(comp.rsa_low[g[0], g[-1]]), float(comp.rsa_high[g[0], g[-1]])],
                        "first_last_disattenuated": float(comp.disattenuated[g[0], g[-1]]),
                        "sharp_drops": [f"{c['from']} → {c['to']}" for c in cons if c["sharp_drop"]]}

    stats = {
        "runs": per_run, "tasks": comp.tasks.tolist(), "n_pairs": len(keys), "notes": notes,
        "settings": {"n_boot": n_boot, "seed": seed, "alpha": alpha, "rsa": rsa, "interval": interval,
                     "n_splits": n_splits, "category": category,
                     "resampling": "joint stratified bootstrap of pair IDs (one draw per replicate, every run)"},
        "rsa": {"names": comp.names, "matrix": comp.rsa.tolist(), "low": comp.rsa_low.tolist(),
                "high": comp.rsa_high.tolist(), "ceiling": comp.ceiling.tolist(),
                "reliability": comp.reliability.tolist(), "raw": comp.rsa_raw.tolist(),
                "estimate": "bias-corrected (2·raw − mean of replicates)" if interval == "basic" else "raw",
                "cross_half": comp.cross_half.tolist(), "disattenuated": comp.disattenuated.tolist()},
        "claims": {"size_generalisation": claim1, "distributed_over_training": claim2,
                   "stability_over_training": claim3},
    }
    lio.write_json(out / "stats.json", jsonable(stats), allow_nan=True)
    figs = _figures(out, records, per_run, comp, groups)
    lio.write_text(out / "report.md", _report(stats, figs))
    return stats


def interval_fn(est: float | None, reps: np.ndarray, alpha: float, kind: str,
                bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """`interval` for a possibly missing estimate (NaN interval then)."""
    if est is None:
        return float("nan"), float("nan")
    return interval(float(est), reps, alpha, kind, bounds)


# ---------------------------------------------------------------------------------------------
# Figures and report
# ---------------------------------------------------------------------------------------------

def _save(fig: Any, path: pathlib.Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    lio.atomic_write(path, buf.getvalue())


def _figures(out: pathlib.Path, records: Sequence[RunRecord], per_run: list[dict], comp: Comparison,
             groups: Mapping[str, list[int]]) -> list[str]:
    from matplotlib.figure import Figure

    made = []
    r = len(records)
    fig = Figure(figsize=(1.2 + 0.45 * r, 1.0 + 0.45 * r))
    ax = fig.add_subplot()
    im = ax.imshow(comp.rsa, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(r), comp.names, rotation=90, fontsize=7)
    ax.set_yticks(range(r), comp.names, fontsize=7)
    if r <= 12:
        for a in range(r):
            for b in range(r):
                ax.text(b, a, f"{comp.rsa[a, b]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"RSA ({comp.method})")
    ax.set_title("Task-space similarity between runs")
    _save(fig, out / "rsa_heatmap.png")
    made.append("rsa_heatmap.png")

    metrics = [("controlled_fit", "taxonomy fit (controlled coef)"), ("sharing", "within-category sharing"),
               ("accuracy", "BLiMP accuracy"), ("reliability", "split-half reliability")]

    def value(p: dict, m: str) -> tuple[float, float, float]:
        if m == "controlled_fit":
            c = p["controlled_fit"]
            v = np.nan if c is None or c.get("coef") is None else c["coef"]
            return v, np.nan, np.nan
        v = p[m] if p[m] is not None else np.nan
        lo, hi = p.get(f"{m}_interval", [np.nan, np.nan])
        return v, lo, hi

    def panel(ax: Any, xs: np.ndarray, idx: Sequence[int], m: str, label: str) -> None:
        v = np.array([value(per_run[i], m) for i in idx], float)
        err = np.abs(np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]]))
        err = np.where(np.isfinite(err), err, 0)
        ax.errorbar(xs, v[:, 0], yerr=err, marker="o", capsize=2, label=label)

    series = {k: g for k, g in groups.items() if len(g) >= 2 and all(records[i].step is not None for i in g)}
    if series:
        fig = Figure(figsize=(4 * len(metrics), 3.2))
        for j, (m, title) in enumerate(metrics):
            ax = fig.add_subplot(1, len(metrics), j + 1)
            for size, g in series.items():
                panel(ax, np.array([records[i].step + 1 for i in g], float), g, m, size)
            ax.set_xscale("log")
            ax.set_xlabel("1 + step")
            ax.set_title(title, fontsize=9)
        fig.axes[0].legend(fontsize=7)
        _save(fig, out / "metrics_over_step.png")
        made.append("metrics_over_step.png")
    finals = [g[-1] for g in groups.values()]
    if len(finals) >= 2 and all(per_run[i]["num_params"] for i in finals):
        order = sorted(finals, key=lambda i: per_run[i]["num_params"])
        fig = Figure(figsize=(4 * len(metrics), 3.2))
        for j, (m, title) in enumerate(metrics):
            ax = fig.add_subplot(1, len(metrics), j + 1)
            panel(ax, np.array([per_run[i]["num_params"] for i in order], float), order, m, "last step")
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_title(title, fontsize=9)
        _save(fig, out / "metrics_vs_size.png")
        made.append("metrics_vs_size.png")
    return made


def _report(s: Mapping[str, Any], figs: Sequence[str]) -> str:
    st = s["settings"]
    pct = int(round(100 * (1 - st["alpha"])))
    lines = ["# Cross-run analysis", "",
             f"{len(s['runs'])} runs, {len(s['tasks'])} tasks, {s['n_pairs']} pairs common to every run. "
             f"Intervals: {pct}% bootstrap over {st['n_boot']} joint resamples of pair IDs (one draw applied to "
             f"every run; {st['interval']} for RSA and slopes, percentile for accuracy and sharing), so they measure pair-sampling noise for *these* models; "
             "trend p-values permute runs and say how far the pattern generalises across models, which "
             "few runs cannot show.", ""]
    lines += [f"- {n}" for n in s["notes"]]
    lines += ["", "## Runs", "",
              "| run | size | params | step | BLiMP acc. | taxonomy fit (controlled) | within-category sharing | reliability |",
              "|---|---|---|---|---|---|---|---|"]
    for p in s["runs"]:
        c = p["controlled_fit"]
        cf = "–" if c is None or c.get("coef") is None else f"{c['coef']:.3f} ({c.get('p_text') or ''})"
        lines.append(f"| {p['name']} | {p['size']} | {p['num_params'] or '–'} | "
                     f"{'–' if p['step'] is None else p['step']} | {_fmt(p['accuracy'])}{_ci(p['accuracy_interval'])} | "
                     f"{cf} | {_fmt(p['sharing'])}{_ci(p['sharing_interval'])} | {_fmt(p['reliability'], 2)} |")
    c1 = s["claims"]["size_generalisation"]
    lines += ["", "## Claim 1: larger models fit the linguistic taxonomy better", ""]
    if "note" in c1:
        lines.append(f"Not testable here: {c1['note']}.")
    else:
        t = c1["controlled_fit"]
        lines.append(f"Taxonomy fit controlled for surface similarity (each run's task_space/stats.json) "
                     f"vs log10 parameters over {', '.join(c1['runs'])}: {_direction(t)}; slope "
                     f"{_fmt(t.get('slope'))}; {_p(t)}.")
        t = c1["sharing"]
        lines.append(f"Within-category sharing vs size: {_direction(t)}, slope {_fmt(t.get('slope'))}"
                     f"{_ci(t.get('slope_interval'))}; {_p(t)}.")
        t = c1["accuracy"]
        lines.append(f"BLiMP accuracy vs size: {_direction(t)}, slope {_fmt(t.get('slope'))}"
                     f"{_ci(t.get('slope_interval'))}.")
    between = c1.get("rsa_between_sizes") or []
    if between:
        lines += ["", "Task-space similarity between sizes (last steps): " + "; ".join(
            f"{x['a']} vs {x['b']} RSA {x['rsa']:.2f}{_ci(x['interval'])} (disattenuated "
            f"{_fmt(x['disattenuated'], 2)})" for x in between) + "."]
    c2 = s["claims"]["distributed_over_training"]
    lines += ["", "## Claim 2: sharing between related tasks rises during pre-training", ""]
    if not c2:
        lines.append("Not testable here: no size has >= 3 checkpoints.")
    for size, c in c2.items():
        t = c["sharing"]
        lines.append(f"- {size} (steps {', '.join(map(str, c['steps']))}): within-category sharing vs "
                     f"log10(1+step) {_direction(t)}, slope {_fmt(t.get('slope'))}{_ci(t.get('slope_interval'))}; "
                     f"{_p(t)}. Controlled taxonomy fit: {_direction(c['controlled_fit'])}.")
    c3 = s["claims"]["stability_over_training"]
    lines += ["", "## Claim 3: task spaces stay stable over training, without sharp stages", ""]
    if not c3:
        lines.append("Not testable here: no size has >= 2 checkpoints.")
    for size, c in c3.items():
        cons = "; ".join(f"{x['from'].split('@')[-1]}→{x['to'].split('@')[-1]} {x['rsa']:.2f}{_ci(x['interval'])}"
                         f" (disattenuated {_fmt(x.get('disattenuated'), 2)})" for x in c["consecutive"])
        drops = ", ".join(c["sharp_drops"]) or "none"
        lines.append(f"- {size}: consecutive-checkpoint RSA {cons}. First vs last "
                     f"{_fmt(c['first_last_rsa'], 2)}{_ci(c['first_last_interval'])} (disattenuated "
                     f"{_fmt(c.get('first_last_disattenuated'), 2)}). Sharp drops "
                     f"(interval wholly below the median of the other transitions): {drops}.")
    lines += ["", "Reading RSA: the RSA is the bias-corrected correlation of two runs' unbiased similarities "
              "(pair noise attenuates the raw one), with its bootstrap interval. The disattenuated RSA "
              "correlates one run's space on half of every task's pairs with the other run's on the other "
              "half, divided by each run's own cross-half correlation: it estimates the RSA of the "
              "population spaces (about 1 if two runs have one task space, however noisy), and unlike the "
              "independent-noise ceiling √(rel_a·rel_b) it is not inflated by the pairs the runs share. "
              "Below about 0.9 it says the spaces differ; it is noisy when a run's reliability is low.", ""]
    lines += [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"
