"""Load a GGUF checkpoint (llama.cpp format) as an HF-named, HF-shaped float32 numpy state dict.

The config and tokenizer are built by transformers' own GGUF code (``AutoConfig`` /
``AutoTokenizer`` with ``gguf_file=``), so they are the ones ``from_pretrained`` would give. The
tensors are dequantised here with the ``gguf`` package, one at a time, and converted by a small
explicit table per architecture: every GGUF tensor must be claimed by the table, every HF tensor
the config implies must be present with its HF shape, and anything else is an error naming the
tensor and the file.

The one value transform for ``llama`` is llama.cpp's RoPE row permutation of the Q and K
projections (``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``), undone by
:func:`unpermute_rope_rows`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from lmgrad.io import sha256_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

SUPPORTED_ARCHITECTURES = ("llama",)

_GGUF_MAGIC = b"GGUF"

# GGUF leaf name -> HF name inside model.layers.N, for architecture "llama".
_LLAMA_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Recognised GGUF tensors that have no HF parameter; handled by _check_rope_freqs.
_ROPE_FREQS = "rope_freqs.weight"
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file converted to the Hugging Face layout.

    Attributes:
      config: the ``transformers`` config (e.g. ``LlamaConfig``) built from the GGUF metadata.
      state_dict: HF parameter name -> float32 array, names and shapes as in
        ``LlamaForCausalLM.state_dict()``; ``lm_head.weight`` is absent when embeddings are tied.
      tokenizer: the fast tokenizer stored in the GGUF, or None if not requested.
      sha256: hex sha256 of the file.
      path: absolute path of the file.
      ggml_types: HF parameter name -> GGML storage type of its source tensor (e.g. "Q4_1").
    """

    config: PretrainedConfig
    state_dict: dict[str, np.ndarray]
    tokenizer: PreTrainedTokenizerFast | None
    sha256: str
    path: pathlib.Path
    ggml_types: dict[str, str]


