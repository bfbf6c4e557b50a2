"""Factored (Kronecker) sketches vs their slow twin: exact per-example gradients from a Python loop
of `jax.grad`, projected in float64 numpy with the same P_out, P_in (`factored_reference`).

Tiny random HF checkpoints (as in test_models) cover every layer type the engine has: GPT-2
(Conv1D, tied head, learned positions, LayerNorm), GPT-NeoX (fused QKV, untied embed_out,
parallel residual), Llama (GQA, RMSNorm, tied and untied head, biases).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import transformers

from lmgrad.grads.factored import (
    DEFAULT_OVERRIDES,
    DEFAULT_R_IN,
    DEFAULT_R_OUT,
    FactoredSpec,
    exact_pair_grads,
    factored_reference,
    make_factored_sketch_fn,
    project_exact,
)
from lmgrad.models import loading
from lmgrad.params import flatten, param_info
from helpers_models import save_random

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 61

ARCHS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2),
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False),
    "llama_gqa_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama_untied_bias": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, attention_bias=True,
        rms_norm_eps=1e-5),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_random(ARCHS[request.param](), path)
    return loading.load_model(str(path), tokenizer=False)


def _pairs(seed, lengths_good, lengths_bad, t, batch_size, score_from=1):
    """Good/bad batch dicts with ragged lengths and trailing padding rows (valid=False)."""
    rng = np.random.default_rng(seed)

    def make(lengths):
        ids = np.zeros((batch_size, t), np.int32)
        am = np.zeros((batch_size, t), np.int32)
        tm = np.zeros((batch_size, t), np.float32)
        for i, n in enumerate(lengths):
            ids[i, :n] = rng.integers(1, VOCAB, n)
            am[i, :n] = 1
            tm[i, score_from:n] = 1
        valid = np.arange(batch_size) < len(lengths)
        return {"input_ids": ids, "attention_mask": am, "target_mask": tm, "valid": valid}

    return make(lengths_good), make(lengths_bad)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


GOOD, BAD = [9, 5, 12], [8, 6, 12]  # ragged; two padding rows follow
B, T = 5, 12


@pytest.fixture(scope="module")
def case(model):
    """(model, good, bad, exact per-pair gradient differentials) — the oracle, computed once per arch."""
    good, bad = _pairs(0, GOOD, BAD, T, B)
    return model, good, bad, exact_pair_grads(model.module, model.params, good, bad)


def _check_blocks(fast, ref, layout, n_valid=3):
    fast = np.asarray(fast)
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    for e in layout:  # every block (so every module type) on its own
        sl = slice(e["offset"], e["offset"] + e["size"])
        assert _rel(fast[:n_valid, sl], ref[:n_valid, sl]) <= 1e-5, e["name"]
    assert np.all(fast[n_valid:] == 0.0), "padding rows are exactly zero"


def test_identity_with_projected_exact_gradients(case):
    model, good, bad, grads = case
    spec = FactoredSpec(seed=3, r_in=4, r_out=5, overrides={"mlp": (3, 6), "embed": (6, 7), "*.o_proj.*": (2, 2)})
    fn = make_factored_sketch_fn(model, spec)
    fast, layout = fn(model.params, good, bad)
    ref, ref_layout = project_exact(spec, fn.modules, grads)
    assert layout == ref_layout
    assert {e["name"] for e in layout} == set(flatten(model.params)), "every parameter is sketched"
    assert fast.shape == (B, fn.dim) and fn.dim == sum(e["size"] for e in layout)
    _check_blocks(fast, ref, layout)
    json.dumps(layout), json.dumps(spec.spec)
    # Padded tokens contribute exactly zero: garbage ids under the padding change nothing.
    noisy = {k: v.copy() for k, v in good.items()}
    noisy["input_ids"][noisy["attention_mask"] == 0] = 7
    again, _ = fn(model.params, noisy, bad)
    np.testing.assert_allclose(np.asarray(again), np.asarray(fast), rtol=1e-6, atol=1e-7 * np.abs(fast).max())


def test_exact_vectors_and_selection(case):
    model, good, bad, grads = case
    spec = FactoredSpec(seed=5, r_in=3, r_out=4, overrides=(), handle_vectors="exact", exclude=("*.mlp.*",))
    fn = make_factored_sketch_fn(model, spec)
    fast, layout = fn(model.params, good, bad)
    ref, _ = project_exact(spec, fn.modules, grads)
    assert not any(".mlp." in e["name"] for e in layout)
    _check_blocks(fast, ref, layout)
    for e in layout:  # "exact" vector blocks are the per-example gradients themselves
        if e["role"] == "bias" or e["kind"] in ("layernorm", "rmsnorm"):
            sl = slice(e["offset"], e["offset"] + e["size"])
            assert _rel(np.asarray(fast)[:3, sl], grads[e["name"]][:3]) <= 1e-5


@pytest.mark.parametrize("model", ["neox"], indirect=True)  # one architecture is enough here
def test_reference_entry_point_and_global_stage(case):
    model, good, bad, _ = case
    spec = FactoredSpec(seed=1, r_in=3, r_out=3, overrides=(), global_k=64, global_s=2, handle_vectors="exclude")
    fast, layout = make_factored_sketch_fn(model, spec)(model.params, good, bad)
    ref, ref_layout = factored_reference(model, spec, good, bad)
    assert layout == ref_layout == [{"name": "global", "offset": 0, "size": 64, "shape": [64],
                                     "module": "global", "layer": None, "type": "other"}]
    _check_blocks(fast, ref, layout)


def test_layout_blocks_carry_layer_type_and_tie(model):
    """Each block says its module, layer and type (those of `lmgrad.params.param_info`, which also
    choose its ranks); the embedding that is also the output head is marked `tied`."""
    fn = make_factored_sketch_fn(model, FactoredSpec(seed=0, r_in=2, r_out=2, overrides=()))
    tied = {e["name"] for e in fn.layout if e.get("tied")}
    for e in fn.layout:
        info = param_info(e["name"])
        assert (e["module"], e["layer"], e["type"]) == (info.module, info.layer, info.type), e
        assert (e["type"] == "embed") == (e["kind"] == "embedding"), e
        assert (e["type"] == "norm") == (e["kind"] in ("layernorm", "rmsnorm")), e
    assert {e["layer"] for e in fn.layout} == {None, 0}
    token_embedding = {"gpt2": "transformer.wte.weight", "gpt_neox": "gpt_neox.embed_in.weight",
                       "llama": "model.embed_tokens.weight"}[model.config.family]
    assert tied == ({token_embedding} if model.config.tie_word_embeddings else set())
    assert any(e["type"] == "head" for e in fn.layout) != model.config.tie_word_embeddings

def test_spec_defaults_are_the_sketch_defaults():
    spec = FactoredSpec()
    assert (spec.r_in, spec.r_out, spec.overrides) == (DEFAULT_R_IN, DEFAULT_R_OUT, DEFAULT_OVERRIDES) == (
        8, 16, (("*.v_proj.weight", 8, 128), ("*.down_proj.weight", 8, 128), ("embed", 16, 256), ("norm", 8, 256)))
    assert spec.ranks("model.layers.3.self_attn.v_proj.weight", "attn") == (8, 128)
    assert spec.ranks("model.embed_tokens.weight", "embed") == (16, 256)
    assert spec.ranks("model.layers.3.self_attn.q_proj.weight", "attn") == (8, 16)


@pytest.mark.parametrize("model", ["llama_gqa_tied"], indirect=True)
def test_linearity_batch_size_and_seeds(case):
    model, good, bad, _ = case
    spec = FactoredSpec(seed=11, r_in=4, r_out=4, overrides=())
    fn = make_factored_sketch_fn(model, spec)
    diff, _ = fn(model.params, good, bad)
    # A partner with no scored tokens has zero loss: fn(x, null) is the sketch of ∇ℓ(x).
    null = {**bad, "target_mask": np.zeros_like(bad["target_mask"])}
    s_good, _ = fn(model.params, good, null)
    s_bad, _ = fn(model.params, bad, null)
    assert _rel(np.asarray(s_good - s_bad)[:3], np.asarray(diff)[:3]) <= 1e-5
    # Same seed, other batch size (and row position): same sketch of the same pair.
    sub = lambda d: {k: v[[2, 0]] for k, v in d.items()}  # noqa: E731
    small, _ = make_factored_sketch_fn(model, spec)(model.params, sub(good), sub(bad))
    np.testing.assert_allclose(np.asarray(small), np.asarray(diff)[[2, 0]], rtol=2e-5, atol=1e-6 * np.abs(diff).max())
    # Another seed gives another sketch, of the same scale.
    other, _ = make_factored_sketch_fn(model, FactoredSpec(seed=12, r_in=4, r_out=4, overrides=()))(model.params, good, bad)
    d, o = np.asarray(diff)[:3], np.asarray(other)[:3]
    assert _rel(o, d) > 0.1 and 0.2 < np.linalg.norm(o) / np.linalg.norm(d) < 5
    assert fn.traces == 1, "one compile for repeated calls of one shape"


# ----------------------------------------------------------------------------- no model needed
def test_kronecker_sketch_is_unbiased_within_chi_square_bound():
    """For G = u vᵀ, ‖P_out G P_inᵀ‖² = ‖P_out u‖²‖P_in v‖², a product of independent χ²_r/r-scaled
    norms: mean ‖u‖²‖v‖², variance ‖u‖⁴‖v‖⁴[(1 + 2/r_o)(1 + 2/r_i) − 1]. The mean over S seeds
    must lie within 5 standard errors (normal approximation; two-sided p ≈ 6e-7)."""
    from lmgrad.grads.factored import _Module, factor_matrices

    rng = np.random.default_rng(0)
    u, v = rng.normal(size=7), rng.normal(size=5)
    g = np.outer(u, v)
    m = _Module("l.fc", "linear", "l.fc.weight", (7, 5), None, "other")
    r_o, r_i, S = 3, 2, 300
    vals = []
    for seed in range(S):
        p_out, p_in = (np.asarray(p, np.float64) for p in factor_matrices(FactoredSpec(seed=seed, r_in=r_i, r_out=r_o, overrides=()), m))
        vals.append(np.sum((p_out @ g @ p_in.T) ** 2))
    truth = np.sum(g**2)
    se = truth * np.sqrt(((1 + 2 / r_o) * (1 + 2 / r_i) - 1) / S)
    assert abs(np.mean(vals) - truth) <= 5 * se, (np.mean(vals), truth, se)


def test_spec_round_trip_and_errors():
    spec = FactoredSpec(seed=2, r_in=8, r_out=4, overrides={"mlp": (16, 16), "re:.*\\.q_proj\\..*": (2, 3)},
                        include="model.*", global_k=128)
    again = FactoredSpec.from_spec(json.loads(json.dumps(spec.spec)))
    assert again == spec
    assert spec.ranks("model.layers.0.mlp.up_proj.weight", "mlp") == (16, 16)
    assert spec.ranks("model.layers.0.self_attn.q_proj.weight", "attn") == (2, 3)
    assert spec.ranks("model.layers.0.self_attn.k_proj.weight", "attn") == (8, 4)
    with pytest.raises(ValueError, match="handle_vectors"):
        FactoredSpec(handle_vectors="drop")
    with pytest.raises(ValueError, match="overrides"):
        FactoredSpec(overrides={"mlp": (0, 4)})
    with pytest.raises(ValueError, match="r_in"):
        FactoredSpec(r_in=0)
    with pytest.raises(ValueError, match="generator"):
        FactoredSpec.from_spec({**spec.spec, "generator": "old"})


@pytest.mark.parametrize("model", ["gpt2"], indirect=True)
def test_shard_map_equals_single_device(case):
    """The lead wraps `core` in shard_map over the batch. Inside shard_map a replicated value is
    device-invariant and the transpose of its implicit cast to varying is a psum, so zero
    perturbations must be created device-varying or each device would get the sum of all
    devices' δ. 4 fake CPU devices, 8 rows (3 valid pairs + padding), vs the unsharded call."""
    model, good, bad, _ = case
    from jax.sharding import Mesh, PartitionSpec as P

    assert len(jax.devices()) >= 4, "tests/conftest.py sets 4 fake CPU devices"
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    fn = make_factored_sketch_fn(model, FactoredSpec(seed=2, r_in=3, r_out=3, overrides=()))
    pad = lambda d: {k: np.concatenate([v, np.zeros((3,) + v.shape[1:], v.dtype)]) for k, v in d.items()}  # noqa: E731
    g8, b8 = pad(good), pad(bad)
    want, _ = fn(model.params, g8, b8)
    sharded = jax.jit(jax.shard_map(fn.core, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()),
                                    out_specs=P("data")))
    from lmgrad.grads import as_arrays

    got = sharded(model.params, as_arrays(g8), as_arrays(b8), fn.factors())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_packed_pairs_equal_the_exact_reference(case):
    """Pairs packed side by side into rows (`iter_packed_pairs`: segments, restarted positions,
    signed targets, per-slot sums) give each pair the sketch of its own exact gradient
    differential: the float64 oracle, not the bucketed path."""
    from lmgrad.tasks import iter_packed_pairs

    model, good, bad, grads = case
    spec = FactoredSpec(seed=3, r_in=4, r_out=5, overrides={"mlp": (3, 6), "embed": (6, 7), "*.o_proj.*": (2, 2)})
    fn = make_factored_sketch_fn(model, spec)
    ref, layout = project_exact(spec, fn.modules, grads)
    seqs = lambda d, lens: [d["input_ids"][i, :n] for i, n in enumerate(lens)]  # noqa: E731
    # Pairs of 17, 11 and 24 tokens in rows of 32: one row holds two pairs, the other one and an
    # empty slot, so segments, slots and an empty slot are all exercised.
    (batch,) = iter_packed_pairs(seqs(good, GOOD), seqs(bad, BAD), rows=4, row_len=32)
    assert batch.shape == (2, 32) and batch.index.shape == (2, 2) and (batch.index < 0).sum() == 1
    out, got_layout = fn.packed(model.params, batch)
    out = np.asarray(out)
    assert got_layout == layout and out.shape == (2, 2, fn.dim)
    valid = batch.index >= 0
    assert np.all(out[~valid] == 0.0), "an empty slot is exactly zero"
    order = batch.index[valid]
    _check_blocks(out[valid][np.argsort(order)], ref[:3], layout)


@pytest.mark.parametrize("model", ["gpt2"], indirect=True)
def test_packed_sharded_equals_single_device(case):
    """The packed core under shard_map over rows (4 fake devices; 2 real rows padded to 4) equals
    the single-device call: pairs never straddle rows, so no device needs another's tokens."""
    from lmgrad.grads import make_mesh, sharded_factored_fn
    from lmgrad.tasks import iter_packed_pairs

    model, good, bad, _ = case
    fn = make_factored_sketch_fn(model, FactoredSpec(seed=2, r_in=3, r_out=3, overrides=()))
    seqs = lambda d, lens: [d["input_ids"][i, :n] for i, n in enumerate(lens)]  # noqa: E731
    (batch,) = iter_packed_pairs(seqs(good, GOOD), seqs(bad, BAD), rows=4, row_len=32)
    want, _ = fn.packed(model.params, batch)
    got = sharded_factored_fn(fn, make_mesh(4)).packed(model.params, batch)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6 * np.abs(want).max())
