"""Load a GGUF checkpoint (llama.cpp's format) as a transformers config, tokenizer and an
HF-named, HF-shaped float32 numpy state dict.

The config and tokenizer are built by transformers' own GGUF code (``AutoConfig`` /
``AutoTokenizer`` with ``gguf_file=``), so they are the ones ``from_pretrained`` would give. The
tensors are dequantised here with the ``gguf`` package, one at a time, and converted by a small
explicit table per architecture (`ARCHITECTURES`: ``llama``, ``qwen2``, ``gemma3``): every GGUF
tensor must be claimed by the table, every HF tensor the config implies must be present with its
HF shape, and anything else is an error naming the tensor and the file.

Value transforms, as llama.cpp's ``convert_hf_to_gguf.py`` writes each architecture (and as
transformers' ``modeling_gguf_pytorch_utils`` undoes them):

* ``llama``: the RoPE row permutation of the Q and K projections (``LlamaModel.permute``), undone
  by :func:`unpermute_rope_rows`.
* ``qwen2``: none (``Qwen2Model`` does not permute; its q/k/v biases are stored as they are).
* ``gemma3``: none for the projections; every RMSNorm weight is stored with Gemma's +1 folded in
  (``Gemma3Model.modify_tensors``: ``data_torch + 1``), so 1 is subtracted back.

transformers' GGUF config for ``gemma3`` leaves ``query_pre_attn_scalar`` at its default 256 (the
GGUF has no such key), which is head_dim for every released Gemma-3 except 27B; we follow it.
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
_QWEN2_LAYER_MAP = {
    **_LLAMA_LAYER_MAP,
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
# Gemma-3's four block norms: attn_norm before attention, post_attention_norm after it, ffn_norm
# before the MLP (HF pre_feedforward_layernorm), post_ffw_norm after it.
_GEMMA3_LAYER_MAP = {
    **{k: v for k, v in _LLAMA_LAYER_MAP.items() if k != "ffn_norm.weight"},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Recognised GGUF tensors that have no HF parameter; handled by _check_rope_freqs.
_ROPE_FREQS = "rope_freqs.weight"
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file converted to the Hugging Face layout.

    Attributes:
      config: the ``transformers`` config (``LlamaConfig``, ``Qwen2Config``, ``Gemma3TextConfig``)
        built from the GGUF metadata.
      state_dict: HF parameter name -> float32 array, names and shapes as in the transformers
        model's ``state_dict()``; ``lm_head.weight`` is absent when embeddings are tied.
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


def qwen2_expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of a ``Qwen2ForCausalLM``: Llama's plus q/k/v biases."""
    hd = _head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = llama_expected_shapes(config)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        shapes[p + "q_proj.bias"], shapes[p + "k_proj.bias"], shapes[p + "v_proj.bias"] = (q,), (kv,), (kv,)
    return {n: shapes[n] for n in sorted(shapes, key=_hf_order)}


def gemma3_expected_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape of a ``Gemma3ForCausalLM``: Llama's plus QK-norms and the two
    feed-forward sandwich norms."""
    d, hd = config.hidden_size, _head_dim(config)
    shapes = llama_expected_shapes(config)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                       p + "pre_feedforward_layernorm.weight": (d,), p + "post_feedforward_layernorm.weight": (d,)})
    return {n: shapes[n] for n in sorted(shapes, key=_hf_order)}


def _hf_order(name: str) -> tuple[int, int, str]:
    """Embeddings, then layers in index order, then the final norm and head (stable within a layer)."""
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name):
        return (1, int(m.group(1)), m.group(2))
    return (0 if name == "model.embed_tokens.weight" else 2, 0, name)


def _unpermute_llama(hf_name: str, config: PretrainedConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return lambda w: unpermute_rope_rows(w, config.num_attention_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return lambda w: unpermute_rope_rows(w, config.num_key_value_heads)
    return None


def _no_transform(hf_name: str, config: PretrainedConfig) -> None:
    return None


def _gemma_norm(hf_name: str, config: PretrainedConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    return (lambda w: w - np.float32(1.0)) if hf_name.endswith("norm.weight") else None


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one GGUF ``general.architecture`` maps onto its transformers model.

    Attributes:
      layer_map: GGUF leaf name (after ``blk.N.``) -> HF name inside ``model.layers.N``.
      global_map: GGUF name -> HF name outside the blocks.
      expected: transformers config -> HF name -> shape of every parameter.
      hook: (HF name, config) -> the value transform of that tensor, or None.
    """

    layer_map: dict[str, str]
    global_map: dict[str, str]
    expected: Callable[[PretrainedConfig], dict[str, tuple[int, ...]]]
    hook: Callable[[str, PretrainedConfig], Callable[[np.ndarray], np.ndarray] | None]

    def hf_name(self, gguf_name: str) -> str | None:
        """HF name of a GGUF tensor, or None if the table does not know it."""
        if gguf_name in self.global_map:
            return self.global_map[gguf_name]
        if m := _BLOCK_RE.fullmatch(gguf_name):
            leaf = self.layer_map.get(m.group(2))
            return f"model.layers.{int(m.group(1))}.{leaf}" if leaf else None
        return None


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_LLAMA_LAYER_MAP, _LLAMA_GLOBAL_MAP, llama_expected_shapes, _unpermute_llama),
    "qwen2": Architecture(_QWEN2_LAYER_MAP, _LLAMA_GLOBAL_MAP, qwen2_expected_shapes, _no_transform),
    "gemma3": Architecture(_GEMMA3_LAYER_MAP, _LLAMA_GLOBAL_MAP, gemma3_expected_shapes, _gemma_norm),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


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


def _config(reader: Any, path: pathlib.Path) -> tuple[str, PretrainedConfig]:
    arch = _string_field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
    from transformers import AutoConfig

    # Exactly what from_pretrained(dir, gguf_file=name) does, so config fields agree with transformers.
    try:
        return arch, AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers' messages do not name the file
        raise ValueError(f"{path}: transformers could not build a config from the GGUF metadata "
                         f"({type(e).__name__}: {e})") from e


def gguf_config(path: str | os.PathLike) -> PretrainedConfig:
    """The transformers config of a GGUF file, from its metadata alone (no tensor is dequantised).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a GGUF file, or an architecture not in `ARCHITECTURES` (the file named).
    """
    path = pathlib.Path(path).expanduser().resolve()
    return _config(_read_header(path), path)[1]


def load_gguf(path: str | os.PathLike, *, load_tokenizer: bool = True) -> GGUFCheckpoint:
    """Load a GGUF file as an HF-named float32 state dict, its transformers config and tokenizer.

    Args:
      path: the ``.gguf`` file.
      load_tokenizer: build the tokenizer from the GGUF metadata (a few seconds); if False,
        ``tokenizer`` is None.

    Raises:
      ValueError: not a GGUF file; an architecture not in `ARCHITECTURES`; a tensor the conversion
        table does not know; an expected HF tensor missing or of the wrong shape.
    """
    import gguf

    path = pathlib.Path(path).expanduser().resolve()
    reader = _read_header(path)
    arch, config = _config(reader, path)
    table = ARCHITECTURES[arch]
    expected = table.expected(config)

    # Map every name before dequantising anything, so a bad file fails fast and totally.
    plan: list[tuple[Any, str]] = []
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            _check_rope_freqs(tensor, path)
            continue
        hf_name = table.hf_name(tensor.name)
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
        if (hook := table.hook(hf_name, config)) is not None:
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
