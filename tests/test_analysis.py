"""lmgrad.analysis against plain float64 loops, scipy, and statistical bounds from theory."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from lmgrad import analysis as A
from lmgrad.analysis import estimators as E
from lmgrad.analysis import geometry as G
from lmgrad.analysis import precondition as P
from lmgrad.analysis import task_space as TS
from lmgrad.analysis.space import task_index
from lmgrad.analysis.stats import format_p, min_attainable_p, p_text
from lmgrad.analysis.threads import blas_threads


def _planted(t_per_cat=3, n_cat=3, n=20, k=32, noise=1.0, task_noise=0.3, seed=0):
    """Sketches with category structure: task mean = category vector + task jitter."""
    rng = np.random.default_rng(seed)
    cats = np.repeat([f"c{i}" for i in range(n_cat)], t_per_cat)
    names = np.array([f"t{i:02d}" for i in range(len(cats))])
    cv = {c: rng.normal(size=k) for c in np.unique(cats)}
    mu = np.stack([cv[c] + task_noise * rng.normal(size=k) for c in cats])
    x = np.repeat(mu, n, 0) + noise * rng.normal(size=(len(cats) * n, k))
    return x.astype(np.float32), np.repeat(names, n), names, cats, mu


# ----------------------------------------------------------------------- references (loops)

def _ref_means(x, tasks):
    names = sorted(set(tasks))
    out = []
    for t in names:
        acc = np.zeros(x.shape[1])
        c = 0
        for row, lab in zip(x, tasks):
            if lab == t:
                acc += row.astype(np.float64)
                c += 1
        out.append(acc / c)
    return names, np.array(out)


def _ref_sim(m, kind):
    t = len(m)
    s = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            a, b = m[i].astype(np.float64), m[j].astype(np.float64)
            if kind == "pearson":
                a, b = a - a.mean(), b - b.mean()
            s[i, j] = a @ b / np.sqrt((a @ a) * (b @ b))
    return s


def test_task_means_and_similarity_match_loops():
    x, tasks, *_ = _planted(n=7, k=9)
    names, means = A.task_means(x, tasks)
    rnames, rmeans = _ref_means(x, tasks)
    assert list(names) == rnames
    np.testing.assert_allclose(means, rmeans, rtol=1e-12)
    for kind in ("cosine", "pearson"):
        np.testing.assert_allclose(A.similarity(means, kind), _ref_sim(rmeans, kind), atol=1e-12)
    # Pearson is centred cosine, i.e. np.corrcoef of the vectors.
    np.testing.assert_allclose(A.similarity(means, "pearson"), np.corrcoef(rmeans), atol=1e-12)


def test_coherence_and_pair_cosine_match_loops():
    x, tasks, *_ = _planted(n=6, k=8)
    names, counts, pcos = A.pair_cosine_matrix(x, tasks)
    xs = x.astype(np.float64)
    for a, ta in enumerate(names):
        for b, tb in enumerate(names):
            vals = [xs[i] @ xs[j] / np.linalg.norm(xs[i]) / np.linalg.norm(xs[j])
                    for i in range(len(xs)) for j in range(len(xs))
                    if tasks[i] == ta and tasks[j] == tb and i != j]
            assert pcos[a, b] == pytest.approx(np.mean(vals), abs=1e-12)
    coh = A.coherence(x, tasks)
    assert coh[str(names[0])] == pytest.approx(pcos[0, 0])
    samples = A.pair_cosine_samples(x, tasks)
    n = len(x)
    assert len(samples["within"]) + len(samples["between"]) == n * (n - 1) // 2


def test_offdiag_correlations_match_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 7))
    a = (a + a.T) / 2
    b = a + rng.normal(size=(7, 7))
    b = (b + b.T) / 2
    iu = np.triu_indices(7, 1)
    for method, fn in (("spearman", sps.spearmanr), ("pearson", sps.pearsonr)):
        r = A.offdiag_correlation(a, b, method)
        ref = fn(a[iu], b[iu])
        assert r.statistic == pytest.approx(ref[0], abs=1e-12)
        assert r.p_value == pytest.approx(ref[1], rel=1e-9)
        assert r.n == 21


def test_ari_hand_computed_contingency():
    # Contingency [[2,1],[0,3]]: Σ C(n_ij,2)=1+0+0+3=4; rows (3,3) → 3+3=6; cols (2,4) → 1+6=7;
    # C(6,2)=15; expected=6*7/15=2.8; max=6.5; ARI=(4-2.8)/(6.5-2.8)=1.2/3.7.
    a = [0, 0, 0, 1, 1, 1]
    b = ["x", "x", "y", "y", "y", "y"]
    assert A.adjusted_rand_index(a, b) == pytest.approx(1.2 / 3.7, abs=1e-12)
    assert A.adjusted_rand_index(a, [5, 5, 5, 7, 7, 7]) == pytest.approx(1.0)
    assert A.adjusted_rand_index(a, b) == pytest.approx(A.adjusted_rand_index(b, a))


def test_min_attainable_p():
    assert min_attainable_p(["a", "a", "b", "b", "c", "c"]) == pytest.approx(1 / 15)
    assert min_attainable_p(list("aaabbbccc")) == pytest.approx(216 * 6 / 362880)


def test_parse_param_names():
    P = A.parse_param_name
    assert (P("model.layers.7.mlp.down_proj.weight").layer, P(
        "model.layers.7.mlp.down_proj.weight").module_type) == (7, "mlp.down_proj")
    assert P("transformer.h.7.attn.c_attn.weight").module_type == "attn.c_attn"
    assert P("transformer.h.7.attn.c_attn.weight").layer == 7
    g = P("gpt_neox.layers.11.attention.query_key_value.weight")
    assert (g.layer, g.module_type) == (11, "attention.query_key_value")
    for name, group in [("model.embed_tokens.weight", "embed"), ("transformer.wte.weight", "embed"),
                        ("gpt_neox.embed_in.weight", "embed"), ("lm_head.weight", "head"),
                        ("embed_out.weight", "head"), ("model.norm.weight", "final_norm"),
                        ("transformer.ln_f.weight", "final_norm"),
                        ("gpt_neox.final_layer_norm.weight", "final_norm")]:
        info = P(name)
        assert info.layer is None and info.module_type == group, name


def test_block_similarities_group_columns():
    x, tasks, *_ = _planted(n=5, k=40)
    layout = [{"name": "model.embed_tokens.weight", "offset": 0, "size": 8}]
    off = 8
    for layer in range(2):
        for m in ("self_attn.q_proj", "mlp.down_proj"):
            layout.append({"name": f"model.layers.{layer}.{m}.weight", "offset": off, "size": 8})
            off += 8
    names, means = A.task_means(x, tasks)
    _, by_layer = A.block_similarities(x, tasks, layout, "layer")
    assert list(by_layer) == ["embed", "layers.0", "layers.1"]
    np.testing.assert_allclose(by_layer["layers.1"], _ref_sim(means[:, 24:40], "cosine"),
                               atol=1e-12)
    _, by_type = A.block_similarities(x, tasks, layout, "module_type")
    cols = np.r_[8:16, 24:32]
    np.testing.assert_allclose(by_type["self_attn.q_proj"], _ref_sim(means[:, cols], "cosine"),
                               atol=1e-12)
    _, blocks = A.block_similarities(x, tasks, layout, "block")
    assert len(blocks) == 5
    with pytest.warns(UserWarning, match="no per-layer view"):
        _, g = A.block_similarities(x, tasks, [{"name": "global", "offset": 0, "size": 40}])
    assert list(g) == ["global"]
    with pytest.raises(ValueError, match="expected 8"):
        A.block_similarities(x, tasks, [{"name": "a", "offset": 0, "size": 8},
                                        {"name": "b", "offset": 16, "size": 24}])


# ----------------------------------------------------------------------- statistical tests

def _random_sim(rng, t):
    m = rng.normal(size=(t, 16))
    return A.similarity(m)


def test_mantel_null_is_uniform():
    """Under a shuffled (independent) hypothesis the p-value is ~U(0,1): the rejection rate at
    α=0.05 over 200 problems must lie inside a 3σ binomial band, and KS must not reject."""
    rng = np.random.default_rng(123)
    ps = []
    for i in range(200):
        sim = _random_sim(rng, 8)
        cats = rng.integers(0, 3, 8)
        hyp = (cats[:, None] == cats[None, :]).astype(float)
        if offdiag_std(hyp) == 0:
            cats = np.arange(8) % 3
            hyp = (cats[:, None] == cats[None, :]).astype(float)
        ps.append(A.mantel(sim, hyp, n_perm=199, seed=i).p_value)
    ps = np.array(ps)
    rate = np.mean(ps <= 0.05)
    band = 3 * np.sqrt(0.05 * 0.95 / len(ps))
    assert abs(rate - 0.05) <= band, rate
    assert sps.kstest(ps, "uniform").pvalue > 0.001


def offdiag_std(m):
    return A.offdiag(m).std()


def test_mantel_detects_planted_blocks_and_is_seeded():
    x, tasks, names, cats, _ = _planted(t_per_cat=4, n_cat=3, n=10)
    sim = A.similarity(A.task_means(x, tasks)[1])
    hyp = A.categorical(names, cats, "planted")
    r1 = A.mantel(sim, hyp.matrix, n_perm=500, seed=3)
    r2 = A.mantel(sim, hyp.matrix, n_perm=500, seed=3)
    assert r1.p_value < 0.01 and r1.statistic > 0.5
    assert r1.p_value == r2.p_value
    rs = A.mantel(sim, hyp.matrix, n_perm=500, seed=3, method="spearman")
    assert rs.p_value < 0.01
    wb = A.within_between(sim, cats, n_perm=500)
    assert wb.p_value < 0.01 and wb.extra["within"] > wb.extra["between"]
    ari = A.cluster_agreement(sim, cats, n_perm=200)
    assert ari.statistic == pytest.approx(1.0) and ari.p_value < 0.01


def test_compare_task_spaces():
    x, tasks, names, *_ = _planted(n=10)
    _, sim = A.task_similarity(x, tasks)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(names))
    same = A.compare_task_spaces(sim, sim[np.ix_(perm, perm)], names, names[perm])
    assert same.statistic == pytest.approx(1.0) and "adequate" in same.interpretation
    with pytest.raises(ValueError, match="only in A"):
        A.compare_task_spaces(sim, sim, names, np.r_[names[:-1], ["zzz"]])


# ----------------------------------------------------------------------- hypotheses

def test_hypothesis_matrix_and_taxonomy():
    meta = {"UID": np.array(["t1", "t1", "t2", "t3"]),
            "linguistics_term": np.array(["x", "x", "x", "y"]),
            "field": np.array(["f", "f", "g", "g"])}
    tax = A.taxonomy_from_meta(meta)
    h = A.hypothesis_matrix(["t1", "t2", "t3"], tax, by="linguistics_term")
    np.testing.assert_array_equal(h.matrix, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert h.n_categories == 2
    with pytest.raises(ValueError, match="no category for task"):
        A.hypothesis_matrix(["t1", "t9"], tax)
    meta["field"][1] = "g"
    with pytest.raises(ValueError, match="'t1' has several values"):
        A.taxonomy_from_meta(meta)


def test_load_hypothesis_files(tmp_path):
    tasks = ["a", "b", "c"]
    p = tmp_path / "h.json"
    p.write_text(json.dumps({"a": "x", "b": "x", "c": "y"}))
    h = A.load_hypothesis(str(p), tasks)
    np.testing.assert_array_equal(h.matrix, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    p.write_text(json.dumps({"a": "x", "b": "x", "c": "y", "nope": "z"}))
    with pytest.raises(ValueError, match=r"unknown task name\(s\) \['nope'\]"):
        A.load_hypothesis(str(p), tasks)
    p.write_text(json.dumps({"a": "x"}))
    with pytest.raises(ValueError, match=r"no entry for task\(s\) \['b', 'c'\]"):
        A.load_hypothesis(str(p), tasks)
    c = tmp_path / "h.csv"
    c.write_text(",c,a,b\nc,1,0.2,0.5\na,0.2,1,0.9\nb,0.5,0.9,1\n")
    h = A.load_hypothesis(str(c), tasks)  # reordered to the store's task order
    np.testing.assert_allclose(h.matrix, [[1, .9, .2], [.9, 1, .5], [.2, .5, 1]])
    assert h.categories is None
    c.write_text(",a,b\na,1,0\nb,0,1\n")
    with pytest.raises(ValueError, match=r"no entry for task\(s\) \['c'\]"):
        A.load_hypothesis(str(c), tasks)
    z = tmp_path / "h.npz"
    np.savez(z, tasks=np.array(["a", "b", "c"]), matrix=np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1.]]))
    h = A.load_hypothesis(str(z), tasks)
    assert h.categories is not None and h.n_categories == 2  # a 0/1 grouping is recognised


# ----------------------------------------------------------------------- bad input

def test_bad_inputs():
    x, tasks, names, cats, _ = _planted(n=4)
    one = np.full(len(x), "only")
    hyp1 = A.categorical(["only"], ["c"], "h")
    with pytest.raises(ValueError, match="needs >= 2 tasks"):
        A.analyze(x, one, hyp1)
    # NaN rows: error naming the row and its task, or dropped with a warning.
    xn = x.copy()
    xn[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"row 5 \(task t01\)"):
        A.task_means(xn, tasks)
    with pytest.warns(UserWarning, match="dropped"):
        xs, ts = A.check_sketches(xn, tasks, nonfinite="drop")
    assert len(xs) == len(x) - 1
    with pytest.raises(ValueError, match="expected 36 labels"):
        A.task_means(x, tasks[:12])
    with pytest.raises(ValueError, match="similarity kind"):
        A.similarity(x[:3], "euclid")


def test_zero_vector_task_gives_nan_not_zero():
    m = np.array([[1.0, 0], [0, 0], [1, 1]])
    with pytest.warns(UserWarning, match="zero vector"):
        s = A.similarity(m)
    assert np.isnan(s[1]).all() and s[0, 2] == pytest.approx(np.sqrt(0.5))


def test_analyze_and_save_global_layout(tmp_path):
    x, tasks, names, cats, _ = _planted(n=8, k=16)
    hyp = A.categorical(names, cats, "planted")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spurious warnings on clean input
        res = A.analyze(x, tasks, hyp, n_boot=30, n_perm=99, n_splits=4)
    assert res.global_only and list(res.groups) == ["global"]
    paths = A.save(res, str(tmp_path), {"model": "toy"})
    text = open(paths["report"]).read()
    assert "single global block" in text and "no per-layer" in text
    stats = json.load(open(paths["stats"]))
    assert stats["tests"]["mantel"]["p_value"] < 0.05
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes leave no temp files
    assert open(paths["heatmap"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_import_and_save_leave_matplotlib_backend_alone(tmp_path):
    # Importing lmgrad.analysis must not load matplotlib, and saving figures must keep the backend
    # the caller chose (the figures are rendered through the object API, not pyplot).
    code = f"""
