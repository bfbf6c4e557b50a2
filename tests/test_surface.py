"""lmgrad.analysis.surface: surface task spaces by hand, permutation tests against OLS, and a
planted effect that reaches the gradient space only through the surface."""
import numpy as np
import pytest
from scipy import stats as sps

from lmgrad.analysis import estimators as E
from lmgrad.analysis import surface as S
from lmgrad.analysis.stats import mantel


def test_differing_words_and_spaces_by_hand():
    assert S.differing(S.words("The cat sleeps."), S.words("The cat sleep.")) == \
        {"sleeps": 1, "sleep": 1}
    assert not S.differing(S.words("who did you see"), S.words("who you did see"))
    pairs = {"b": [("the dogs bark", "the dogs barks")],
             "a": [("the cat sleeps", "the cat sleep"), ("a cat eats now", "a cat eat now")],
             "c": [("dogs bark", "dogs barks")]}
    sp = S.surface_spaces(pairs, tokens={"a": [([1, 2, 3], [1, 2, 4]), ([5, 2], [5, 6])],
                                         "b": [([7, 8], [7, 9])], "c": [([7, 8], [7, 9])]},
                          idf=False)
    assert list(sp.names) == ["a", "b", "c"]
    d = sp.spaces["diff_words"]
    assert d[1, 2] == pytest.approx(1.0) and d[0, 1] == pytest.approx(0.0)
    assert sp.spaces["diff_tokens"][1, 2] == pytest.approx(1.0)
    # lengths in words: a = (3 + 4) / 2 = 3.5, b = 3, c = 2
    np.testing.assert_allclose(sp.spaces["length"][0], [0, -0.5, -1.5])
    # bag of words over (the, dogs, bark, barks), both sentences of each pair counted
    bb, bc = np.array([2, 2, 1, 1]), np.array([0, 2, 1, 1])
    want = bb @ bc / np.linalg.norm(bb) / np.linalg.norm(bc)
    assert sp.spaces["bow"][1, 2] == pytest.approx(want)
    jac = S.surface_spaces(pairs, overlap="jaccard").spaces["diff_words"]
    assert jac[1, 2] == 1.0 and jac[0, 1] == 0.0


def _design(seed, t=10):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(t, 3))
    mats = [feats[:, [i]] * feats[:, [i]].T + 0.1 * rng.normal(size=(t, t)) for i in range(3)]
    return [(m + m.T) / 2 for m in mats]


def test_mrqap_statistic_is_ols_t_and_p_floor():
    y, x, c = _design(0)
    y = 0.2 * y + x
    res = S.mrqap(y, [x, c], n_perm=99, seed=0)
    iu = np.triu_indices(10, 1)
    a = np.column_stack([np.ones(len(iu[0])), x[iu], c[iu]])
    beta, rss = np.linalg.lstsq(a, y[iu], rcond=None)[:2]
    cov = rss[0] / (len(iu[0]) - 3) * np.linalg.inv(a.T @ a)
    assert res.coef == pytest.approx(beta[1])
    assert res.statistic == pytest.approx(beta[1] / np.sqrt(cov[1, 1]))
    assert res.p_value == pytest.approx(1 / 100) and res.p_text() == "p ≤ 0.01"
    assert "Dekker" in res.reference and res.n == 45
    dsp = S.mrqap(y, [x, c], n_perm=99, seed=0, method="dsp")
    assert dsp.statistic == pytest.approx(res.statistic) and dsp.p_value <= 0.02
    pm = S.partial_mantel(y, x, [c], n_perm=99, seed=0)
    assert pm.p_value == pytest.approx(1 / 100) and "Smouse" in pm.reference


def test_undefined_task_rows_are_dropped_by_name():
    y, x, c = _design(1)
    y[3, :] = y[:, 3] = np.nan
    names = [f"t{i}" for i in range(10)]
    res = S.mrqap(y, [x, c], n_perm=19, seed=0, names=names)
    assert res.dropped == ["t3"] and res.n == 36
    with pytest.raises(ValueError, match="predictor 1"):
        c2 = c.copy()
        c2[0, 1] = np.nan
        S.mrqap(np.nan_to_num(y), [x, c2], n_perm=19)


def _surface_world(seed, n_cat=4, per=4, n_pairs=12, p_cat=0.5):
    """Synthetic tasks: each pair changes one word, drawn from the task's category pool with
    probability p_cat, else from the task's own pool; returns (pairs, categories)."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for c in range(n_cat):
        for j in range(per):
            name = f"c{c}t{j}"
            out = []
            for _ in range(n_pairs):
                pool = f"cat{c}w" if rng.random() < p_cat else f"{name}w"
                w = pool + str(rng.integers(0, 5))
                subj = "the dog" if rng.random() < 0.5 else "a cat"
                out.append((f"{subj} {w} here .", f"{subj} {w}s here ."))
            pairs[name] = out
    return pairs


def test_surface_only_effect_is_controlled():
    """The gradient space's population cosines ARE the surface matrix (diff-word overlap), which
    tracks the categories; the categories have no effect of their own. Over 100 repeats the plain
    Mantel test rejects almost always, while MRQAP (Freedman–Lane) controlling for the surface
    rejects at the nominal 5%: its count must stay below the binomial(100, 0.05) 99.9% quantile.
    (500 repeats in development: Freedman–Lane 5.4%, DSP 4.4%, partial Mantel 4.6%.)"""
    reps, alpha = 100, 0.05
    rej_plain = rej_ctrl = 0
    for r in range(reps):
        sp = S.surface_spaces(_surface_world(r))
        surf = sp.spaces["diff_words"]
        cats = np.array([n[:2] for n in sp.names])
        hyp = (cats[:, None] == cats[None, :]).astype(float)
        sim = E.simulate_task_space(len(cats), 12, 500, true_cos=surf, coherence=0.2,
                                    seed=1000 + r)
        y = E.task_similarity(sim.x_nk, sim.tasks).sim
        rej_plain += mantel(y, hyp, n_perm=199, seed=r).p_value < alpha
        rej_ctrl += S.mrqap(y, [hyp, surf], n_perm=199, seed=r).p_value < alpha
    assert rej_ctrl <= sps.binom.ppf(0.999, reps, alpha), rej_ctrl
    assert rej_plain >= 0.9 * reps, rej_plain


def test_real_effect_survives_control():
    """Planted: cosine = 0.5·surface + 0.5·same-category. The controlled test should find it."""
    hits = 0
    for r in range(20):
        sp = S.surface_spaces(_surface_world(r))
        surf = sp.spaces["diff_words"]
        cats = np.array([n[:2] for n in sp.names])
        hyp = (cats[:, None] == cats[None, :]).astype(float)
        truth = 0.5 * surf + 0.5 * hyp  # a PSD mix with unit diagonal
        sim = E.simulate_task_space(len(cats), 12, 500, true_cos=truth, coherence=0.2,
                                    seed=2000 + r)
        y = E.task_similarity(sim.x_nk, sim.tasks).sim
        hits += S.mrqap(y, [hyp, surf], n_perm=199, seed=r).p_value < 0.05
    assert hits >= 16, hits


def test_surface_fits_report_each_space():
    sp = S.surface_spaces(_surface_world(0))
    cats = np.array([n[:2] for n in sp.names])
    hyp = (cats[:, None] == cats[None, :]).astype(float)
    fits = S.surface_fits(sp, hyp, n_perm=99)
    assert set(fits) == {"diff_words", "bow", "length"}
    assert fits["diff_words"].p_value <= 0.02
