"""GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): partial rotary, interleaved fused QKV, parallel residual."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmgrad.models.config import ModelConfig
from lmgrad.models.layers import (
    CausalLM,
    Embedding,
    LayerNorm,
    Linear,
    activation,
    apply_rope,
    attention,
    causal_mask,
    rope_cos_sin,
    run_layers,
    segment_positions,
)


class GPTNeoXAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        qkv = Linear(3 * c.hidden_size, use_bias=c.qkv_bias, name="query_key_value")(x)
        # The fused projection is interleaved per head: [q_h, k_h, v_h] for each head h.
        qkv = qkv.reshape(b, t, c.num_heads, 3 * c.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, mask, c.head_dim**-0.5)
        return Linear(c.hidden_size, use_bias=c.o_bias, name="dense")(o)


class GPTNeoXMLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = activation(c.hidden_act)(Linear(c.intermediate_size, c.mlp_bias, name="dense_h_to_4h")(x))
        return Linear(c.hidden_size, c.mlp_bias, name="dense_4h_to_h")(h)


class GPTNeoXLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        ln1 = LayerNorm(c.norm_eps, name="input_layernorm")
        ln2 = LayerNorm(c.norm_eps, name="post_attention_layernorm")
        attn = GPTNeoXAttention(c, name="attention")
        mlp = GPTNeoXMLP(c, name="mlp")
        a = attn(ln1(x), mask, cos, sin)
        if c.parallel_residual:
            return x + a + mlp(ln2(x))
        x = x + a
        return x + mlp(ln2(x))


class GPTNeoXModel(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.embed_in = Embedding(c.vocab_size, c.hidden_size)
        self.layers = [GPTNeoXLayer(c) for _ in range(c.num_layers)]
        self.final_layer_norm = LayerNorm(c.norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        x = self.embed_in(input_ids)
        positions = segment_positions(attention_mask)

        def block_args(_):
            return (causal_mask(attention_mask),
                    *rope_cos_sin(positions, c.inv_freq, c.rope_attention_factor))

        x = run_layers(self, "layers", self.layers, x, block_args)
        return self.final_layer_norm(x)

    def head(self, h: jax.Array) -> jax.Array:
        return self.embed_in.attend(h)


class GPTNeoXForCausalLM(CausalLM):
    """Returns float32 logits [B, T, V] for right-padded `input_ids` and `attention_mask` [B, T]."""

    backbone = GPTNeoXModel
    backbone_name = "gpt_neox"
    head_name = "embed_out"