import sys, numpy as np
import lmgrad.analysis as A
assert "matplotlib" not in sys.modules, "import lmgrad.analysis loaded matplotlib"
import matplotlib
matplotlib.use("svg")
rng = np.random.default_rng(0)
tasks = np.repeat(["a", "b", "c"], 4)
x = rng.normal(size=(12, 8)).astype(np.float32)
res = A.analyze(x, tasks, A.categorical(["a", "b", "c"], ["p", "p", "q"], "h"), n_boot=5, n_perm=9, n_splits=2)
A.save(res, {str(tmp_path)!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True)
    assert sorted(os.listdir(tmp_path)) == ["coclustering.png", "heatmap.png", "hypothesis.png",
                                            "layers.png", "report.md", "stats.json",
                                            "task_space.npz"]


# ----------------------------------------------------------------------- the corrected stage

LAYOUT = [{"name": "model.embed_tokens.weight", "offset": 0, "size": 30, "tied": True},
          {"name": "model.layers.0.input_layernorm.weight", "offset": 30, "size": 5},
          {"name": "model.layers.0.self_attn.q_proj.weight", "offset": 35, "size": 12},
          {"name": "model.layers.1.mlp.down_proj.weight", "offset": 47, "size": 9}]


def _layered(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * n, 56)) * np.repeat([3, 0.5, 1, 2], [30, 5, 12, 9])
    x += np.repeat(rng.normal(size=(4, 56)), n, 0)
    return x.astype(np.float32), np.repeat(["a", "b", "c", "d"], n)


