"""Scanned layer stacks (`scan_layers=True`, `lmgrad.models.layers.run_layers`) against transformers'
PyTorch models (the oracle) and against the unrolled stack, plus the compile-reuse plumbing.

Tiny random checkpoints with 3 blocks (so a scan really iterates), one per family: GPT-2 with
`scale_attn_by_inverse_layer_idx` so the block index travels through the scan, Gemma-3 with
sliding and global blocks so each block's mask and RoPE tables are chosen inside the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers_models import checkpoint_name, save_random
from helpers_tokenizer import save_tiny_llama
from lmgrad.models import loading
from lmgrad.params import flatten
from lmgrad.scoring import sequence_logprob

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 53
ARCHS = {
    "gpt2_inverse_idx": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=3, n_head=2, scale_attn_by_inverse_layer_idx=True),
    "gemma3_sliding_global": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, sliding_window=4, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=True),
    "llama_gqa_tied_bias": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, attention_bias=True,
        rms_norm_eps=1e-5),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def trio(request, tmp_path_factory):
    """(torch model, scanned model, unrolled model) of one random checkpoint."""
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_random(ARCHS[request.param](), path)
    scanned = loading.load_model(str(path), tokenizer=False, scan_layers=True)
    unrolled = loading.load_model(str(path), tokenizer=False, scan_layers=False)
    return torch_model, scanned, unrolled


def _batch(seed, lengths, t):
    rng = np.random.default_rng(seed)
    ids, mask = np.zeros((len(lengths), t), np.int64), np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = rng.integers(1, VOCAB, n), 1
    return ids, mask


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def test_scanned_logits_and_gradients_equal_transformers(trio):
    torch_model, model, _ = trio
    ids, mask = _batch(1, [10, 6, 3], 10)
    target = mask.astype(np.float32)
    target[:, 0] = 0
    ji, jm = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    # The blocks really run as one scan (a fallback to the unrolled loop would pass the parity too).
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, ji, jm))(model.params))
    assert jaxpr.count("scan[") == 1 and "layers_2" not in jaxpr and "h_2" not in jaxpr

    torch_model.zero_grad()
    logits = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    (-(lp * torch.tensor(target[:, 1:])).sum()).backward()
    ref_grads = {checkpoint_name(torch_model, n): p.grad.numpy() for n, p in torch_model.named_parameters()}

    out = np.asarray(model.apply(model.params, ji, jm))
    valid = mask.astype(bool)
    assert _rel(out[valid], logits.detach().numpy()[valid]) < 1e-5

    def nll(params):
        return -sequence_logprob(model.apply(params, ji, jm), ji, jnp.asarray(target)).sum()

    grads = flatten(jax.grad(nll)(model.params))
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name, g in grads.items():
        assert _rel(np.asarray(g), ref_grads[name]) < 1e-4, name


def test_factored_sketch_of_a_scanned_model(trio):
    """A scanned model's factored sketch runs scanned: every block's x and δ are recorded stacked
    over the scan (`run_layers`) and split back per block. Its rows equal the unrolled model's
    (tests/test_factored.py checks those against exact gradients), with padding, an invalid row, a
    tied head, Gemma-3's per-head QK-norms and its sliding/global blocks chosen inside the scan."""
    from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn

    _, scanned, unrolled = trio

    def half(seed):
        ids, am = _batch(seed, [7, 5, 8, 4], 8)
        tm = am.astype(np.float32)
        tm[:, 0] = 0
        return {"input_ids": ids.astype(np.int32), "attention_mask": am.astype(np.int32), "target_mask": tm,
                "valid": np.array([True, True, True, False])}

    good, bad = half(3), half(4)
    spec = FactoredSpec(seed=2, r_in=3, r_out=4, overrides=())
    fn_s, fn_u = make_factored_sketch_fn(scanned, spec), make_factored_sketch_fn(unrolled, spec)
    assert fn_s.module.config.scan_layers and fn_s.layout == fn_u.layout
    assert {e["layer"] for e in fn_s.layout} == {None, 0, 1, 2}
    rows_s, _ = fn_s(scanned.params, good, bad)
    rows_u, _ = fn_u(unrolled.params, good, bad)
    rows_s, rows_u = np.asarray(rows_s), np.asarray(rows_u)
    assert np.all(rows_u[3] == 0) and np.all(rows_s[3] == 0)
    assert _rel(rows_s, rows_u) < 1e-5
    for e in fn_s.layout:  # every block carries signal, not only the whole row
        sl = slice(e["offset"], e["offset"] + e["size"])
        assert _rel(rows_s[:3, sl], rows_u[:3, sl]) < 1e-4, e["name"]


