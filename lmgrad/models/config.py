"""One frozen config for every supported causal LM, built from a `transformers` config.

`transformers` owns config parsing (it normalises old `rope_scaling`/`rotary_pct` fields into
`rope_parameters`); we only read the fields our Flax modules need and refuse what we do not support. One converter
per family (`gpt2_config`, `gpt_neox_config`, `llama_config`, `gemma3_config`), registered by HF
`model_type` in `CONVERTERS`; `from_hf_config` dispatches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters shared by the GPT-2, GPT-NeoX, Llama and Gemma-3 families."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    # Rotary embeddings (GPT-NeoX / Llama); rotary_dim == 0 means learned positions (GPT-2).
    rotary_dim: int = 0
    inv_freq: tuple[float, ...] = ()
    rope_attention_factor: float = 1.0
    parallel_residual: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Gemma-3. attn_scale None means head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5).
    attn_scale: float | None = None
    # Per layer: True where the layer attends only to the last `sliding_window` keys with the
    # local RoPE (`local_inv_freq`); the others are global, with `inv_freq`.
    sliding_layers: tuple[bool, ...] = ()
    sliding_window: int | None = None
    local_inv_freq: tuple[float, ...] = ()
    local_rope_attention_factor: float = 1.0
    final_logit_softcapping: float | None = None
    # Execution, not architecture: run the blocks as one `lax.scan` (`lmgrad.models.layers.run_layers`).
    scan_layers: bool = False

    @property
    def family(self) -> str:
        return {"mistral": "llama", "qwen2": "llama", "gemma3_text": "gemma3"}.get(self.model_type, self.model_type)


def _rope_inv_freq(rope: dict[str, Any], dim: int, max_pos: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies for the RoPE variants used by supported checkpoints.

    Mirrors `transformers.modeling_rope_utils` (default, linear, llama3) in float64 numpy so that
    the runtime needs no torch; `tests/test_models.py` checks it against transformers.
    """
    base = float(rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
    attention_factor = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif rope_type == "llama3":
        factor = float(rope["factor"])
        low = float(rope["low_freq_factor"])
        high = float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    else:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)"
        )
    return inv_freq, attention_factor


def _get(hf: Any, name: str, default: Any = None) -> Any:
    return getattr(hf, name, default) if hf is not None else default


def _common(hf: Any) -> dict[str, Any]:
    return dict(
        model_type=hf.model_type,
        vocab_size=int(hf.vocab_size),
        bos_token_id=_get(hf, "bos_token_id"),
        eos_token_id=_get(hf, "eos_token_id"),
    )


def _rope(hf: Any) -> dict[str, Any]:
    rope = dict(_get(hf, "rope_parameters") or {})
    if not rope:  # transformers < 5 style configs
        rope = dict(_get(hf, "rope_scaling") or {})
        rope.setdefault("rope_theta", _get(hf, "rope_theta", _get(hf, "rotary_emb_base", 10000.0)))
    return rope


def gpt2_config(hf: Any) -> ModelConfig:
    """GPT-2 (`transformers.GPT2Config`). `reorder_and_upcast_attn` is ignored: it only changes
    half-precision numerics, and our softmax is always upcast."""
    if not _get(hf, "scale_attn_weights", True):
        raise UnsupportedModelError("gpt2 with scale_attn_weights=False is not supported")
    d = int(hf.n_embd)
    return ModelConfig(
        **_common(hf),
        hidden_size=d,
        num_layers=int(hf.n_layer),
        num_heads=int(hf.n_head),
        num_kv_heads=int(hf.n_head),
        head_dim=d // int(hf.n_head),
        intermediate_size=int(_get(hf, "n_inner") or 4 * d),
        max_position_embeddings=int(hf.n_positions),
        norm_eps=float(hf.layer_norm_epsilon),
        hidden_act=str(hf.activation_function),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        scale_attn_by_inverse_layer_idx=bool(_get(hf, "scale_attn_by_inverse_layer_idx", False)),
    )


