"""Tiny random Hugging Face checkpoints for parity tests (the transformers PyTorch oracle)."""

from __future__ import annotations

import torch
import transformers


def save_random(config, path):
    """A random float32 `AutoModelForCausalLM` saved with `save_pretrained` (safetensors) at `path`.

    Norm weights and biases are perturbed away from HF's 1 and 0 initialisation so that their
    gradients, and any mistake in how they are applied, are not special cases.
    """
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def checkpoint_name(torch_model, name):
    """The checkpoint key of a torch parameter name: transformers 5 calls GPT-NeoX's head `lm_head`
    in memory but saves it as `embed_out`, the name real Pythia checkpoints use; we follow them."""
    if torch_model.config.model_type == "gpt_neox" and name == "lm_head.weight":
        return "embed_out.weight"
    return name
