"""Per-example gradient differentials against two independent oracles: a Python loop of
`jax.grad` one pair at a time, and PyTorch autograd on the transformers model itself.

Tiny random checkpoints (2 layers, d=32) are saved with `save_pretrained` and loaded through
`lmgrad.models.load_model`; float32 with highest matmul precision throughout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmgrad import grads as lg
from lmgrad.models import load_model, logits_fn
from lmgrad.params import flatten as flatten_params, layers, select as select_params, split as split_params, unflatten as unflatten_params
from lmgrad.scoring import make_score_fn
from lmgrad.sketch import make_projector
from lmgrad.tasks.batching import first_difference, iter_pair_batches
from lmgrad.tasks.pairs import Pair
from helpers_models import checkpoint_name, save_random

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 97

FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def _pairs(n, seed=0):
    """Random minimal pairs: shared prefix, one or two differing tokens, a shared-or-not tail."""
    rng = np.random.default_rng(seed)
    good, bad = [], []
    for i in range(n):
        pre = rng.integers(1, VOCAB, 1 + rng.integers(1, 4))
        pre[0] = 1  # "BOS"
        tail_g = rng.integers(1, VOCAB, rng.integers(1, 4))
        tail_b = tail_g if i % 2 else rng.integers(1, VOCAB, rng.integers(1, 4))
        mid_g = rng.integers(1, VOCAB, 1)
        mid_b = (mid_g % (VOCAB - 2)) + 1 + (mid_g >= VOCAB - 2)  # differs from mid_g
        good.append(np.concatenate([pre, mid_g, tail_g]).astype(np.int32))
        bad.append(np.concatenate([pre, mid_b, tail_b]).astype(np.int32))
    return good, bad


def _batches(good, bad, batch_size, from_first_difference=False):
    start = None
    if from_first_difference:
        start = [max(first_difference(g, b), 1) for g, b in zip(good, bad)]
    return list(iter_pair_batches(good, bad, batch_size=batch_size, score_from_good=start,
                                  score_from_bad=start, min_len=8))


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-30))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_random(FAMILIES[request.param](), path)
    return torch_model, load_model(str(path), tokenizer=False)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_small")
    save_random(FAMILIES["gpt2"](), path)
    return load_model(str(path), tokenizer=False)


def _torch_per_example(torch_model, good, bad):
    """Loop of torch autograd: one pair at a time, ℓ(good) − ℓ(bad) with the batch's masks."""
    out = {}
    for i in np.flatnonzero(good.valid):
        torch_model.zero_grad()
        loss = 0.0
        for sign, b in ((1.0, good), (-1.0, bad)):
            ids = torch.tensor(b.input_ids[i: i + 1], dtype=torch.long)
            logits = torch_model(input_ids=ids, attention_mask=torch.tensor(b.attention_mask[i: i + 1])).logits
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            loss = loss - sign * (lp * torch.tensor(b.target_mask[i: i + 1, 1:])).sum()
        loss.backward()
        for n, p in torch_model.named_parameters():
            g = out.setdefault(checkpoint_name(torch_model, n), np.zeros((len(good.valid),) + tuple(p.shape), np.float32))
            g[i] = p.grad.numpy()
    return out


def test_per_example_matches_reference_and_torch(family):
    """Both token options (whole sentence, from the first difference) on one compiled function."""
    torch_model, model = family
    apply = logits_fn(model)
    good, bad = _pairs(3, seed=1)
    names = list(flatten_params(model.params))
    fn = lg.make_per_example_fn(apply, names, chunk_size=2)
    results = []
    for ffd in (False, True):
        (gb, bb), = _batches(good, bad, batch_size=4, from_first_difference=ffd)  # one padding row
        out = {k: np.asarray(v) for k, v in fn(model.params, gb, bb).items()}
        ref = lg.per_example_reference(apply, model.params, names, gb, bb)
        oracle = _torch_per_example(torch_model, gb, bb)
        assert set(out) == set(ref) == set(oracle), set(out) ^ set(oracle)
        for n in names:
            assert out[n].shape == (4,) + tuple(flatten_params(model.params)[n].shape)
            assert np.all(out[n][3] == 0), f"{n}: padding row not exactly zero"
            assert _rel(out[n], ref[n]) < 1e-5, (ffd, n)
            assert _rel(out[n], oracle[n]) < 1e-4, (ffd, n)
        results.append((gb, out))
    assert fn.traces == 1
    # A causal LM gives a shared prefix the same log-probs in both sentences, so scoring from the
    # first difference changes each sentence's gradient but not the pair's differential.
    (whole, full), (ffd_batch, ffd_out) = results
    assert not np.array_equal(whole.target_mask, ffd_batch.target_mask)
    for n in names:
        assert _rel(ffd_out[n], full[n]) < 1e-5, n


