"""Factored (Kronecker) sketches vs their slow twin: exact per-example gradients from a Python loop
of `jax.grad`, projected in float64 numpy with the same P_out, P_in (`factored_reference`).

Tiny random HF checkpoints (as in test_models) cover every layer type the engine has: GPT-2
(Conv1D, tied head, learned positions, LayerNorm), GPT-NeoX (fused QKV, untied embed_out,
parallel residual), Llama (GQA, RMSNorm, tied and untied head, biases).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from lmgrad.grads.factored import (
    FactoredSpec,
    exact_pair_grads,
    factored_reference,
    make_factored_sketch_fn,
    project_exact,
)
from lmgrad.models import loading

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 61

ARCHS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2),
    "neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False),
    "llama_gqa_tied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama_untied_bias": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, attention_bias=True,
        rms_norm_eps=1e-5),
}


def _save_random(config, path):
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so their gradients are not special
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    _save_random(ARCHS[request.param](), path)
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


@pytest.mark.parametrize("vectors", ["project", "exact"])
def test_identity_with_projected_exact_gradients(model, vectors):
    spec = FactoredSpec(seed=3, r_in=4, r_out=5, handle_vectors=vectors, overrides={"mlp": (3, 6), "embed": (6, 7)})
    good, bad = _pairs(0, GOOD, BAD, 12, 5)
    fn = make_factored_sketch_fn(model, spec)
    fast, layout = fn(model.params, good, bad)
    ref, ref_layout = factored_reference(model, spec, good, bad)
    fast = np.asarray(fast)
    assert layout == ref_layout and fast.shape == (5, sum(e["size"] for e in layout))
    names = {e["name"] for e in layout}
    assert names == set(loading.flatten_params(model.params)), "every parameter is sketched"
    for e in layout:  # every block (every module type) on its own
        sl = slice(e["offset"], e["offset"] + e["size"])
        assert _rel(fast[:3, sl], ref[:3, sl]) <= 1e-5, e["name"]
    assert np.all(fast[3:] == 0.0), "padding rows are exactly zero"
    json.dumps(layout), json.dumps(spec.spec)


def test_global_stage_matches_reference(model):
    spec = FactoredSpec(seed=1, r_in=3, r_out=3, global_k=64, global_s=2)
    good, bad = _pairs(1, GOOD, BAD, 12, 4)
    fast, layout = make_factored_sketch_fn(model, spec)(model.params, good, bad)
    ref, _ = factored_reference(model, spec, good, bad)
    assert layout == [{"name": "global", "offset": 0, "size": 64, "shape": [64]}]
    assert _rel(np.asarray(fast)[:3], ref[:3]) <= 1e-5
    assert np.all(np.asarray(fast)[3:] == 0.0)
