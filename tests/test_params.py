"""`lmgrad.params`, the one module for HF parameter names: layer and type of the real names of tiny
models of each family, pattern selection, flat ↔ nested, and layouts that carry layer and type."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from lmgrad import params as P
from lmgrad.analysis import space
from lmgrad.models import from_hf_config, param_shapes
from lmgrad.store.format import normalize_layout
from helpers_models import checkpoint_name, save_random

V = 61
# Per family: (stack prefix, {module outside the stack: type}, {module inside a block: type}, config).
FAMILIES = {
    "gpt2": ("transformer.h",
             {"transformer.wte": "embed", "transformer.wpe": "embed", "transformer.ln_f": "norm"},
             {"attn.c_attn": "attn", "attn.c_proj": "attn", "mlp.c_fc": "mlp", "mlp.c_proj": "mlp",
              "ln_1": "norm", "ln_2": "norm"},
             lambda: transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=3, n_head=2)),
    "gpt_neox": ("gpt_neox.layers",
                 {"gpt_neox.embed_in": "embed", "gpt_neox.final_layer_norm": "norm", "embed_out": "head"},
                 {"attention.query_key_value": "attn", "attention.dense": "attn", "mlp.dense_h_to_4h": "mlp",
                  "mlp.dense_4h_to_h": "mlp", "input_layernorm": "norm", "post_attention_layernorm": "norm"},
                 lambda: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=8, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=12,
                                                    max_position_embeddings=16)),
    "llama": ("model.layers",
              {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "head"},
              {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
               "self_attn.o_proj": "attn", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "mlp",
               "input_layernorm": "norm", "post_attention_layernorm": "norm"},
              lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=12,
                                               num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=16, tie_word_embeddings=False,
                                               attention_bias=True)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, HF checkpoint names of a tiny random model, our module's parameter names)."""
    name = request.param
    config = FAMILIES[name][3]()
    torch_model = save_random(config, tmp_path_factory.mktemp(name))
    hf = {checkpoint_name(torch_model, n) for n, _ in torch_model.named_parameters()}
    return name, hf, set(param_shapes(from_hf_config(config)))


def test_param_info_on_real_names(family):
    name, hf_names, ours = family
    stack, top, block, _ = FAMILIES[name]
    assert hf_names == ours, hf_names ^ ours
    seen_layers = set()
    for n in sorted(hf_names):
        info = P.param_info(n)
        module = n.rsplit(".", 1)[0]
        assert info.name == n and info.module == module
        if module in top:
            assert (info.layer, info.type) == (None, top[module]), n
            assert info.family == (None if module == "lm_head" else name), n  # lm_head is shared
        else:
            layer, local = module[len(stack) + 1:].split(".", 1)
            assert module.startswith(stack + ".")
            assert (info.family, info.layer, info.type, info.local) == (name, int(layer), block[local], local), n
            seen_layers.add(info.layer)
        assert P.param_info(n, family=name).family == name
        assert info.type in P.TYPES
    assert seen_layers == {0, 1, 2}
    head = P.head_weight(name)
    assert P.param_info(head, name).type == "head" and (head in hf_names) == (name != "gpt2")  # GPT-2 ties it


def test_family_aliases_and_generic_names():
    assert P.param_info("lm_head.weight", "qwen2") == P.ParamInfo("lm_head.weight", "llama", None, "lm_head", "head")
    assert P.param_info("lm_head.weight", "gpt2").family == "gpt2"
    assert P.head_weight("mistral") == "lm_head.weight" and P.head_weight("gpt_neox") == "embed_out.weight"
    bert = P.param_info("bert.encoder.layer.4.attention.self.query.weight")
    assert (bert.family, bert.layer, bert.type, bert.local) == (None, 4, "attn", "attention.self.query")
    assert P.param_info("blocks.2.mlp.fc1.bias").layer == 2
    assert P.param_info("global") == P.ParamInfo("global", None, None, "global", "other")
    assert P.module_of("model.norm.weight") == "model.norm" and P.module_of("global") == "global"