def test_sketch_job_store_is_the_same_with_and_without_scan(tmp_path):
    """End to end through the sketch stage (exact per-example differentials, identity projector: one
    block per HF name): stored rows and layout do not depend on scanning. The selection spans
    blocks, so differentiated and frozen params are stacked together inside the scan."""
    from lmgrad import store as lstore
    from lmgrad.jobs.sketch import SketchOptions, sketch_pairs
    from lmgrad.tasks import select_tasks

    save_tiny_llama(tmp_path / "ckpt", num_hidden_layers=3)
    tasks = select_tasks("blimp:passive_1", max_pairs_per_task=4)
    opts = SketchOptions(method="exact", projector="identity", batch_size=4,
                         include=("model.layers.1.*", "model.layers.2.mlp.*", "model.norm.*"))
    for scan in (True, False):
        model = loading.load_model(str(tmp_path / "ckpt"), scan_layers=scan)
        assert model.config.scan_layers is scan
        sketch_pairs(model, tasks, tmp_path / f"scan_{scan}", opts)
    a, b = lstore.open(tmp_path / "scan_True"), lstore.open(tmp_path / "scan_False")
    names = {e["name"] for e in a.layout}
    assert a.layout == b.layout and "model.layers.2.mlp.down_proj.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)
    assert a.meta_records() == b.meta_records()
    np.testing.assert_allclose(a.sketches, b.sketches, rtol=1e-5, atol=1e-6 * np.abs(b.sketches).max())


def test_checkpoints_of_one_architecture_share_compiled_scoring(tmp_path):
    """Two checkpoints with the same config get the same apply function and jitted scorer, so the
    second compiles nothing; their scores still differ (the params are arguments, not constants)."""
    from lmgrad.scoring import make_score_fn

    save_random(ARCHS["neox"](), tmp_path)
    a, b = (loading.load_model(str(tmp_path), tokenizer=False, scan_layers=True) for _ in range(2))
    b.params = jax.tree.map(lambda p: p * 1.1, b.params)  # another checkpoint of the architecture
    assert loading.logits_fn(a) is loading.logits_fn(b)
    score = make_score_fn(loading.logits_fn(a))
    assert make_score_fn(loading.logits_fn(b)) is score
    ids, mask = _batch(6, [6, 4], 8)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(mask, jnp.float32))
    sa = np.asarray(score(a.params, *args))
    size = score._cache_size()
    sb = np.asarray(score(b.params, *args))
    assert score._cache_size() == size, "the second checkpoint reuses the executable"
    assert not np.allclose(sa, sb)


def test_compilation_cache_dir_and_enable(tmp_path, monkeypatch):
    """The env var picks the directory (default under the lmgrad cache, 'off' disables), and an
    enabled cache receives the executables of later compiles even after earlier jits."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    from lmgrad import compilation

    monkeypatch.delenv(compilation.ENV_VAR, raising=False)
    monkeypatch.setenv("LMGRAD_CACHE", str(tmp_path / "root"))
    assert compilation.compilation_cache_dir() == tmp_path / "root" / "jax"
    monkeypatch.setenv(compilation.ENV_VAR, "off")
    assert compilation.compilation_cache_dir() is None
    monkeypatch.setenv(compilation.ENV_VAR, str(tmp_path / "mine"))
    assert compilation.compilation_cache_dir() == tmp_path / "mine"

    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.jit(lambda x: x - 1)(jnp.ones(3)).block_until_ready()  # a compile before the cache is on
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        assert compilation.enable_compilation_cache(tmp_path / "cache") == tmp_path / "cache"
        assert compilation.enable_compilation_cache() == tmp_path / "cache", "an existing directory is kept"
        jax.jit(lambda x: jnp.cos(x) * 3.5)(jnp.ones(7)).block_until_ready()
        assert any((tmp_path / "cache").iterdir())
    finally:
        jax.config.update("jax_compilation_cache_dir", old_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
        cc.reset_cache()