def gpt_neox_config(hf: Any) -> ModelConfig:
    """GPT-NeoX / Pythia (`transformers.GPTNeoXConfig`): partial rotary, parallel residual."""
    rope = _rope(hf)
    d = int(hf.hidden_size)
    nh = int(hf.num_attention_heads)
    head_dim = d // nh
    pct = float(rope.get("partial_rotary_factor", _get(hf, "rotary_pct", 1.0)))
    rotary_dim = int(head_dim * pct)
    inv_freq, att = _rope_inv_freq(rope, rotary_dim, int(hf.max_position_embeddings))
    return ModelConfig(
        **_common(hf),
        hidden_size=d,
        num_layers=int(hf.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=head_dim,
        intermediate_size=int(hf.intermediate_size),
        max_position_embeddings=int(hf.max_position_embeddings),
        norm_eps=float(hf.layer_norm_eps),
        hidden_act=str(hf.hidden_act),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        rotary_dim=rotary_dim,
        inv_freq=tuple(float(x) for x in inv_freq),
        rope_attention_factor=att,
        parallel_residual=bool(_get(hf, "use_parallel_residual", True)),
        qkv_bias=bool(_get(hf, "attention_bias", True)),
        o_bias=bool(_get(hf, "attention_bias", True)),
        mlp_bias=True,
    )


def llama_config(hf: Any) -> ModelConfig:
    """The Llama family (`LlamaConfig`, `MistralConfig`, `Qwen2Config`): GQA, RMSNorm, RoPE variants.
    Qwen2 always has q/k/v biases and no o_proj bias."""
    rope = _rope(hf)
    d = int(hf.hidden_size)
    nh = int(hf.num_attention_heads)
    head_dim = int(_get(hf, "head_dim") or d // nh)
    pct = float(rope.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * pct)
    inv_freq, att = _rope_inv_freq(rope, rotary_dim, int(hf.max_position_embeddings))
    if hf.model_type == "qwen2":
        if _get(hf, "use_sliding_window", False):
            raise UnsupportedModelError("qwen2 with use_sliding_window=True is not supported")
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(_get(hf, "attention_bias", False))
    return ModelConfig(
        **_common(hf),
        hidden_size=d,
        num_layers=int(hf.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=int(_get(hf, "num_key_value_heads") or nh),
        head_dim=head_dim,
        intermediate_size=int(hf.intermediate_size),
        max_position_embeddings=int(hf.max_position_embeddings),
        norm_eps=float(hf.rms_norm_eps),
        hidden_act=str(hf.hidden_act),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        rotary_dim=rotary_dim,
        inv_freq=tuple(float(x) for x in inv_freq),
        rope_attention_factor=att,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(_get(hf, "mlp_bias", False)),
    )


_GEMMA3_LAYER_TYPES = ("sliding_attention", "full_attention")


def gemma3_config(hf: Any) -> ModelConfig:
    """Gemma-3 text models (`Gemma3TextConfig`; a multimodal `Gemma3Config` contributes its
    `text_config`): interleaved sliding-window and global layers with their own RoPE bases, QK-norm,
    (1 + w) RMSNorms, query_pre_attn_scalar, optional final logit softcapping."""
    if hf.model_type == "gemma3":
        hf = hf.get_text_config()
    if _get(hf, "use_bidirectional_attention", False):
        raise UnsupportedModelError("gemma3 with use_bidirectional_attention=True is not supported")
    if _get(hf, "attn_logit_softcapping"):
        # transformers' Gemma3Attention never applies it (Gemma-2 did); no released Gemma-3 sets it.
        raise UnsupportedModelError("gemma3 with attn_logit_softcapping is not supported "
                                    "(transformers' Gemma-3 ignores it, so there is no reference)")
    d = int(hf.hidden_size)
    nh = int(hf.num_attention_heads)
    head_dim = int(_get(hf, "head_dim") or d // nh)
    layer_types = list(_get(hf, "layer_types") or [])
    if len(layer_types) != int(hf.num_hidden_layers) or not set(layer_types) <= set(_GEMMA3_LAYER_TYPES):
        raise UnsupportedModelError(
            f"gemma3 layer_types must list {hf.num_hidden_layers} of {_GEMMA3_LAYER_TYPES}, got {layer_types}")
    ropes = dict(_get(hf, "rope_parameters") or {})
    tables = {}
    for kind in _GEMMA3_LAYER_TYPES:
        rope = ropes.get(kind)
        if not isinstance(rope, dict):  # transformers < 5: rope_theta (global), rope_local_base_freq
            rope = dict(_get(hf, "rope_scaling") or {}) if kind == "full_attention" else {}
            rope.setdefault("rope_theta", _get(hf, "rope_theta", 1e6) if kind == "full_attention"
                            else _get(hf, "rope_local_base_freq", 1e4))
        dim = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
        tables[kind] = (dim, *_rope_inv_freq(rope, dim, int(hf.max_position_embeddings)))
    rotary_dim, inv_freq, att = tables["full_attention"]
    local_dim, local_inv, local_att = tables["sliding_attention"]
    if rotary_dim != local_dim:
        raise UnsupportedModelError("gemma3 with different rotary dims for local and global layers is not supported")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    window = _get(hf, "sliding_window")
    if any(sliding) and not window:
        raise UnsupportedModelError("gemma3 has sliding_attention layers but no sliding_window")
    bias = bool(_get(hf, "attention_bias", False))
    cap = _get(hf, "final_logit_softcapping")
    return ModelConfig(
        **_common(hf),
        hidden_size=d,
        num_layers=int(hf.num_hidden_layers),
        num_heads=nh,
        num_kv_heads=int(_get(hf, "num_key_value_heads") or nh),
        head_dim=head_dim,
        intermediate_size=int(hf.intermediate_size),
        max_position_embeddings=int(hf.max_position_embeddings),
        norm_eps=float(hf.rms_norm_eps),
        hidden_act=str(_get(hf, "hidden_activation") or _get(hf, "hidden_act")),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", True)),
        rotary_dim=rotary_dim,
        inv_freq=tuple(float(x) for x in inv_freq),
        rope_attention_factor=att,
        qkv_bias=bias,
        o_bias=bias,
        attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        sliding_layers=sliding,
        sliding_window=int(window) if window else None,
        local_inv_freq=tuple(float(x) for x in local_inv),
        local_rope_attention_factor=local_att,
        final_logit_softcapping=float(cap) if cap else None,
    )


CONVERTERS: dict[str, Callable[[Any], ModelConfig]] = {
    "gpt2": gpt2_config,
    "gpt_neox": gpt_neox_config,
    "llama": llama_config,
    "mistral": llama_config,
    "qwen2": llama_config,
    "gemma3_text": gemma3_config,
    "gemma3": gemma3_config,
}
"""HF `model_type` → converter from its `transformers` config; one converter per family."""

SUPPORTED_MODEL_TYPES = tuple(CONVERTERS)


def from_hf_config(hf: Any) -> ModelConfig:
    """Builds a `ModelConfig` from a `transformers.PretrainedConfig` with its family's converter.

    Raises `UnsupportedModelError` naming the model_type or option we do not implement.
    """
    mt = _get(hf, "model_type")
    convert = CONVERTERS.get(mt)
    if convert is None:
        raise UnsupportedModelError(
            f"unknown model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return convert(hf)
