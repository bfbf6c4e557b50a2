"""GPT-2 (`GPT2LMHeadModel`): learned positions, Conv1D weights, tied head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmgrad.models.config import ModelConfig
from lmgrad.models.layers import (
    CausalLM,
    Conv1D,
    Embedding,
    LayerNorm,
    activation,
    attention,
    causal_mask,
    run_layers,
    segment_positions,
)


class GPT2Attention(nn.Module):
    config: ModelConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, layer_idx: int | jax.Array | None = None) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        qkv = Conv1D(3 * c.hidden_size, name="c_attn")(x)
        q, k, v = (a.reshape(b, t, c.num_heads, c.head_dim) for a in jnp.split(qkv, 3, axis=-1))
        scale = c.head_dim**-0.5
        if c.scale_attn_by_inverse_layer_idx:
            # A traced index when the blocks are scanned (`run_layers`), else this block's own.
            idx = self.layer_idx if layer_idx is None else layer_idx
            scale = scale / (idx + 1.0)
        return Conv1D(c.hidden_size, name="c_proj")(attention(q, k, v, mask, scale))


class GPT2MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = activation(c.hidden_act)(Conv1D(c.intermediate_size, name="c_fc")(x))
        return Conv1D(c.hidden_size, name="c_proj")(h)


class GPT2Block(nn.Module):
    config: ModelConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, layer_idx: int | jax.Array | None = None) -> jax.Array:
        eps = self.config.norm_eps
        attn = GPT2Attention(self.config, self.layer_idx, name="attn")
        x = x + attn(LayerNorm(eps, name="ln_1")(x), mask, layer_idx)
        return x + GPT2MLP(self.config, name="mlp")(LayerNorm(eps, name="ln_2")(x))


class GPT2Model(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.wte = Embedding(c.vocab_size, c.hidden_size)
        self.wpe = Embedding(c.max_position_embeddings, c.hidden_size)
        self.h = [GPT2Block(c, i) for i in range(c.num_layers)]
        self.ln_f = LayerNorm(c.norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        x = self.wte(input_ids) + self.wpe(segment_positions(attention_mask))
        x = run_layers(self, "h", self.h, x, lambda _: (causal_mask(attention_mask),),
                       pass_index=c.scale_attn_by_inverse_layer_idx)
        return self.ln_f(x)

    def head(self, h: jax.Array) -> jax.Array:
        return self.wte.attend(h)


class GPT2LMHeadModel(CausalLM):
    """Returns float32 logits [B, T, V] for right-padded `input_ids` and `attention_mask` [B, T]."""

    backbone = GPT2Model
    backbone_name = "transformer"
    head_name = "lm_head"