@pytest.mark.parametrize("reference", [False, True])
def test_gram_geometries_match_the_row_transforms(reference):
    """Each geometry's Gram equals the inner products of the transformed rows built by
    lmgrad.analysis.precondition (equalize, exclude, the float64 preconditioner reference); the
    reference set has fewer rows (10) than the widest block (30): the Woodbury branch."""
    x, tasks = _layered()
    names, idx = task_index(tasks)
    ref = np.random.default_rng(5).normal(size=(10, 56)) if reference else None
    gp = G.gram_pass(x, names, idx, LAYOUT, reference=ref, unit_groups=True)
    x64 = x.astype(np.float64)
    tol = dict(rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gp.geometries["euclidean"].gram, x64 @ x64.T, **tol)
    eq = P.equalize_blocks(x, LAYOUT)
    np.testing.assert_allclose(gp.geometries["equal_blocks"].gram, eq @ eq.T, **tol)
    for name, types in (("no_norms", ["norm"]), ("no_embed_head", ["embed", "head"])):
        kept, _, dropped = P.exclude_blocks(x64, LAYOUT, exclude=types)
        np.testing.assert_allclose(gp.geometries[name].gram, kept @ kept.T, **tol)
        assert gp.geometries[name].dropped == dropped
    assert gp.geometries["no_embed_head"].label == "without embed+head (tied)"
    want = P.reference_inner(x, x, x if ref is None else ref, LAYOUT, damping=0.1)
    np.testing.assert_allclose(gp.geometries["preconditioned"].gram, want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    assert list(gp.groups) == ["embed+head (tied)", "layers.0", "layers.1"]
    for kind in E.KINDS:
        got = E.similarity_from_moments(gp.groups["layers.0"], kind).sim
        np.testing.assert_allclose(got, E.task_similarity(x[:, 30:47], tasks, kind).sim,
                                   atol=1e-10)


def test_gram_root_stands_in_for_the_rows():
    """K > N: analyze runs the estimators on a root of the Gram matrix; the task space, its
    jackknife interval and split halves equal those computed on the rows themselves."""
    x, tasks, names, cats, _ = _planted(n=5, k=200, noise=2.0)
    m = G.moments_from_gram(x.astype(np.float64) @ x.T.astype(np.float64), *task_index(tasks),
                            unit=True)
    for kind in E.KINDS:
        np.testing.assert_allclose(E.similarity_from_moments(m, kind).sim,
                                   E.task_similarity(x, tasks, kind).sim, atol=1e-10)
    res = A.analyze(x, tasks, A.categorical(names, cats, "planted"), n_boot=10, n_perm=49,
                    n_splits=3, robustness=False)
    ref = E.jackknife(x, tasks)
    np.testing.assert_allclose(res.similarity, ref.estimate, atol=1e-9)
    np.testing.assert_allclose(res.interval.low, ref.low, atol=1e-9, equal_nan=True)
    assert res.reliability.r_half == pytest.approx(E.split_half(x, tasks, n_splits=3).r_half,
                                                   abs=1e-9)
    np.testing.assert_allclose(res.alternatives["raw"], A.task_similarity(x, tasks)[1], atol=1e-10)
    np.testing.assert_allclose(res.pair_cosine, A.pair_cosine_matrix(x, tasks)[2], atol=1e-10)


def test_p_values_at_the_floor_are_bounds():
    assert format_p(1 / 1001, 1000) == "≤ 0.001" and p_text(1 / 1001, 1000) == "p ≤ 0.001"
    assert format_p(2 / 1001, 1000) == "0.002" and p_text(0.2, 1000) == "p = 0.2"
    assert format_p(1 / 1001) == "1.0e-03" and format_p(None) == "n/a"
    sim = A.similarity(np.random.default_rng(0).normal(size=(12, 30)))
    cats = np.repeat(["x", "y", "z"], 4)
    hyp = A.categorical([f"t{i}" for i in range(12)], cats, "h").matrix
    m = A.mantel(sim + 5 * hyp, hyp, n_perm=99)
    assert m.p_value == pytest.approx(0.01) and "p ≤ 0.01" in m.interpretation


def test_undefined_task_is_named_and_left_out_of_the_tests(tmp_path):
    x, tasks, names, cats, _ = _planted(t_per_cat=3, n_cat=3, n=8, k=32)
    v = np.random.default_rng(1).normal(size=32)
    bad = tasks == names[4]
    x[np.flatnonzero(bad)] = np.array([v, -v] * 4)  # ⟨xₐ, x_b⟩ sums to −‖v‖² · 4: ‖μ‖² < 0
    res = A.analyze(x, tasks, A.categorical(names, cats, "planted"), n_boot=10, n_perm=99,
                    n_splits=3)
    assert res.undefined == [str(names[4])] and "below the noise" in \
        res.undefined_notes[str(names[4])]
    assert np.isnan(res.similarity[4]).all() and np.isfinite(res.alternatives["raw"][4]).all()
    assert res.stats["mantel"].n == 28  # 8 defined tasks
    assert all(str(names[4]) in row.undefined for row in res.robustness if row.available)
    text = open(A.save(res, str(tmp_path))["report"]).read()
    warn = text[text.index("## Warnings"):text.index("## Robustness")]
    assert str(names[4]) in warn and "left out of every test" in warn
    assert f"| {names[4]} | 8 |" in text and "undefined: ‖μ‖² estimate" in text


def test_surface_from_meta():
    labels = np.array(["a", "a", "b", "b", "c", "c"])
    meta = {"sentence_good": np.array(["the cat sleeps", "a cat eats", "who did you see",
                                       "what did you buy", "dogs bark", "the dogs bark"]),
            "sentence_bad": np.array(["the cat sleep", "a cat eat", "who you did see",
                                      "what you did buy", "dogs barks", "the dogs barks"]),
            "n_tokens_good": np.array([4, 4, 5, 5, 3, 4]), "n_tokens_bad": np.array([4, 4, 5, 5, 3, 4])}
    sp, note = TS.surface_from_meta(meta, labels)
    assert set(sp.spaces) == {"diff_words", "bow", "length", "length_tokens"}
    assert "diff_words undefined for b" in note  # reorderings change no word
    np.testing.assert_allclose(sp.spaces["length_tokens"][0], [0, -1, -0.5])
    assert TS.surface_from_meta({"UID": labels}, labels) == (None, TS.NO_SENTENCES)


def test_blas_threads_restores_the_setting():
    with blas_threads(1):
        a = np.linalg.cholesky(np.eye(50) * 2.0)
    assert a[0, 0] == pytest.approx(np.sqrt(2.0))
    with blas_threads(None):
        pass
