"""Models to train from scratch: a `transformers` config → the project's Flax module → params, and
back out as a Hugging Face directory.

The Flax modules (`lmgrad.models`) name and shape every parameter exactly like the PyTorch state
dict (a Linear's `weight` is [out, in]; GPT-NeoX's fused `query_key_value` is interleaved per head
as in `transformers`), and `lmgrad.models.loading.convert_state_dict` loads HF tensors unchanged.
So exporting is the identity: `lmgrad.params.flatten(params)` written with safetensors, plus the
`transformers` config and the tokenizer. A tied model stores only its embedding, as
`save_pretrained` does. `tests/test_pretrain.py` checks that `transformers` loads the export and
gives the same logits.

Initialisation (`init_params`): normal(0.02) for every matrix, ones for norm scales, zero biases
(GPT-2's scheme without its residual rescaling), each tensor from a key folded from (seed, index).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmgrad import io as lio
from lmgrad.models.config import ModelConfig, from_hf_config
from lmgrad.params import flatten

FAMILIES = ("llama", "gpt_neox")


def hf_config(family: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
              intermediate_size: int, seq_len: int, num_kv_heads: int | None = None,
              tie_word_embeddings: bool = True, rotary_pct: float = 0.25, eot_id: int = 0) -> Any:
    """A `transformers.LlamaConfig` or `GPTNeoXConfig` for a model trained from scratch.

    Llama: SwiGLU, RMSNorm (eps 1e-5), full RoPE (theta 10,000), no biases. GPT-NeoX (Pythia):
    GELU, LayerNorm, parallel residual, rotary on `rotary_pct` of each head. `eot_id` is the
    tokenizer's end-of-text id, used as BOS and EOS.
    """
    import transformers

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=seq_len, tie_word_embeddings=tie_word_embeddings,
                  bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=num_kv_heads or num_heads,
                                        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                                        attention_bias=False, mlp_bias=False)
    if family == "gpt_neox":
        if num_kv_heads not in (None, num_heads):
            raise ValueError("gpt_neox has no grouped-query attention: num_kv_heads must equal num_heads")
        return transformers.GPTNeoXConfig(**common, rotary_pct=rotary_pct, rotary_emb_base=10000,
                                          layer_norm_eps=1e-5, hidden_act="gelu", use_parallel_residual=True)
    raise ValueError(f"family {family!r}; valid: {', '.join(FAMILIES)}")


def init_params(config: ModelConfig, seed: int) -> dict[str, Any]:
    """float32 params: normal(0.02) for every matrix (embeddings, linear maps, an untied head),
    ones for norm scales (the 1-D `weight`s), zeros for biases; parameter i of the sorted HF names
    draws from `fold_in(key(seed), i)`. The modules' own initialisers use the same scheme, but
    `module.init` traces the whole forward pass (seconds of compilation on CPU); this needs only the
    shapes (`jax.eval_shape`)."""
    from lmgrad.models.loading import param_shapes
    from lmgrad.params import unflatten

    key = jax.random.key(seed)
    out = {}
    for i, (name, shape) in enumerate(sorted(param_shapes(config).items())):
        if len(shape) == 1:
            fill = 1.0 if name.endswith(".weight") else 0.0
            out[name] = jnp.full(shape, fill, jnp.float32)
        else:
            out[name] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    return unflatten(out)


def num_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def export_hf(params: Any, hf: Any, tokenizer: Any, directory: str | os.PathLike,
              metadata: dict[str, Any] | None = None) -> pathlib.Path:
    """Writes a Hugging Face directory (config.json, model.safetensors, tokenizer files) that both
    `transformers.AutoModelForCausalLM.from_pretrained` and `lmgrad.models.load_model` read.

    Written into a temporary sibling and renamed, so a directory that exists is complete. An
    existing directory is replaced (a resumed run re-exports the same step bit for bit).
    """
    import shutil

    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in flatten(params).items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if metadata:
        lio.write_json(tmp / "lmgrad_pretrain.json", metadata)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    lio.fsync_dir(directory.parent)
    return directory


def model_config(hf: Any) -> ModelConfig:
    """The project's `ModelConfig` for a `transformers` config (the family's own converter)."""
    return from_hf_config(hf)


def hf_config_dict(hf: Any) -> dict[str, Any]:
    return json.loads(hf.to_json_string())