def unpermute_rope_rows(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE permutation of a Q or K projection's rows ([out, in] or [out]).

    llama.cpp stores each head's rows interleaved (pairs (i, i + d/2) adjacent) for its RoPE
    kernel: ``w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)``. Its inverse swaps the same axes
    of the ``(n_head, d // 2, 2, ...)`` view. Use ``n_head`` heads for Q and the KV head count for K.
    """
    rows = w_oi.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return np.ascontiguousarray(w_oi.reshape(n_head, half, 2, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape))


def unpermute_rope_rows_reference(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Slow index-by-index twin of :func:`unpermute_rope_rows`, for tests.

    Within head h of size d, GGUF row ``h*d + 2*i + j`` holds HF row ``h*d + j*d/2 + i``.
    """
    d = w_oi.shape[0] // n_head
    out = np.empty_like(w_oi)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + j * (d // 2) + i] = w_oi[h * d + 2 * i + j]
    return out


def _head_dim(config: PretrainedConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def llama_expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of a ``LlamaForCausalLM`` (or Mistral) with this config."""
    d, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    hd = _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _llama_hf_name(gguf_name: str) -> str | None:
    """HF name of a llama GGUF tensor, or None if the table does not know it."""
    if gguf_name in _LLAMA_GLOBAL_MAP:
        return _LLAMA_GLOBAL_MAP[gguf_name]
    if m := _BLOCK_RE.fullmatch(gguf_name):
        leaf = _LLAMA_LAYER_MAP.get(m.group(2))
        return f"model.layers.{int(m.group(1))}.{leaf}" if leaf else None
    return None


def _llama_hook(hf_name: str, config: PretrainedConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """The value transform for one tensor, if it needs one."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return lambda w: unpermute_rope_rows(w, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return lambda w: unpermute_rope_rows(w, config.num_key_value_heads)
    return None


def _read_header(path: pathlib.Path):
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped), with errors that name the file."""
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (first bytes {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises bare ValueError/struct errors without the path
        raise ValueError(f"{path}: unreadable GGUF ({type(e).__name__}: {e})") from e


def _string_field(reader, key: str, path: pathlib.Path) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{path}: GGUF metadata has no {key!r}")
    return str(field.contents())


def _check_rope_freqs(tensor, path: pathlib.Path) -> None:
    """Accept a ``rope_freqs`` tensor only when it is all ones (plain RoPE).

    llama.cpp stores Llama-3.1-style RoPE scaling as per-frequency divisors; transformers' GGUF
    config reader does not turn them back into ``rope_parameters``, so a model built from the
    config would silently use unscaled RoPE.
    """
    import gguf

    freqs = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not np.all(freqs == 1.0):
        raise ValueError(
            f"{path}: tensor {tensor.name!r} holds RoPE frequency scaling (values in "
            f"[{freqs.min():.4g}, {freqs.max():.4g}]), which the GGUF config reader does not carry over; "
            "this checkpoint is not supported")


def load_gguf(path: str | os.PathLike, *, load_tokenizer: bool = True) -> GGUFCheckpoint:
    """Load a GGUF file as an HF-named float32 state dict, its transformers config and tokenizer.

    Args:
      path: the ``.gguf`` file.
      load_tokenizer: build the tokenizer from the GGUF metadata (a few seconds); if False,
        ``tokenizer`` is None.

    Raises:
      ValueError: not a GGUF file; an architecture other than ``llama``; a tensor the conversion
        table does not know; an expected HF tensor missing or of the wrong shape.
    """
    import gguf
    from transformers import AutoConfig

    path = pathlib.Path(path).expanduser().resolve()
    reader = _read_header(path)
    arch = _string_field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")

    # Exactly what from_pretrained(dir, gguf_file=name) does, so config fields agree with transformers.
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers' messages do not name the file
        raise ValueError(f"{path}: transformers could not build a config from the GGUF metadata "
                         f"({type(e).__name__}: {e})") from e
    expected = llama_expected_shapes(config)

    # Map every name before dequantising anything, so a bad file fails fast and totally.
    plan: list[tuple[Any, str]] = []
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            _check_rope_freqs(tensor, path)
            continue
        hf_name = _llama_hf_name(tensor.name)
        if hf_name is None or hf_name not in expected:
            why = "unknown to the conversion table" if hf_name is None else f"maps to {hf_name!r}, which the config does not expect"
            raise ValueError(f"{path}: GGUF tensor {tensor.name!r} ({arch}) is {why}")
        plan.append((tensor, hf_name))
    mapped = [hf for _, hf in plan]
    if len(set(mapped)) != len(mapped):
        dup = sorted({n for n in mapped if mapped.count(n) > 1})
        raise ValueError(f"{path}: several GGUF tensors map to {dup}")
    missing = [n for n in expected if n not in set(mapped)]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"({len(missing)} of {len(expected)} expected)")

    state_dict: dict[str, np.ndarray] = {}
    ggml_types: dict[str, str] = {}
    for tensor, hf_name in plan:
        # dequantize returns a view of the memory map for F32; copy so no array pins the file.
        w = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, copy=True)
        if w.shape != expected[hf_name]:
            raise ValueError(f"{path}: tensor {tensor.name!r} -> {hf_name!r} has shape {w.shape}, "
                             f"expected {expected[hf_name]}")
        if (hook := _llama_hook(hf_name, config)) is not None:
            w = hook(w)
        state_dict[hf_name] = w
        ggml_types[hf_name] = tensor.tensor_type.name
    # HF order (embeddings, layers, final norm, head), independent of the file's tensor order.
    state_dict = {n: state_dict[n] for n in expected}
    del reader

    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise ValueError(f"{path}: transformers could not build a tokenizer from the GGUF metadata "
                             f"({type(e).__name__}: {e}); pass load_tokenizer=False to skip it") from e
    return GGUFCheckpoint(config=config, state_dict=state_dict, tokenizer=tokenizer,
                          sha256=sha256_file(path), path=path, ggml_types=ggml_types)
