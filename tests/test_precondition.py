"""lmgrad.analysis.precondition against a float64 solve on full per-example gradients.

The "tiny model" is a one-hidden-layer tanh network with a softmax head, written in numpy with
its analytic per-example gradients (checked here against finite differences); a pair's
differential is ∇ℓ(good) − ∇ℓ(bad) for two inputs sharing a target. With the identity projector
the sketch IS the gradient, so the sketch-space preconditioned inner products must equal the
float64 reference computed from the full gradient matrix with the same damping.
"""
import numpy as np
import pytest

from lmgrad.analysis import estimators as E
from lmgrad.analysis import precondition as P

D_IN, HIDDEN, CLASSES = 6, 8, 5
LAYOUT = [  # HF-style names, so group exclusion sees embed / layer / norm / head blocks
    {"name": "model.layers.0.mlp.up_proj.weight", "offset": 0, "size": HIDDEN * D_IN},
    {"name": "model.layers.0.mlp.up_proj.bias", "offset": HIDDEN * D_IN, "size": HIDDEN},
    {"name": "lm_head.weight", "offset": HIDDEN * (D_IN + 1), "size": CLASSES * HIDDEN},
]
N_PARAMS = HIDDEN * (D_IN + 1) + CLASSES * HIDDEN


def tiny_params(seed=0, d_in=D_IN, hidden=HIDDEN, classes=CLASSES):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(hidden, d_in)) / np.sqrt(d_in), 0.1 * rng.normal(size=hidden), \
        rng.normal(size=(classes, hidden)) / np.sqrt(hidden)


def tiny_grads(params, x_nd, y_n):
    """Per-example gradients [N, P] of cross-entropy, flattened as (W1, b1, W2)."""
    w1, b1, w2 = params
    h = np.tanh(x_nd @ w1.T + b1)
    z = h @ w2.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p - np.eye(w2.shape[0])[y_n]
    da = (dz @ w2) * (1 - h ** 2)
    return np.concatenate([np.einsum("nh,nd->nhd", da, x_nd).reshape(len(y_n), -1), da,
                           np.einsum("nc,nh->nch", dz, h).reshape(len(y_n), -1)], axis=1)


def tiny_differentials(params, n_tasks, n_pairs, seed=0, d_in=D_IN, n_groups=2):
    """Pair differentials [N, P] and task labels. A task is a region of input space (its own
    centre), one target class and one edit direction (bad = good + edit + jitter), so its pairs'
    differentials are coherent without being identical; tasks t and t + n_groups share most of
    their edit and their target, so the task space has group structure."""
    rng = np.random.default_rng(seed)
    classes = params[2].shape[0]
    shared = rng.normal(size=(n_groups, d_in))
    target = rng.integers(0, classes, n_groups)
    rows, tasks = [], []
    for t in range(n_tasks):
        centre = 0.5 * rng.normal(size=d_in)
        edit = shared[t % n_groups] + 0.5 * rng.normal(size=d_in)
        good = centre + 0.5 * rng.normal(size=(n_pairs, d_in))
        bad = good + edit + 0.3 * rng.normal(size=(n_pairs, d_in))
        y = np.full(n_pairs, target[t % n_groups])
        rows.append(tiny_grads(params, good, y) - tiny_grads(params, bad, y))
        tasks += [f"t{t:02d}"] * n_pairs
    return np.vstack(rows), np.array(tasks)


def test_tiny_grads_match_finite_differences():
    params = tiny_params()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1, D_IN)), np.array([2])

    def loss(flat):
        w1 = flat[:HIDDEN * D_IN].reshape(HIDDEN, D_IN)
        b1 = flat[HIDDEN * D_IN:HIDDEN * (D_IN + 1)]
        w2 = flat[HIDDEN * (D_IN + 1):].reshape(CLASSES, HIDDEN)
        z = np.tanh(x @ w1.T + b1) @ w2.T
        return float(np.log(np.exp(z).sum()) - z[0, y[0]])

    flat = np.concatenate([p.ravel() for p in params])
    eps = 1e-6
    fd = np.array([(loss(flat + eps * e) - loss(flat - eps * e)) / (2 * eps)
                   for e in np.eye(len(flat))])
    np.testing.assert_allclose(tiny_grads(params, x, y)[0], fd, atol=1e-8)