@pytest.fixture(scope="module")
def full_fn(gpt2):
    """Per-example differentials of every GPT-2 parameter, compiled once for the tests below
    (they all use [4, 8] batches so it is traced once)."""
    return lg.make_per_example_fn(logits_fn(gpt2), list(flatten_params(gpt2.params)))


def test_pair_loss_diff_is_score_difference(gpt2):
    good, bad = _pairs(5, seed=2)
    diff = jax.jit(lambda p, g, b: lg.pair_loss_diff(logits_fn(gpt2), p, g, b))
    score = make_score_fn(logits_fn(gpt2))
    for gb, bb in _batches(good, bad, batch_size=4):
        d = np.asarray(diff(gpt2.params, lg.as_arrays(gb), lg.as_arrays(bb)))
        lp = lambda b: np.asarray(score(gpt2.params, b.input_ids, b.attention_mask, b.target_mask))  # noqa: E731
        want = np.where(gb.valid, lp(bb) - lp(gb), 0.0)
        np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)
        assert np.all(d[~gb.valid] == 0)


def test_task_mean_equals_mean_of_per_example(gpt2, full_fn):
    good, bad = _pairs(7, seed=3)  # batch size 4 → a ragged last batch with a padding row
    batches = _batches(good, bad, batch_size=4)
    assert any(not gb.valid.all() for gb, _ in batches)
    names = full_fn.selected
    grad_fn = lg.make_batch_grad_fn(logits_fn(gpt2), names)
    mean = lg.task_mean_differential(logits_fn(gpt2), gpt2.params, names, batches, grad_fn=grad_fn)
    per = [full_fn(gpt2.params, gb, bb) for gb, bb in batches]
    for n in names:
        rows = np.concatenate([np.asarray(p[n], np.float64)[gb.valid] for p, (gb, _) in zip(per, batches)])
        assert rows.shape[0] == 7
        assert _rel(mean[n], rows.mean(0)) < 1e-5, n
    assert grad_fn.traces == 1
    with pytest.raises(ValueError, match="no valid pairs"):
        lg.task_mean_differential(logits_fn(gpt2), gpt2.params, names, [], grad_fn=grad_fn)

    # Garbage in padding rows (ids and masks) must not reach per-example rows or the mean.
    gb, bb = batches[-1]
    for b in (gb, bb):
        b.input_ids[~b.valid] = 5
        b.target_mask[~b.valid] = 1.0
    out = full_fn(gpt2.params, gb, bb)
    again = lg.task_mean_differential(logits_fn(gpt2), gpt2.params, names, batches, grad_fn=grad_fn)
    for n in names:
        assert np.all(np.asarray(out[n])[~gb.valid] == 0)
        np.testing.assert_array_equal(np.asarray(out[n])[gb.valid], np.asarray(per[-1][n])[gb.valid])
        np.testing.assert_allclose(again[n], mean[n], rtol=1e-6, atol=1e-9)


def test_selection_gives_only_selected_and_equals_full_gradient(gpt2, full_fn):
    names = full_fn.selected
    sel = select_params(names, ["*.mlp.*"], exclude=layers(0, 0))
    assert sel and all(".mlp." in n and n.startswith("transformer.h.1.") for n in sel)
    good, bad = _pairs(3, seed=4)
    (gb, bb), = _batches(good, bad, batch_size=4)
    part_fn = lg.make_per_example_fn(logits_fn(gpt2), sel)
    part = part_fn(gpt2.params, gb, bb)
    full = full_fn(gpt2.params, gb, bb)
    assert list(part) == sel
    for n in sel:
        np.testing.assert_allclose(part[n], full[n], rtol=1e-6, atol=1e-9)
    # A flat HF-named dict works as params too.
    flat = part_fn(flatten_params(gpt2.params), gb, bb)
    for n in sel:
        np.testing.assert_array_equal(flat[n], part[n])