def test_patterns_select_and_layers():
    names = [f"model.layers.{i}.{m}.weight" for i in range(12) for m in ("mlp.up_proj", "self_attn.q_proj")]
    names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "transformer.h.10.mlp.c_fc.weight"]
    assert P.matches("model.layers.3.mlp.up_proj.weight", "*.mlp.*")  # '*' crosses dots
    assert not P.matches("model.layers.3.mlp.up_proj.weight", "*.MLP.*")  # case-sensitive
    assert P.matches("model.layers.3.mlp.up_proj.weight", r"re:model\.layers\.\d+\.mlp\..*")
    assert not P.matches("model.layers.3.mlp.up_proj.weight", r"re:layers\.3")  # full match only
    assert P.select(names, None) == names
    assert P.select(names, P.layers(4, 5)) == [n for n in names if ".layers.4." in n or ".layers.5." in n]
    assert P.select(names, "*.mlp.*", exclude=P.layers(1, 9)) == [  # layers.1.* does not match layers.10
        "model.layers.0.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.weight",
        "model.layers.11.mlp.up_proj.weight", "transformer.h.10.mlp.c_fc.weight"]
    assert P.select(names, [r"re:model\.layers\.(1|3)\.self_attn\..*"]) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"]
    assert P.layers(2, 2) == ["transformer.h.2.*", "model.layers.2.*", "gpt_neox.layers.2.*"]
    with pytest.raises(ValueError, match=r"\*\.nothing\.\*"):
        P.select(names, ["*.nothing.*"])
    with pytest.raises(ValueError, match="start <= stop"):
        P.layers(3, 2)


def test_flatten_unflatten_split_round_trip():
    nested = {"model": {"embed_tokens": {"weight": 1}, "layers_0": {"mlp": {"up_proj": {"weight": 2}}},
                        "layers_11": {"input_layernorm": {"weight": 3}}},
              "transformer": {"h_2": {"ln_1": {"bias": 4}}}, "lm_head": {"weight": 5}}
    flat = P.flatten(nested)
    assert flat == {"model.embed_tokens.weight": 1, "model.layers.0.mlp.up_proj.weight": 2,
                    "model.layers.11.input_layernorm.weight": 3, "transformer.h.2.ln_1.bias": 4, "lm_head.weight": 5}
    assert P.unflatten(flat) == nested
    assert P.flatten(flat) == flat  # already flat passes through
    chosen, rest = P.split(nested, ["lm_head.weight"])
    assert chosen == {"lm_head.weight": 5} and len(rest) == 4
    with pytest.raises(KeyError, match="not.a.param"):
        P.split(nested, ["not.a.param"])


def test_normalize_layout_fills_old_layouts():
    old = [{"name": "model.embed_tokens.weight", "offset": 0, "size": 4},  # as written before blocks had fields
           {"name": "model.layers.1.mlp.down_proj.weight", "offset": 4, "size": 2, "shape": [1, 2]},
           {"name": "model.norm.weight", "offset": 6, "size": 2, "type": "norm", "layer": None, "module": "model.norm"}]
    out = normalize_layout(old, 8)
    assert [(b["module"], b["layer"], b["type"]) for b in out] == [
        ("model.embed_tokens", None, "embed"), ("model.layers.1.mlp.down_proj", 1, "mlp"), ("model.norm", None, "norm")]
    assert normalize_layout(out, 8) == out  # idempotent; present fields are kept
    assert normalize_layout(None, 8) == []
    # The analysis' view: None is one global block, blocks sorted and tiling [0, k).
    assert space.normalize_layout(None, 8) == [{"name": "global", "offset": 0, "size": 8, "module": "global",
                                                "layer": None, "type": "other"}]
    assert [b["name"] for b in space.normalize_layout(old[::-1], 8)] == [b["name"] for b in old]
    with pytest.raises(ValueError, match="starts at 6, expected 4"):
        space.normalize_layout([old[0], old[2]], 8)
    with pytest.raises(ValueError, match="cover 6 columns"):
        space.normalize_layout(old[:2], 8)
    with pytest.raises(ValueError, match="overlap"):
        normalize_layout([old[0], {**old[1], "offset": 3}], 8)


def test_analysis_groups_read_the_layout_fields():
    """Grouping uses each block's layer/type/tied fields; a tied embedding is labelled as both uses."""
    layout = [{"name": "model.embed_tokens.weight", "offset": 0, "size": 2, "tied": True},
              {"name": "model.layers.0.mlp.down_proj.weight", "offset": 2, "size": 2},
              {"name": "model.layers.1.mlp.down_proj.weight", "offset": 4, "size": 2},
              {"name": "model.norm.weight", "offset": 6, "size": 2},
              # a block whose fields disagree with its name: the fields win
              {"name": "custom", "offset": 8, "size": 2, "module": "x.blocks.1.attn", "layer": 1, "type": "attn"}]
    by_layer = space.group_columns(layout, 10, "layer")
    assert list(by_layer) == ["embed+head (tied)", "layers.0", "layers.1", "final_norm"]
    np.testing.assert_array_equal(by_layer["layers.1"], [4, 5, 8, 9])
    by_type = space.group_columns(layout, 10, "module_type")
    assert list(by_type) == ["embed+head (tied)", "mlp.down_proj", "attn", "final_norm"]
    np.testing.assert_array_equal(by_type["mlp.down_proj"], [2, 3, 4, 5])
    assert space.parse_param_name("transformer.h.7.attn.c_attn.weight") == space.ParamInfo(
        "transformer.h.7.attn.c_attn.weight", 7, "attn.c_attn")
