"""Surface controls: task spaces built from the pairs' own text, and tests that partial them out.

Paradigms that share a linguistic category also share templates, words and lengths, so a gradient
task space can agree with a linguistic hypothesis for surface reasons alone. This module builds
surface task spaces from the pairs themselves (no model):

* ``diff_words`` / ``diff_tokens``: overlap of the words (tokens) that differ between good and
  bad, pooled per task (cosine of counts, or Jaccard of sets);
* ``bow`` / ``bow_tokens``: bag-of-words cosine of the whole sentences (idf-weighted by default,
  so words every task uses, like "the", do not make all tasks alike);
* ``length`` / ``length_tokens``: −|difference of mean sentence length|;

and tests the hypothesis on the gradient space controlling for them: :func:`mrqap` (multiple
regression QAP with Freedman–Lane permutation of residuals, or double semi-partialling; Dekker,
Krackhardt & Snijders 2007, Psychometrika 72:563–581) and :func:`partial_mantel` (Smouse, Long &
Sokal 1986, Systematic Zoology 35:627–632). Matrices are [T, T] over tasks in sorted-name order
(as :func:`lmgrad.analysis.space.task_index`); only off-diagonal entries enter any test, and
permutations act on tasks (rows and columns jointly), which keeps the dependence among entries
that share a task.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmgrad.analysis.stats import StatResult, mantel

ALPHA = 0.05
_WORD_RE = re.compile(r"\w+|[^\w\s]")
FREEDMAN_LANE = "freedman_lane"
DSP = "dsp"
REFERENCE_MRQAP = ("Dekker, Krackhardt & Snijders (2007), Sensitivity of MRQAP tests to "
                   "collinearity and autocorrelation conditions, Psychometrika 72:563-581")
REFERENCE_PARTIAL_MANTEL = ("Smouse, Long & Sokal (1986), Multiple regression and correlation "
                            "extensions of the Mantel test, Systematic Zoology 35:627-632")


# ---------------------------------------------------------------------------------------------
# Surface task spaces
# ---------------------------------------------------------------------------------------------

def words(sentence: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _WORD_RE.findall(sentence.lower())


def differing(good: Sequence[Any], bad: Sequence[Any]) -> Counter:
    """The multiset symmetric difference of two token sequences: what the pair changes.

    "The cat sleeps" / "The cat sleep" → {sleeps: 1, sleep: 1}; a pure reordering ("Who did
    you see" / "Who you did see") has an empty difference, as it changes no word.
    """
    g, b = Counter(good), Counter(bad)
    return (g - b) + (b - g)


def _cosine_counts(counters: Sequence[Counter], idf: bool) -> np.ndarray:
    vocab = sorted({w for c in counters for w in c}, key=str)
    col = {w: i for i, w in enumerate(vocab)}
    m = np.zeros((len(counters), len(vocab)))
    for i, c in enumerate(counters):
        for w, n in c.items():
            m[i, col[w]] = n
    if idf:  # log(T / df): a word in every task carries no information about which tasks are alike
        df = (m > 0).sum(0)
        m = m * np.log(len(counters) / np.maximum(df, 1))[None, :]
    norms = np.linalg.norm(m, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = m / norms[:, None]
    sim = u @ u.T
    np.fill_diagonal(sim, np.where(norms > 0, 1.0, np.nan))
    return sim


def _jaccard(counters: Sequence[Counter]) -> np.ndarray:
    sets = [set(c) for c in counters]
    t = len(sets)
    sim = np.ones((t, t))
    for i in range(t):
        for j in range(i + 1, t):
            union = len(sets[i] | sets[j])
            sim[i, j] = sim[j, i] = len(sets[i] & sets[j]) / union if union else np.nan
    return sim


def _length_sim(lengths: Sequence[float]) -> np.ndarray:
    m = np.asarray(lengths, np.float64)
    return -np.abs(m[:, None] - m[None, :])


@dataclasses.dataclass
class SurfaceSpaces:
    """Surface task spaces over the same tasks: ``spaces[name]`` is [T, T] in ``names`` order."""
    names: np.ndarray
    spaces: dict[str, np.ndarray]
    description: dict[str, str]


TokenPairs = Mapping[str, Sequence[tuple[Sequence[int], Sequence[int]]]]


def surface_spaces(pairs: Mapping[str, Sequence[tuple[str, str]]],
                   tokens: TokenPairs | None = None, *, overlap: str = "cosine",
                   idf: bool = True) -> SurfaceSpaces:
    """Surface task spaces from each task's (good, bad) sentences and, optionally, token ids.

    ``overlap`` (``"cosine"`` of counts or ``"jaccard"`` of sets) applies to the differing
    words/tokens; ``idf`` weights the whole-sentence bag of words by log(T / document frequency)
    (a word used by every task then weighs 0). A task whose pairs differ in no word (reorderings
    only) has NaN in ``diff_words``: overlap is undefined for it.
    """
    if overlap not in ("cosine", "jaccard"):
        raise ValueError(f"overlap: expected 'cosine' or 'jaccard', got {overlap!r}")
    names = np.array(sorted(map(str, pairs)))
    if len(names) < 2:
        raise ValueError(f"surface spaces need >= 2 tasks, got {list(names)}")
    empty = [n for n in names if not pairs[n]]
    if empty:
        raise ValueError(f"surface spaces: tasks with no pairs: {empty}")
    spaces: dict[str, np.ndarray] = {}
    desc: dict[str, str] = {}

    def add(suffix: str, seqs: dict[str, list[tuple[Sequence[Any], Sequence[Any]]]],
            unit: str) -> None:
        diff = [sum((differing(g, b) for g, b in seqs[n]), Counter()) for n in names]
        spaces[f"diff_{suffix}"] = _cosine_counts(diff, False) if overlap == "cosine" \
            else _jaccard(diff)
        desc[f"diff_{suffix}"] = f"{overlap} overlap of the {unit} that differ between good and bad"
        bow = [sum((Counter(g) + Counter(b) for g, b in seqs[n]), Counter()) for n in names]
        spaces[f"bow_{suffix}" if suffix != "words" else "bow"] = _cosine_counts(bow, idf)
        desc[f"bow_{suffix}" if suffix != "words" else "bow"] = \
            f"bag-of-{unit} cosine of whole sentences" + (" (idf-weighted)" if idf else "")
        lens = [np.mean([(len(g) + len(b)) / 2 for g, b in seqs[n]]) for n in names]
        spaces[f"length_{suffix}" if suffix != "words" else "length"] = _length_sim(lens)
        desc[f"length_{suffix}" if suffix != "words" else "length"] = \
            f"-|difference of mean sentence length in {unit}|"

    add("words", {n: [(words(g), words(b)) for g, b in pairs[n]] for n in names}, "words")
    if tokens is not None:
        missing = sorted(set(names) - set(map(str, tokens)))
        if missing:
            raise ValueError(f"surface spaces: no token ids for tasks {missing}")
        add("tokens", {n: [(list(map(int, g)), list(map(int, b))) for g, b in tokens[n]]
                       for n in names}, "tokens")
    return SurfaceSpaces(names, spaces, desc)


def surface_fits(spaces: SurfaceSpaces | Mapping[str, np.ndarray], hyp_tt: np.ndarray, *,
                 n_perm: int = 999, seed: int = 0) -> dict[str, StatResult]:
    """Each surface space's own agreement with the hypothesis (Mantel, Pearson, one-sided).

    A surface space that fits the hypothesis as well as the gradient space does is the reason to
    read :func:`mrqap` rather than the plain Mantel test.
    """
    sp = spaces.spaces if isinstance(spaces, SurfaceSpaces) else spaces
    return {name: mantel(np.nan_to_num(mat, nan=0.0), hyp_tt, n_perm=n_perm, seed=seed)
            for name, mat in sp.items()}


# ---------------------------------------------------------------------------------------------
# Controlled tests
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PermutationTest:
    """A matrix-permutation test of one predictor's effect on a task space."""
    name: str
    statistic: float     # t-value of the predictor (mrqap) or partial r (partial_mantel)
    coef: float          # regression coefficient (mrqap) or partial r
    p_value: float       # (1 + #{null >= observed}) / (1 + n_perm); never below p_floor
    n_perm: int
    n: int               # off-diagonal entries used
    method: str
    reference: str
    dropped: list[str] = dataclasses.field(default_factory=list)  # tasks with undefined rows
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def p_floor(self) -> float:
        return 1.0 / (self.n_perm + 1)

    def p_text(self) -> str:
        """``p = 0.03``, or ``p ≤ 0.001`` when no permutation reached the observed value."""
        if self.p_value <= self.p_floor * (1 + 1e-9):
            return f"p ≤ {self.p_floor:.2g}"
        return f"p = {self.p_value:.2g}"

    @property
    def interpretation(self) -> str:
        verdict = ("effect beyond the controls" if self.p_value < ALPHA
                   else "no evidence of an effect beyond the controls")
        return (f"{self.method}: statistic {self.statistic:.3f}, {self.p_text()} "
                f"({self.n_perm} permutations, {self.n} entries): {verdict}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["p_floor"], d["p_text"], d["interpretation"] = self.p_floor, self.p_text(), \
            self.interpretation
        return d


def _prepare(y: np.ndarray, xs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray],
                                                                list[int]]:
    y = np.asarray(y, np.float64)
    t = y.shape[0]
    if y.ndim != 2 or y.shape != (t, t):
        raise ValueError(f"y: expected a square [T, T] matrix, got shape {y.shape}")
    xs = [np.asarray(x, np.float64) for x in xs]
    for i, x in enumerate(xs):
        if x.shape != y.shape:
            raise ValueError(f"predictor {i}: shape {x.shape} differs from y's {y.shape}")
    off = ~np.eye(t, dtype=bool)
    # An undefined task (signal below noise) has a NaN row in y: drop it from every matrix,
    # rather than let NaNs move around under permutation.
    keep = [i for i in range(t) if np.isfinite(y[i, off[i]]).any()]
    y = y[np.ix_(keep, keep)]
    xs = [x[np.ix_(keep, keep)] for x in xs]
    iu = np.triu_indices(len(keep), 1)
    if not np.isfinite(y[iu]).all():
        raise ValueError("y: scattered NaN entries remain after dropping undefined tasks")
    for i, x in enumerate(xs):
        if not np.isfinite(x[iu]).all():
            raise ValueError(f"predictor {i}: NaN/inf off-diagonal entries")
    if len(keep) < 4:
        raise ValueError(f"permutation regression needs >= 4 tasks with defined rows, "
                         f"got {len(keep)}")
    return y, xs, keep


def _dropped(t0: int, keep: list[int], names: Sequence[str] | None) -> list[str]:
    lab = list(map(str, names)) if names is not None else [str(i) for i in range(t0)]
    return [lab[i] for i in range(t0) if i not in set(keep)]


def _perms(t: int, n_perm: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permuted(np.tile(np.arange(t), (n_perm, 1)), axis=1)


def _resid(z_pm: np.ndarray, design_mp: np.ndarray) -> np.ndarray:
    """Residuals of each row of z (length m) on the columns of the design."""
    beta = np.linalg.lstsq(design_mp, z_pm.T, rcond=None)[0]
    return z_pm - (design_mp @ beta).T


def _t_stat(y_pm: np.ndarray, x_pm: np.ndarray, controls_mq: np.ndarray) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """OLS coefficient and t of x in y ~ 1 + x + controls, row by row (Frisch–Waugh–Lovell)."""
    ry, rx = _resid(y_pm, controls_mq), _resid(x_pm, controls_mq)
    sxx = np.einsum("pm,pm->p", rx, rx)
    b = np.einsum("pm,pm->p", rx, ry) / sxx
    dof = y_pm.shape[1] - controls_mq.shape[1] - 1
    s2 = np.einsum("pm,pm->p", ry - b[:, None] * rx, ry - b[:, None] * rx) / dof
    return b, b / np.sqrt(s2 / sxx)


def _tail(null: np.ndarray, obs: float, alternative: str) -> float:
    if alternative == "greater":
        hits = np.sum(null >= obs - 1e-12 * max(1.0, abs(obs)))
    elif alternative == "two-sided":
        hits = np.sum(np.abs(null) >= abs(obs) - 1e-12 * max(1.0, abs(obs)))
    else:
        raise ValueError(f"alternative: expected 'greater' or 'two-sided', got {alternative!r}")
    return float((1 + hits) / (1 + len(null)))


def mrqap(y: np.ndarray, xs: Sequence[np.ndarray], *, n_perm: int = 999, seed: int = 0,
          method: str = FREEDMAN_LANE, alternative: str = "greater",
          names: Sequence[str] | None = None) -> PermutationTest:
    """MRQAP test of the first predictor ``xs[0]`` in y ~ 1 + xs[0] + xs[1:] (off-diagonal entries).

    ``method="freedman_lane"`` (Freedman & Lane 1983, as evaluated for MRQAP by Dekker,
    Krackhardt & Snijders 2007): fit the reduced model y ~ 1 + controls, permute its residual
    matrix over tasks, add back the fitted values, refit the full model. ``"dsp"`` (double
    semi-partialling, Dekker et al.'s recommendation under strong collinearity): permute the
    residual matrix of xs[0] on the controls. Both use the t-value of xs[0] (a pivotal statistic,
    which those authors show keeps the level where the raw coefficient does not). One-sided
    (``"greater"``: the hypothesis predicts more similarity) unless ``alternative="two-sided"``.
    Tasks whose y row is undefined (NaN) are dropped and listed in ``dropped`` (by ``names``,
    else by index).
    """
    if method not in (FREEDMAN_LANE, DSP):
        raise ValueError(f"method: expected {FREEDMAN_LANE!r} or {DSP!r}, got {method!r}")
    if not xs:
        raise ValueError("mrqap: needs at least the tested predictor")
    t0 = np.asarray(y).shape[0]
    y, xs, keep = _prepare(y, xs)
    t = len(keep)
    iu = np.triu_indices(t, 1)
    m = len(iu[0])
    controls = np.column_stack([np.ones(m)] + [c[iu] for c in xs[1:]])
    if m <= controls.shape[1] + 1:
        raise ValueError(f"mrqap: {m} entries for {controls.shape[1] + 1} coefficients")
    yv, xv = y[iu][None], xs[0][iu][None]
    coef, tval = (float(v[0]) for v in _t_stat(yv, xv, controls))
    perms = _perms(t, n_perm, seed)
    rows, cols = perms[:, iu[0]], perms[:, iu[1]]
    if method == FREEDMAN_LANE:
        e = _resid(yv, controls)[0]
        e_mat = np.zeros((t, t))
        e_mat[iu] = e
        e_mat = e_mat + e_mat.T
        y_perm = (yv - e) + e_mat[rows, cols]
        _, null = _t_stat(y_perm, np.broadcast_to(xv, y_perm.shape), controls)
    else:
        rx = _resid(xv, controls)[0]
        rx_mat = np.zeros((t, t))
        rx_mat[iu] = rx
        rx_mat = rx_mat + rx_mat.T
        x_perm = rx_mat[rows, cols]
        _, null = _t_stat(np.broadcast_to(yv, x_perm.shape), x_perm, controls)
    p = _tail(null, tval, alternative)
    dropped = _dropped(t0, keep, names)
    return PermutationTest(f"mrqap_{method}", tval, coef, p, n_perm, m, method, REFERENCE_MRQAP,
                           dropped, {"alternative": alternative, "n_controls": len(xs) - 1,
                                     "null_mean": float(null.mean()),
                                     "null_q95": float(np.quantile(null, 0.95))})


def partial_mantel(y: np.ndarray, x: np.ndarray, controls: Sequence[np.ndarray], *,
                   n_perm: int = 999, seed: int = 0, alternative: str = "greater",
                   names: Sequence[str] | None = None) -> PermutationTest:
    """Partial Mantel test (Smouse, Long & Sokal 1986): Pearson r of the residuals of y and of x
    after regressing each on 1 + controls (off-diagonal entries); the null permutes x's residual
    matrix over tasks. Known to be liberal when the controls are spatially/structurally
    autocorrelated (Guillot & Rousset 2013); :func:`mrqap` with Freedman–Lane is the default to
    read, this is the classical reference point.
    """
    t0 = np.asarray(y).shape[0]
    y, (x, *ctrl), keep = _prepare(y, [x, *controls])
    t = len(keep)
    iu = np.triu_indices(t, 1)
    m = len(iu[0])
    design = np.column_stack([np.ones(m)] + [c[iu] for c in ctrl])
    ry = _resid(y[iu][None], design)[0]
    rx = _resid(x[iu][None], design)[0]
    ryn = ry / np.linalg.norm(ry)
    r = float(ryn @ rx / np.linalg.norm(rx))
    rx_mat = np.zeros((t, t))
    rx_mat[iu] = rx
    rx_mat = rx_mat + rx_mat.T
    perms = _perms(t, n_perm, seed)
    xp = rx_mat[perms[:, iu[0]], perms[:, iu[1]]]
    xp = xp - xp.mean(1, keepdims=True)
    null = (xp @ ryn) / np.linalg.norm(xp, axis=1)
    p = _tail(null, r, alternative)
    dropped = _dropped(t0, keep, names)
    return PermutationTest("partial_mantel", r, r, p, n_perm, m, "partial_mantel",
                           REFERENCE_PARTIAL_MANTEL, dropped,
                           {"alternative": alternative, "n_controls": len(ctrl)})
