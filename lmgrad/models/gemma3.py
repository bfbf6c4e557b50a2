"""Gemma-3 text models (`Gemma3ForCausalLM`, model_type `gemma3_text`).

A family of its own rather than a Llama variant: every block has four (1 + w) RMSNorms (sandwich
norms around attention and MLP), QK-norm, GeGLU, query_pre_attn_scalar, and interleaved
sliding-window/global layers with their own RoPE bases; the input embedding is scaled by √hidden
in the compute dtype, and the final logits may be softcapped, as transformers does. The MLP is
Llama's (gate/up/down, no bias). HF parameter names are Llama's plus the extra norms.

Every block has the same parameters whatever its attention kind; the model picks the mask and the
RoPE tables per layer from `ModelConfig.sliding_layers`, so the stack stays regular (and can run as
one scan: `lmgrad.models.layers.run_layers`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmgrad.models.config import ModelConfig
from lmgrad.models.layers import (
    CausalLM,
    Embedding,
    Linear,
    RMSNorm,
    apply_rope,
    attention,
    causal_mask,
    rope_cos_sin,
    run_layers,
    segment_positions,
    sliding_causal_mask,
)
from lmgrad.models.llama import LlamaMLP


def _norm(c: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(c.norm_eps, unit_offset=True, name=name)


class Gemma3Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, name="v_proj")(x)
        # QK-norm per head, before RoPE.
        q = _norm(c, "q_norm")(q.reshape(b, t, c.num_heads, c.head_dim))
        k = _norm(c, "k_norm")(k.reshape(b, t, c.num_kv_heads, c.head_dim))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        scale = c.attn_scale if c.attn_scale is not None else c.head_dim**-0.5
        o = attention(q, k, v, mask, scale)
        return Linear(c.hidden_size, c.o_bias, name="o_proj")(o)


class Gemma3DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        h = Gemma3Attention(c, name="self_attn")(_norm(c, "input_layernorm")(x), mask, cos, sin)
        x = x + _norm(c, "post_attention_layernorm")(h)
        h = LlamaMLP(c, name="mlp")(_norm(c, "pre_feedforward_layernorm")(x))
        return x + _norm(c, "post_feedforward_layernorm")(h)


class Gemma3TextModel(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = [Gemma3DecoderLayer(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.norm_eps, unit_offset=True)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        x = self.embed_tokens(input_ids)
        # After the lookup (not inside it), so the lookup's δ stays the embedding table's gradient.
        x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        positions = segment_positions(attention_mask)
        if len(c.sliding_layers) != len(self.layers):
            raise ValueError(f"gemma3: {len(c.sliding_layers)} sliding_layers flags for {len(self.layers)} layers")

        def block_args(i):
            full = (causal_mask(attention_mask), *rope_cos_sin(positions, c.inv_freq, c.rope_attention_factor))
            if not any(c.sliding_layers):
                return full
            local = (sliding_causal_mask(attention_mask, c.sliding_window),
                     *rope_cos_sin(positions, c.local_inv_freq, c.local_rope_attention_factor))
            if isinstance(i, int):  # unrolled
                return local if c.sliding_layers[i] else full
            sliding = jnp.asarray(c.sliding_layers)[i]  # scanned: i is traced
            return tuple(jnp.where(sliding, a, b) for a, b in zip(local, full))

        x = run_layers(self, "layers", self.layers, x, block_args)
        return self.norm(x)

    def head(self, h: jax.Array) -> jax.Array:
        return self.embed_tokens.attend(h)


class Gemma3ForCausalLM(CausalLM):
    """Returns float32 logits [B, T, V] for right-padded `input_ids` and `attention_mask` [B, T]."""

    backbone = Gemma3TextModel
    backbone_name = "model"
    head_name = "lm_head"