def test_select_params_patterns():
    names = [f"model.layers.{i}.{m}.weight" for i in range(10) for m in ("mlp.up_proj", "self_attn.q_proj")]
    names += ["model.embed_tokens.weight", "lm_head.weight"]
    assert select_params(names, None) == names
    sel = select_params(names, layers(4, 8))
    assert sorted({int(n.split(".")[2]) for n in sel}) == [4, 5, 6, 7, 8] and len(sel) == 10
    assert select_params(names, "*.mlp.*", exclude=layers(1, 9)) == ["model.layers.0.mlp.up_proj.weight"]
    assert select_params(names, [r"re:model\.layers\.(1|3)\.self_attn\..*"]) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"]
    assert "transformer.h.10.mlp.c_fc.weight" not in select_params(
        ["transformer.h.1.mlp.c_fc.weight", "transformer.h.10.mlp.c_fc.weight"], layers(1, 1))
    assert layers(2, 2) == ["transformer.h.2.*", "model.layers.2.*", "gpt_neox.layers.2.*"]
    with pytest.raises(ValueError, match=r"\*\.nothing\.\*"):
        select_params(names, ["*.nothing.*"])
    with pytest.raises(ValueError, match="exclude"):
        select_params(names, ["lm_head.*"], exclude=["lm_*"])
    with pytest.raises(ValueError):
        layers(3, 2)
    with pytest.raises(KeyError, match="not.a.param"):
        split_params({"a": {"b": np.zeros(2)}}, ["not.a.param"])


def test_chunking_sketch_and_no_recompile(gpt2, full_fn):
    names = full_fn.selected
    good, bad = _pairs(7, seed=5)
    batches = _batches(good, bad, batch_size=4)  # both [4, 8]; the second has a padding row
    assert len({gb.shape for gb, _ in batches}) == 1
    chunked = lg.make_per_example_fn(logits_fn(gpt2), names, chunk_size=3)  # 4 = 3 + 1 (padded)
    proj = make_projector("rademacher", 16, seed=7)
    sketch = lg.make_sketch_fn(logits_fn(gpt2), names, proj.project, chunk_size=2)
    for gb, bb in batches:
        a, b = full_fn(gpt2.params, gb, bb), chunked(gpt2.params, gb, bb)
        for n in names:
            assert _rel(b[n], a[n]) < 1e-5, n
        s = np.asarray(sketch(gpt2.params, gb, bb))
        assert s.shape == (4, 16) and s.dtype == np.float32
        np.testing.assert_allclose(s, np.asarray(proj.project(a)), rtol=1e-5, atol=1e-6)
        assert np.all(s[~gb.valid] == 0)
    assert chunked.traces == 1 and sketch.traces == 1
    with pytest.raises(ValueError, match="chunk_size"):
        lg.make_per_example_fn(logits_fn(gpt2), names, chunk_size=0)


def test_mismatched_batches_named(gpt2):
    good, bad = _pairs(2, seed=7)
    (gb, bb), = _batches(good, bad, batch_size=2)
    fn = lg.make_per_example_fn(logits_fn(gpt2), ["transformer.wpe.weight"])
    with pytest.raises(ValueError, match="pairs must share"):
        fn(gpt2.params, gb, {k: getattr(bb, k)[:1] for k in ("input_ids", "attention_mask", "target_mask")})
    with pytest.raises(ValueError, match="target_mask"):
        fn(gpt2.params, gb, {"input_ids": bb.input_ids, "attention_mask": bb.attention_mask})


def test_nan_is_refused_naming_the_pair(gpt2, full_fn):
    good, bad = _pairs(3, seed=8)
    (gb, bb), = _batches(good, bad, batch_size=4)
    meta = [Pair("a", "b", UID="agreement_x", pairID=str(i)) for i in range(3)]
    names = ["transformer.h.1.mlp.c_proj.weight"]
    fn = full_fn
    out = fn(gpt2.params, gb, bb)
    lg.check_finite(out, gb.index, meta)  # finite: no error
    flat = flatten_params(gpt2.params)
    flat["transformer.h.1.mlp.c_proj.weight"] = flat["transformer.h.1.mlp.c_proj.weight"].at[0, 0].set(jnp.nan)
    out = fn(unflatten_params(flat), gb, bb)
    assert np.all(np.asarray(out[names[0]])[3] == 0)  # padding stays zero even with a NaN parameter
    with pytest.raises(lg.NonFiniteGradientError, match=r"UID='agreement_x', pairID='0'.*c_proj"):
        lg.check_finite(out, gb.index, meta)
    sk = np.zeros((4, 3), np.float32)
    sk[2, 1] = math.inf
    with pytest.raises(lg.NonFiniteGradientError, match=r"pairID='2'"):
        lg.check_finite(sk, gb.index, [{"UID": "u", "pairID": str(i)} for i in range(3)])
    sk[3, 0] = math.nan  # a padding row (index -1) is ignored
    sk[2, 1] = 0
    lg.check_finite(sk, gb.index, meta)
