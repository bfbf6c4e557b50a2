"""Flax causal LMs (GPT-2, GPT-NeoX/Pythia, Llama/Mistral/Qwen2, Gemma-3) loaded from HF or GGUF checkpoints."""

from lmgrad.models.config import ModelConfig, UnsupportedModelError, from_hf_config
from lmgrad.models.loading import (
    DEFAULT_SPEC,
    CheckpointError,
    LoadedModel,
    build_module,
    convert_state_dict,
    load_model,
    logits_fn,
    param_shapes,
)

__all__ = [
    "DEFAULT_SPEC", "CheckpointError", "LoadedModel", "ModelConfig", "UnsupportedModelError",
    "build_module", "convert_state_dict", "from_hf_config", "load_model",
    "logits_fn", "param_shapes",
]
