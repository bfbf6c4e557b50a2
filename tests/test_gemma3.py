"""Gemma-3 beyond the logit/gradient parity of tests/test_models.py: its config converter's edges,
parameter naming, and the factored sketch against exact per-example gradients (the same oracle
and helpers as tests/test_factored.py) on a tiny tied Gemma-3 with sliding and global layers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers

from lmgrad.grads.factored import FactoredSpec, exact_pair_grads, make_factored_sketch_fn, project_exact
from lmgrad.models import loading
from lmgrad.models.config import UnsupportedModelError, from_hf_config
from lmgrad.params import flatten, param_info
from helpers_models import save_random
from test_factored import B, BAD, GOOD, T, VOCAB, _check_blocks, _pairs

jax.config.update("jax_default_matmul_precision", "highest")


def _text(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=32, sliding_window=5,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8)
    return transformers.Gemma3TextConfig(**{**base, **kw})


def test_converter_reads_gemma3_fields():
    cfg = from_hf_config(_text(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, final_logit_softcapping=30.0))
    assert (cfg.model_type, cfg.family, cfg.hidden_act) == ("gemma3_text", "gemma3", "gelu_pytorch_tanh")
    assert cfg.sliding_layers == (True, False) and cfg.sliding_window == 5
    assert cfg.attn_scale == 8**-0.5 and cfg.final_logit_softcapping == 30.0
    np.testing.assert_allclose(cfg.inv_freq, 1e6 ** -(np.arange(0, 8, 2) / 8), rtol=1e-12)
    np.testing.assert_allclose(cfg.local_inv_freq, 1e4 ** -(np.arange(0, 8, 2) / 8), rtol=1e-12)


def test_multimodal_config_uses_its_text_config():
    text = _text()
    multi = transformers.Gemma3Config(text_config=text.to_dict())
    assert multi.model_type == "gemma3"
    assert from_hf_config(multi) == from_hf_config(text)


def test_converter_refuses_what_transformers_does_not_run():
    with pytest.raises(UnsupportedModelError, match="attn_logit_softcapping"):
        from_hf_config(_text(attn_logit_softcapping=50.0))
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        from_hf_config(_text(use_bidirectional_attention=True))
    bad = _text()
    bad.layer_types = ["sliding_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match="layer_types"):
        from_hf_config(bad)


def test_param_info_of_gemma3_names():
    for local, type_ in [("self_attn.q_proj", "attn"), ("self_attn.q_norm", "norm"), ("self_attn.k_norm", "norm"),
                         ("pre_feedforward_layernorm", "norm"), ("post_feedforward_layernorm", "norm"),
                         ("post_attention_layernorm", "norm"), ("mlp.down_proj", "mlp")]:
        info = param_info(f"model.layers.3.{local}.weight", "gemma3")
        assert (info.layer, info.local, info.type) == (3, local, type_), local
    assert param_info("lm_head.weight", "gemma3_text").type == "head"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A one-layer tied Gemma-3 (sliding, T = 12 > window 5) and the exact per-pair gradient
    differentials (one layer: the per-example oracle is a Python loop of jax.grad)."""
    path = tmp_path_factory.mktemp("gemma3")
    save_random(_text(num_hidden_layers=1, layer_types=["sliding_attention"]), path)
    model = loading.load_model(str(path), tokenizer=False)
    good, bad = _pairs(0, GOOD, BAD, T, B)
    return model, good, bad, exact_pair_grads(model.module, model.params, good, bad)


def test_factored_sketch_equals_projected_exact_gradients(case):
    """Every block, including the tied √d-scaled embedding, the four (1 + w) norms of each block and
    the per-head QK-norms (inputs [B, T, H, D]), against the float64 projection of exact
    per-example gradients."""
    model, good, bad, grads = case
    spec = FactoredSpec(seed=3, r_in=4, r_out=5, overrides={"mlp": (3, 6), "embed": (6, 7)})
    fn = make_factored_sketch_fn(model, spec)
    fast, layout = fn(model.params, good, bad)
    ref, ref_layout = project_exact(spec, fn.modules, grads)
    assert layout == ref_layout
    names = set(flatten(model.params))
    assert {e["name"] for e in layout} == names
    assert [e["name"] for e in layout if e.get("tied")] == ["model.embed_tokens.weight"]
    assert sum(e["kind"] == "rmsnorm" for e in layout) == 6 + 1
    _check_blocks(fast, ref, layout)