@pytest.mark.parametrize("m_ref", [20, 400])  # 20 < 48: the low-rank branch; 400: dense eigh
def test_identity_projector_matches_full_gradient_reference(m_ref):
    params = tiny_params()
    g, tasks = tiny_differentials(params, 4, 10, seed=0)
    ref, _ = tiny_differentials(params, 8, m_ref // 8, seed=1)  # a separate reference set
    pre = P.fit_preconditioner(ref.astype(np.float32), LAYOUT, damping=0.1, reference="tiny-ref")
    forms = {b["form"] for b in pre.describe()["blocks"]}
    assert forms == ({"low-rank", "dense"} if m_ref == 20 else {"dense"})
    want = P.reference_inner(g, g, ref.astype(np.float32), LAYOUT, damping=0.1)
    np.testing.assert_allclose(pre.inner(g, g), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    # ...and the task space of whitened rows is the unbiased estimator on that inner product.
    got = E.task_similarity(pre.whiten(g), tasks, clip=False)
    names = np.unique(tasks)
    inner = np.zeros((4, 4))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            blk = want[np.ix_(tasks == a, tasks == b)]
            inner[i, j] = blk.mean() if i != j else \
                (blk.sum() - np.trace(blk)) / (len(blk) * (len(blk) - 1))
    np.testing.assert_allclose(got.inner, inner, rtol=1e-9)


def test_damping_convention_uses_parameter_count():
    params = tiny_params()
    ref, _ = tiny_differentials(params, 8, 20, seed=1)
    npar = {b["name"]: 10 * b["size"] for b in LAYOUT}
    pre = P.fit_preconditioner(ref, LAYOUT, damping=0.1, n_params=npar)
    for f, b in zip(pre.factors, LAYOUT):
        rb = ref[:, b["offset"]:b["offset"] + b["size"]]
        assert f.delta == pytest.approx(0.1 * (rb ** 2).sum() / len(rb) / npar[b["name"]])
    with pytest.raises(ValueError, match="damping"):
        P.fit_preconditioner(ref, LAYOUT, damping=0.0)


def test_random_projection_approaches_reference():
    """Gaussian sketches per block, damping in parameter units: the preconditioned task space
    gets closer to the full-gradient one as K grows (the full curve is in the bench)."""
    params = tiny_params(d_in=12, hidden=24, classes=10)
    g, tasks = tiny_differentials(params, 6, 16, seed=0, d_in=12)
    ref, _ = tiny_differentials(params, 16, 16, seed=1, d_in=12)
    sizes = [24 * 12, 24, 10 * 24]
    layout = [{"name": f"b{i}", "offset": int(sum(sizes[:i])), "size": s}
              for i, s in enumerate(sizes)]
    npar = {b["name"]: b["size"] for b in layout}
    exact = E.task_similarity(P.fit_preconditioner(ref, layout, n_params=npar).whiten(g),
                              tasks).sim
    errs = []
    for mult in (0.125, 8.0):
        rng = np.random.default_rng(0)
        proj = [rng.normal(size=(s, max(2, int(mult * s)))) / np.sqrt(max(2, int(mult * s)))
                for s in sizes]
        sk = lambda x: np.hstack([x[:, b["offset"]:b["offset"] + b["size"]] @ p  # noqa: E731
                                  for b, p in zip(layout, proj)])
        ks = [p.shape[1] for p in proj]
        lay_k = [{"name": b["name"], "offset": int(sum(ks[:i])), "size": k}
                 for i, (b, k) in enumerate(zip(layout, ks))]
        pre = P.fit_preconditioner(sk(ref), lay_k, n_params=npar)
        sim = E.task_similarity(pre.whiten(sk(g)), tasks).sim
        errs.append(np.abs(sim - exact).max())
    assert errs[1] < errs[0] / 3 and errs[1] < 0.05, errs


def test_equalize_and_exclude_blocks():
    rng = np.random.default_rng(0)
    layout = [{"name": "model.embed_tokens.weight", "offset": 0, "size": 4},
              {"name": "model.layers.0.input_layernorm.weight", "offset": 4, "size": 2},
              {"name": "model.layers.0.self_attn.q_proj.weight", "offset": 6, "size": 5},
              {"name": "transformer.h.0.ln_1.weight", "offset": 11, "size": 2},
              {"name": "lm_head.weight", "offset": 13, "size": 3}]
    x = rng.normal(size=(50, 16)) * np.repeat([10, 1, 0.1, 3, 5], [4, 2, 5, 2, 3])
    eq = P.equalize_blocks(x, layout)
    for b in layout:
        xb = eq[:, b["offset"]:b["offset"] + b["size"]]
        assert (xb ** 2).sum(1).mean() == pytest.approx(1.0)
    unit = P.equalize_blocks(x, layout, mode="unit")
    np.testing.assert_allclose(np.linalg.norm(unit[:, 6:11], axis=1), 1.0)
    kept, lay, dropped = P.exclude_blocks(x, layout)
    assert dropped == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                       "transformer.h.0.ln_1.weight", "lm_head.weight"]
    assert [(b["name"], b["offset"], b["size"]) for b in lay] == \
        [("model.layers.0.self_attn.q_proj.weight", 0, 5)]
    np.testing.assert_array_equal(kept, x[:, 6:11])
    _, _, only = P.exclude_blocks(x, layout, exclude=[r"q_proj"])
    assert only == ["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="every block"):
        P.exclude_blocks(x, layout, exclude=[r"."])
