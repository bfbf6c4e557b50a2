"""Tests for lmgrad.sketch: fast paths against float64 numpy references, invariances, and JL
statistics with tolerances derived from theory (each test names its bound)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import optimize, stats

from lmgrad.sketch import KINDS, GENERATOR_VERSION, Projector, gaussian_matrix, make_projector, unflatten
from lmgrad.sketch import hashing

DELTA = 1e-3  # failure probability each statistical test is allowed (before the fixed seed makes it deterministic)
RANDOM_KINDS = [("gaussian", {}), ("rademacher", {}), ("sjlt", {}), ("sjlt", {"s": 4})]
SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (24, 16),
    "model.layers.0.mlp.down_proj.bias": (37,),
    "transformer.h.3.attn.c_attn.weight": (5, 3, 11),
}


def _grads(shapes, batch, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {n: jnp.asarray(rng.standard_normal((batch, *s)), dtype) for n, s in shapes.items()}


def _reference(proj: Projector, grads) -> np.ndarray:
    """float64 numpy: sum over leaves of g_flat @ dense_matrix(name, n).T."""
    out = 0.0
    for name, g in grads.items():
        g64 = np.asarray(g.astype(jnp.float32), np.float64).reshape(g.shape[0], -1)
        out = out + g64 @ proj.dense_matrix(name, g64.shape[1]).T
    return out


# ------------------------------------------------------------------------------ exactness vs reference
@pytest.mark.parametrize("kind,opts", RANDOM_KINDS)
@pytest.mark.parametrize("block_size", [None, 7, 64])
def test_project_matches_dense_reference(kind, opts, block_size):
    proj = make_projector(kind, 32, seed=3, block_size=block_size, **opts)
    grads = _grads(SHAPES, batch=5)  # n = 384, 37, 165: none divisible by 7 or 64
    out = proj.project(grads, shapes=SHAPES)
    assert out.shape == (5, 32) and out.dtype == jnp.float32
    ref = _reference(proj, grads)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_project_leaf_matches_dense_matrix_bf16():
    """bfloat16 gradients are accumulated in float32: equal to the float64 product of the rounded values."""
    for kind, opts in RANDOM_KINDS:
        proj = make_projector(kind, 16, seed=1, **opts)
        g = jnp.asarray(np.random.default_rng(1).standard_normal((3, 1000)), jnp.bfloat16)
        ref = np.asarray(g.astype(jnp.float32), np.float64) @ proj.dense_matrix("w", 1000).T
        out = proj.project_leaf("w", g)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("c0", [0, 12345, 2**31 - 40])
def test_jnp_generators_match_numpy_twins(c0):
    """The hashed blocks equal their numpy re-implementation, also near the top of the uint32 counter."""
    keys = hashing.param_keys(7, "some.param", "x")
    karr = jnp.asarray(hashing.keys_array(keys))
    c = jnp.uint32(c0)
    rad = jax.jit(hashing.rademacher_block, static_argnums=(2, 3))
    gau = jax.jit(hashing.gaussian_block, static_argnums=(2, 3))
    np.testing.assert_array_equal(np.asarray(rad(karr, c, 9, 33)), hashing.np_rademacher_block(keys, c0, 9, 33))
    np.testing.assert_allclose(np.asarray(gau(karr, c, 9, 33)), hashing.np_gaussian_block(keys, c0, 9, 33), rtol=2e-6, atol=2e-6)


def test_names_and_seeds_share_compiled_code():
    """Keys are traced arguments, not constants: a model with hundreds of same-shaped parameters
    compiles each leaf contraction once per shape, not once per name or seed."""
    from lmgrad.sketch import projectors

    g = jnp.ones((2, 53), jnp.float32)
    make_projector("rademacher", 8, seed=0).project_leaf("warmup", g)
    before = projectors._dense_leaf._cache_size()
    for seed in range(3):
        for name in ("a.weight", "b.weight", "c.weight"):
            make_projector("rademacher", 8, seed=seed).project_leaf(name, g)
    assert projectors._dense_leaf._cache_size() == before


def test_gaussian_matrix_is_the_gaussian_projector_block():
    proj = make_projector("gaussian", 24, seed=5)
    m = np.asarray(gaussian_matrix(5, "layer.w", 24, 50), np.float64)
    np.testing.assert_allclose(m / math.sqrt(24), proj.dense_matrix("layer.w", 50), rtol=1e-5, atol=1e-6)
    # Rows do not depend on how many are asked for (Box–Muller pairs are interleaved).
    np.testing.assert_array_equal(np.asarray(gaussian_matrix(5, "layer.w", 7, 50)), np.asarray(gaussian_matrix(5, "layer.w", 24, 50))[:7])
    assert gaussian_matrix(5, "layer.w", 4, 4, dtype=jnp.bfloat16).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("kind,opts", RANDOM_KINDS + [("identity", {})])
def test_invariant_to_batch_order_and_block_size(kind, opts):
    grads = _grads(SHAPES, batch=7, seed=2)
    proj = make_projector(kind, 48, seed=11, **opts)
    full = np.asarray(proj.project(grads))
    # Each row alone (batch of 1) gives the same row as the batch of 7.
    for i in (0, 3, 6):
        row = np.asarray(proj.project({n: g[i : i + 1] for n, g in grads.items()}))
        np.testing.assert_allclose(row[0], full[i], rtol=1e-6, atol=1e-6 * np.abs(full).max())
    # Dict order does not matter (leaves are summed in sorted order: bitwise equal).
    rev = dict(reversed(list(grads.items())))
    np.testing.assert_array_equal(np.asarray(proj.project(rev)), full)
    # Block size changes only the summation order.
    other = make_projector(kind, 48, seed=11, block_size=5, **opts)
    np.testing.assert_allclose(np.asarray(other.project(grads)), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    # Permuting examples permutes sketch rows.
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    np.testing.assert_allclose(np.asarray(proj.project({n: g[perm] for n, g in grads.items()})), full[perm], rtol=1e-6, atol=1e-6 * np.abs(full).max())


@pytest.mark.parametrize("kind,opts", RANDOM_KINDS)
def test_seeds_and_names_give_different_independent_blocks(kind, opts):
    k, n = 64, 500
    a = make_projector(kind, k, seed=0, **opts)
    b = make_projector(kind, k, seed=1, **opts)
    grads = _grads({"w": (n,)}, batch=2)
    assert not np.allclose(np.asarray(a.project(grads)), np.asarray(b.project(grads)))
    # Blocks of two parameters (or two seeds) are uncorrelated: |corr| ≤ z_{δ/2}/√N for N entry pairs.
    z = stats.norm.isf(DELTA / 2)
    for m1, m2 in [(a.dense_matrix("p.one", n), a.dense_matrix("p.two", n)), (a.dense_matrix("w", n), b.dense_matrix("w", n))]:
        assert not np.array_equal(m1, m2)
        corr = np.corrcoef(m1.ravel(), m2.ravel())[0, 1]
        assert abs(corr) <= z / math.sqrt(m1.size), corr
    # Same seed and name: the same projection, however constructed.
    np.testing.assert_array_equal(a.dense_matrix("w", n), make_projector(kind, k, seed=0, **opts).dense_matrix("w", n))


def test_linearity():
    proj = make_projector("rademacher", 32, seed=4)
    g1, g2 = _grads(SHAPES, 3, seed=5), _grads(SHAPES, 3, seed=6)
    diff = {n: g1[n] - 2.5 * g2[n] for n in g1}
    lhs = np.asarray(proj.project(diff))
    rhs = np.asarray(proj.project(g1)) - 2.5 * np.asarray(proj.project(g2))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5 * np.abs(rhs).max())


# ------------------------------------------------------------------------------------- statistics
def _jl_epsilon(k: int, delta: float) -> float:
    """ε with 2·exp(−k(ε²/4 − ε³/6)) = δ: the two-sided norm-preservation bound for Gaussian and
    Rademacher projections (Achlioptas 2003, Thm 1.1 proof; Dasgupta & Gupta 2003, Lemma 2.2).
    For small ε this is ε ≈ 2·√(ln(2/δ)/k), i.e. C = 2 in ε = C·√(log(1/δ)/k)."""
    target = math.log(2 / delta) / k
    assert target < 1 / 12, "bound is vacuous for this k, δ (ε²/4 − ε³/6 peaks at 1/12, ε = 1)"
    return optimize.brentq(lambda e: e * e / 4 - e**3 / 6 - target, 1e-9, 1.0)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k,shapes", [(256, {"a": (40, 30), "b": (77,)}), (1024, {"w": (3000,)})])
def test_single_draw_jl_concentration(kind, dtype, k, shapes):
    """One fixed seed: |‖Px‖² − ‖x‖²| ≤ ε‖x‖² and |⟨Px,Py⟩ − ⟨x,y⟩| ≤ ε‖x‖‖y‖ for all test vectors.

    Inner products follow by polarisation from the norms of x/‖x‖ ± y/‖y‖ (error ≤ ε(‖u+v‖²+‖u−v‖²)/4 = ε),
    so with m vectors there are m + m(m−1) norm events; δ is split over them by a union bound.
    """
    m = 6
    events = m + m * (m - 1)
    eps = _jl_epsilon(k, DELTA / events)
    grads = _grads(shapes, batch=m, seed=9, dtype=dtype)
    proj = make_projector(kind, k, seed=123)
    sk = np.asarray(proj.project(grads), np.float64)
    x = np.concatenate([np.asarray(g.astype(jnp.float32), np.float64).reshape(m, -1) for _, g in sorted(grads.items())], 1)
    gram, sgram = x @ x.T, sk @ sk.T
    norms = np.sqrt(np.diag(gram))
    rel = np.abs(sgram - gram) / np.outer(norms, norms)
    assert rel.max() <= eps, (rel.max(), eps)


@pytest.mark.parametrize("kind,opts", RANDOM_KINDS)
def test_unbiased_over_seeds_with_theoretical_variance(kind, opts):
    """Over T seeds, E‖Px‖² = 1 and E⟨Px,Py⟩ = ⟨x,y⟩ (mean within z_{δ/2} standard errors), and the sample
    variances match the exact variances (chi-square interval, the statistics being near-normal at k=64:
    excess kurtosis O(1/k)):
      gaussian:          Var‖Px‖² = 2/k,             Var⟨Px,Py⟩ = (1 + ⟨x,y⟩²)/k
      rademacher, sjlt:  Var‖Px‖² = 2(1 − Σx⁴)/k,    Var⟨Px,Py⟩ = (1 + ⟨x,y⟩² − 2Σx²y²)/k
    (sjlt with s nonzeros in s bands of k/s rows: the s bands are independent CountSketches of k/s rows,
    scaled by 1/s, giving the same formula.)"""
    k, n, T = 64, 300, 400
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n)
    x /= np.linalg.norm(x)
    v = rng.standard_normal(n)
    v -= (v @ x) * x
    y = 0.6 * x + 0.8 * v / np.linalg.norm(v)  # unit, ⟨x, y⟩ = 0.6
    xy = float(x @ y)
    grads = {"p.a": jnp.asarray(np.stack([x, y])[:, :120], jnp.float32), "p.b": jnp.asarray(np.stack([x, y])[:, 120:], jnp.float32)}
    sq, ip = np.empty(T), np.empty(T)
    for t in range(T):
        s = np.asarray(make_projector(kind, k, seed=1000 + t, **opts).project(grads), np.float64)
        sq[t], ip[t] = s[0] @ s[0], s[0] @ s[1]
    xf, yf = np.asarray(grads["p.a"], np.float64), np.asarray(grads["p.b"], np.float64)
    xs, ys = np.concatenate([xf[0], yf[0]]), np.concatenate([xf[1], yf[1]])
    corr = 0.0 if kind == "gaussian" else 1.0
    var_sq = 2 * (1 - corr * np.sum(xs**4)) / k
    var_ip = (1 + xy**2 - 2 * corr * np.sum(xs**2 * ys**2)) / k
    z = stats.norm.isf(DELTA / 4)  # 4 checks below share δ
    assert abs(sq.mean() - 1) <= z * math.sqrt(var_sq / T), (sq.mean(), var_sq)
    assert abs(ip.mean() - xy) <= z * math.sqrt(var_ip / T), (ip.mean(), xy)
    lo, hi = stats.chi2.ppf([DELTA / 8, 1 - DELTA / 8], T - 1) / (T - 1)
    for sample, var in [(sq, var_sq), (ip, var_ip)]:
        ratio = sample.var(ddof=1) / var
        assert lo <= ratio <= hi, (ratio, lo, hi)


def test_generated_entries_have_the_right_distribution():
    """Gaussian entries pass a Kolmogorov–Smirnov test against N(0,1) at level δ; Rademacher signs are
    balanced within the binomial bound; sjlt rows are uniform over each band (chi-square at level δ)."""
    m = np.asarray(gaussian_matrix(0, "kstest", 64, 2000), np.float64).ravel()
    assert stats.kstest(m, "norm").pvalue > DELTA
    r = make_projector("rademacher", 64, seed=0).dense_matrix("w", 2000).ravel() * 8
    assert set(np.unique(r)) == {-1.0, 1.0}
    assert abs((r > 0).mean() - 0.5) <= stats.norm.isf(DELTA / 2) * 0.5 / math.sqrt(r.size)
    k, s, n = 32, 4, 4000
    d = make_projector("sjlt", k, seed=0, s=s).dense_matrix("w", n)
    assert np.all((d != 0).sum(0) == s) and np.allclose(np.abs(d[d != 0]), 1 / math.sqrt(s))
    for band in range(s):
        counts = (d[band * (k // s) : (band + 1) * (k // s)] != 0).sum(1)
        assert np.all(counts.sum() == n)
        assert stats.chisquare(counts).pvalue > DELTA / s


# ------------------------------------------------------------------------------------- identity
def test_identity_roundtrip_and_layout():
    proj = make_projector("identity", None)
    grads = _grads(SHAPES, batch=4, seed=1)
    out = proj.project(grads, shapes=SHAPES)
    assert out.shape == (4, proj.output_dim(SHAPES)) == (4, 384 + 37 + 165)
    layout = proj.layout(SHAPES)
    assert [e["name"] for e in layout] == sorted(SHAPES)
    assert [e["offset"] for e in layout] == [0, 37, 37 + 384]
    back = unflatten(np.asarray(out), layout)
    assert set(back) == set(grads)
    for n, g in grads.items():
        np.testing.assert_array_equal(back[n], np.asarray(g))
    ref = [np.asarray(grads[n], np.float64).reshape(4, -1) @ proj.dense_matrix(n, math.prod(SHAPES[n])).T for n in sorted(grads)]
    np.testing.assert_array_equal(np.asarray(out), np.concatenate(ref, 1).astype(np.float32))


def test_spec_roundtrip_is_json_and_rebuilds_the_same_projection():
    grads = _grads(SHAPES, batch=5)  # shapes, k and block size as in test_project_matches_dense_reference: no recompiles
    for kind, opts in RANDOM_KINDS + [("identity", {})]:
        proj = make_projector(kind, None if kind == "identity" else 32, seed=42, **opts)
        spec = json.loads(json.dumps(proj.spec))
        assert spec["kind"] == kind and spec["seed"] == 42 and spec["generator"] == GENERATOR_VERSION
        again = Projector.from_spec(spec, block_size=64)
        assert again.block_size == 64
        assert type(again) is type(proj) and again.spec == proj.spec
        np.testing.assert_allclose(np.asarray(again.project(grads)), np.asarray(proj.project(grads)), rtol=1e-5, atol=1e-5)
        assert proj.layout(SHAPES)[-1]["offset"] + proj.layout(SHAPES)[-1]["size"] == proj.output_dim(SHAPES)
    with pytest.raises(ValueError, match="generator"):
        Projector.from_spec({**make_projector("sjlt", 8, 0).spec, "generator": "old/v0"})


# ------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"unknown projector kind 'gausian'.*gaussian.*rademacher.*sjlt"):
        make_projector("gausian", 16, 0)
    for k in (0, -3):
        with pytest.raises(ValueError, match=f"k must be a positive integer, got {k}"):
            make_projector("rademacher", k, 0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        make_projector("gaussian", None, 0)
    from lmgrad.sketch import GaussianProjector
    with pytest.raises(ValueError, match="'gaussian': k must be a positive integer, got None"):
        GaussianProjector(k=None)
    with pytest.raises(ValueError, match="s=3 must divide k=16"):
        make_projector("sjlt", 16, 0, s=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['s'\]"):
        make_projector("gaussian", 16, 0, s=2)
    proj = make_projector("sjlt", 16, 0)
    grads = _grads(SHAPES, batch=2)
    bad_shapes = {**SHAPES, "model.layers.0.mlp.down_proj.bias": (38,)}
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.bias' has shape \(2, 37\).*declared shape is \(38,\)"):
        proj.project(grads, shapes=bad_shapes)
    with pytest.raises(ValueError, match=r"missing=\['extra.w'\]"):
        proj.project(grads, shapes={**SHAPES, "extra.w": (3,)})
    with pytest.raises(ValueError, match="batch size 3"):
        proj.project({**grads, "zz": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"project_leaf\('w'\).*\[B, n\]"):
        proj.project_leaf("w", jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="floating"):
        proj.project({"w": jnp.zeros((2, 3), jnp.int32)})
    with pytest.raises(ValueError, match="non-empty"):
        proj.project({})


# ------------------------------------------------------------------------------------- jit / shard_map
@pytest.mark.parametrize("kind,opts", RANDOM_KINDS + [("identity", {})])
def test_jit_and_shard_map_match_single_device(kind, opts):
    # block_size=16 forces the fori_loop over column blocks (its carry must type-check under shard_map).
    proj = make_projector(kind, 16, seed=8, block_size=16, **opts)
    grads = _grads(SHAPES, batch=8, seed=3)
    eager = np.asarray(proj.project(grads))
    jitted = np.asarray(jax.jit(proj.project)(grads))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6 * np.abs(eager).max())
    assert len(jax.devices()) >= 4, "tests/conftest.py should provide 4 fake CPU devices"
    mesh = jax.make_mesh((4,), ("data",))
    sharded = jax.jit(jax.shard_map(proj.project, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    grads_sharded = jax.device_put(grads, jax.sharding.NamedSharding(mesh, P("data")))
    out = sharded(grads_sharded)
    assert out.sharding.spec[0] == "data"
    out = np.asarray(out)
    np.testing.assert_allclose(out, eager, rtol=1e-6, atol=1e-6 * np.abs(eager).max())
    if kind not in ("rademacher", "sjlt"):  # one kind per loop implementation keeps compile time down
        return
    # As the grads stage calls it: chunks of the local batch under lax.map inside shard_map.
    chunked = jax.jit(jax.shard_map(
        lambda gr: jax.lax.map(proj.project, jax.tree.map(lambda x: x.reshape(2, 1, *x.shape[1:]), gr)).reshape(2, -1),
        mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    np.testing.assert_allclose(np.asarray(chunked(grads_sharded)), eager, rtol=1e-6, atol=1e-6 * np.abs(eager).max())


def test_kinds_constant_lists_all():
    assert set(KINDS) == {"identity", "gaussian", "rademacher", "sjlt"}
