"""Parity of the Flax models with transformers' PyTorch implementations (the oracle).

Tiny random checkpoints are built with `transformers` and `save_pretrained` in a temp dir, then
loaded through `lmgrad.models.load_model` like any real checkpoint. float32 throughout.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lmgrad.models import loading
from lmgrad.params import flatten
from lmgrad.models.config import UnsupportedModelError
from lmgrad.scoring import sequence_logprob
from helpers_models import checkpoint_name, save_random

jax.config.update("jax_default_matmul_precision", "highest")
torch.manual_seed(0)

VOCAB = 97


def _gpt2():
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def _neox(rotary_pct: float, parallel: bool, tied: bool = False):
    return transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, rotary_pct=rotary_pct,
        use_parallel_residual=parallel, tie_word_embeddings=tied,
    )


def _llama(kv: int, tied: bool, bias: bool, rope_scaling=None):
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
        tie_word_embeddings=tied, attention_bias=bias, rms_norm_eps=1e-5,
    )
    if rope_scaling is not None:
        kw["rope_parameters"] = rope_scaling
    return transformers.LlamaConfig(**kw)


def _gemma3(layer_types, window: int, kv: int, tied: bool, **kw):
    # head_dim 8 with hidden 32 and 4 heads, query_pre_attn_scalar 12 != head_dim: both scales show.
    return transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=kv, head_dim=8, max_position_embeddings=64,
        sliding_window=window, layer_types=layer_types, query_pre_attn_scalar=12,
        tie_word_embeddings=tied, **kw)


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)

VARIANTS = {
    "gpt2": _gpt2,
    "neox_partial_parallel": lambda: _neox(0.25, True),
    "neox_full_sequential": lambda: _neox(1.0, False),
    "neox_tied": lambda: _neox(0.5, True, tied=True),
    "llama_gqa_tied": lambda: _llama(2, True, False),
    "llama_mha_untied_bias": lambda: _llama(4, False, True),
    "llama3_rope": lambda: _llama(1, False, False, LLAMA3_ROPE),
    "llama_linear_rope": lambda: _llama(2, True, False, dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
    # Sequences (up to 12 tokens) run past the sliding window; padded rows too.
    "gemma3_tied_softcap": lambda: _gemma3(
        ["sliding_attention", "full_attention"], window=4, kv=2, tied=True,
        final_logit_softcapping=3.0),
    "gemma3_untied_bias_linear_rope": lambda: _gemma3(
        ["full_attention", "sliding_attention"], window=5, kv=4, tied=False, attention_bias=True,
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None),
}


def _batch(rng, lengths, t):
    ids = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, VOCAB, n)
        mask[i, :n] = 1
    return ids, mask


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_random(VARIANTS[request.param](), path)
    model = loading.load_model(str(path), tokenizer=False)
    return torch_model, model


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def test_logits_and_sentence_logprobs(pair):
    torch_model, model = pair
    ids, mask = _batch(np.random.default_rng(1), [11, 7, 3], 12)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model.apply(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    valid = mask.astype(bool)
    assert _rel(out[valid], ref[valid]) < 1e-5
    target = mask.astype(np.float32)
    target[:, 0] = 0
    lp = np.asarray(sequence_logprob(out, ids, target))
    ref_lp = torch.log_softmax(torch.tensor(ref[:, :-1]), -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    ref_lp = (ref_lp.numpy() * target[:, 1:]).sum(-1)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)


def test_packed_rows_score_each_sentence_as_alone(pair):
    """`score_sequences` packs several sentences into one row (segments in the attention mask):
    each sentence's log-prob equals transformers' on that sentence alone in its own row, past
    Gemma-3's sliding window and with partial score_from."""
    from lmgrad.scoring import score_sequences
    from lmgrad.tasks import iter_packed

    torch_model, model = pair
    rng = np.random.default_rng(2)
    seqs = [rng.integers(1, VOCAB, n).astype(np.int64) for n in (12, 3, 9, 5, 2, 7, 11, 4, 6)]
    score_from = [1, 1, 4, 1, 1, 2, 1, 3, 1]
    batches = list(iter_packed(seqs, rows=2, row_len=16, score_from=score_from))
    assert max(int(b.attention_mask.max()) for b in batches) >= 3  # rows really hold several sentences
    ref = []
    with torch.no_grad():
        for s, f in zip(seqs, score_from):
            logits = torch_model(input_ids=torch.tensor(s[None])).logits[0].double()
            lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(s[1:, None]))[:, 0]
            ref.append(float(lp[f - 1:].sum()))
    packed = score_sequences(model, seqs, batch_size=1, score_from=score_from)  # all 9 in one row of 64
    np.testing.assert_allclose(packed, ref, rtol=1e-5, atol=1e-5)


