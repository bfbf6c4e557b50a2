"""Llama family (`LlamaForCausalLM`, Mistral, Qwen2): RMSNorm, RoPE (default/linear/llama3), GQA."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmgrad.models.config import ModelConfig
from lmgrad.models.layers import (
    CausalLM,
    Embedding,
    Linear,
    RMSNorm,
    activation,
    apply_rope,
    attention,
    causal_mask,
    rope_cos_sin,
    run_layers,
    segment_positions,
)


class LlamaAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="v_proj")(x)
        q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        o = attention(q, k, v, mask, c.head_dim**-0.5)
        return Linear(c.hidden_size, c.o_bias, name="o_proj")(o)


class LlamaMLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = Linear(c.intermediate_size, c.mlp_bias, name="gate_proj")(x)
        up = Linear(c.intermediate_size, c.mlp_bias, name="up_proj")(x)
        return Linear(c.hidden_size, c.mlp_bias, name="down_proj")(activation(c.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        x = x + LlamaAttention(c, name="self_attn")(RMSNorm(c.norm_eps, name="input_layernorm")(x), mask, cos, sin)
        return x + LlamaMLP(c, name="mlp")(RMSNorm(c.norm_eps, name="post_attention_layernorm")(x))


class LlamaModel(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = [LlamaDecoderLayer(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        x = self.embed_tokens(input_ids)
        positions = segment_positions(attention_mask)

        def block_args(_):
            return (causal_mask(attention_mask),
                    *rope_cos_sin(positions, c.inv_freq, c.rope_attention_factor))

        x = run_layers(self, "layers", self.layers, x, block_args)
        return self.norm(x)

    def head(self, h: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(CausalLM):
    """Returns float32 logits [B, T, V] for right-padded `input_ids` and `attention_mask` [B, T]."""

    backbone = LlamaModel
    backbone_name = "model"
    head_name = "lm_head"