def test_gradients_of_every_parameter(pair):
    torch_model, model = pair
    ids, mask = _batch(np.random.default_rng(2), [9, 5], 10)
    target = mask.astype(np.float32)
    target[:, 0] = 0

    torch_model.zero_grad()
    logits = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(ids[:, 1:, None]))[..., 0]
    (-(lp * torch.tensor(target[:, 1:])).sum()).backward()
    ref = {checkpoint_name(torch_model, n): p.grad.numpy() for n, p in torch_model.named_parameters()}

    def nll(params):
        out = model.apply(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
        return -sequence_logprob(out, jnp.asarray(ids), jnp.asarray(target)).sum()

    grads = flatten(jax.grad(nll)(model.params))
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    for name, g in grads.items():
        assert _rel(np.asarray(g), ref[name]) < 1e-4, name


def test_bfloat16_runs_close(pair, tmp_path):
    _, model = pair
    ids, mask = _batch(np.random.default_rng(3), [8, 6], 8)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
    out16 = np.asarray(model.apply(p16, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    out32 = np.asarray(model.apply(model.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    assert out16.dtype == np.float32
    assert np.all(np.isfinite(out16))
    assert _rel(out16[mask.astype(bool)], out32[mask.astype(bool)]) < 5e-2


def test_rope_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from lmgrad.models.config import from_hf_config

    for rope in (LLAMA3_ROPE, dict(rope_type="linear", factor=2.0, rope_theta=10000.0)):
        cfg = _llama(2, True, False, rope)
        inv_ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        np.testing.assert_allclose(from_hf_config(cfg).inv_freq, inv_ref.numpy(), rtol=1e-6)


# --- bad input ------------------------------------------------------------------------------


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5_like_thing", "vocab_size": 3}))
    with pytest.raises((UnsupportedModelError, loading.CheckpointError), match="t5_like_thing"):
        loading.load_model(str(tmp_path), tokenizer=False)


def test_one_converter_per_family():
    from lmgrad.models import config as C

    assert C.SUPPORTED_MODEL_TYPES == ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text", "gemma3")
    assert dict(C.CONVERTERS) == {
        "gpt2": C.gpt2_config, "gpt_neox": C.gpt_neox_config, "llama": C.llama_config,
        "mistral": C.llama_config, "qwen2": C.llama_config, "gemma3_text": C.gemma3_config,
        "gemma3": C.gemma3_config}
    for name, make in VARIANTS.items():
        hf = make()
        cfg = C.from_hf_config(hf)
        assert cfg == C.CONVERTERS[hf.model_type](hf) and cfg.model_type == hf.model_type, name
    assert C.from_hf_config(VARIANTS["qwen2"]()).family == "llama"
    with pytest.raises(UnsupportedModelError, match=r"'t5'.*supported: gpt2, gpt_neox, llama, mistral, qwen2, gemma3"):
        C.from_hf_config(transformers.T5Config())
    with pytest.raises(UnsupportedModelError, match="scale_attn_weights"):
        C.from_hf_config(transformers.GPT2Config(scale_attn_weights=False))


def test_supported_transformers_type_we_do_not_implement(tmp_path):
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="bert"):
        loading.load_model(str(tmp_path), tokenizer=False)


def _edit_checkpoint(path, edit):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_named(tmp_path):
    save_random(_gpt2(), tmp_path)
    _edit_checkpoint(tmp_path, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(loading.CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        loading.load_model(str(tmp_path), tokenizer=False)


def test_shape_mismatch_named(tmp_path):
    save_random(_llama(2, True, False), tmp_path)
    _edit_checkpoint(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 8), np.float32)}))
    with pytest.raises(loading.CheckpointError, match=r"k_proj\.weight has shape \(8, 8\)"):
        loading.load_model(str(tmp_path), tokenizer=False)


def test_leftover_tensor_named(tmp_path):
    save_random(_llama(2, True, False), tmp_path)
    _edit_checkpoint(tmp_path, lambda sd: sd.update({"model.layers.9.extra.weight": np.zeros((2,), np.float32)}))
    with pytest.raises(loading.CheckpointError, match=r"model\.layers\.9\.extra\.weight"):
        loading.load_model(str(tmp_path), tokenizer=False)


def test_sharded_checkpoint_equals_single(tmp_path):
    torch_model = save_random(_neox(0.25, True), tmp_path / "single")
    torch_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = loading.load_model(str(tmp_path / "single"), tokenizer=False)
    b = loading.load_model(str(tmp_path / "sharded"), tokenizer=False)
    assert len(b.provenance["weights"]) > 1
    fa, fb = flatten(a.params), flatten(b.params)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]))


def test_hub_spec_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loading.CheckpointError, match="EleutherAI/pythia-70m.*step3000"):
        loading.load_model("EleutherAI/pythia-70m@step3000", tokenizer=False)
