r"""A checkpoint series for one GPU: three Llama-style sizes of about 27M, 70M and 203M parameters
(vocabulary 32,768, tied embeddings, bfloat16 compute with float32 master weights) on all three
English corpora (Gutenberg, OpenStax, Wikipedia summaries; ≈20M words, ≈27M tokens).

  export LMGRAD_CORPORA_DIR=/path/to/shared/data/corpora
  python launch/pretrain.py --config=configs/pretrain_gpu.py:27m  --workdir=runs/pretrain_gpu/27m
  python launch/pretrain.py --config=configs/pretrain_gpu.py:70m  --workdir=runs/pretrain_gpu/70m
  python launch/pretrain.py --config=configs/pretrain_gpu.py:203m --workdir=runs/pretrain_gpu/203m
  python launch/pretrain.py --config=configs/pretrain_gpu.py:70m,gpt_neox ...   # GPT-NeoX (Pythia-style)
  python launch/pretrain.py --config=configs/pretrain_gpu.py:smoke --workdir=runs/pretrain_gpu/smoke

6,000 steps of 64 × 512 tokens (≈197M tokens, ≈7 epochs of the corpora); checkpoints at 0, 1, 2,
4, …, 4096, every 500 steps and the last, each exported and scored on BLiMP (67 × 50 pairs).
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from lmgrad.jobs.pretrain import PretrainOptions
from lmgrad.jobs.schema import to_config

CORPORA = ("gutenberg_modern.txt.gz", "openstax_ccby.txt.gz", "wiki_vital_summaries.txt.gz")
SIZES = {
    "27m": dict(hidden_size=512, num_layers=3, num_heads=8, intermediate_size=1536, lr=1e-3),     # 27.0M
    "70m": dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1728, lr=6e-4),   # 70.5M
    "203m": dict(hidden_size=1024, num_layers=13, num_heads=16, intermediate_size=2880, lr=3e-4),  # 203.0M
}


def corpus_paths(names: tuple[str, ...] = CORPORA) -> tuple[str, ...]:
    root = os.environ.get("LMGRAD_CORPORA_DIR", "$LMGRAD_CORPORA_DIR")
    return tuple(os.path.join(root, n) for n in names)


def options(arg: str | None = None) -> PretrainOptions:
    """`arg`: SIZE[,FAMILY] with SIZE in 27m, 70m (default), 203m, smoke; FAMILY llama or gpt_neox."""
    size, _, family = (arg or "70m").partition(",")
    family = family or "llama"
    base = PretrainOptions(
        corpus=corpus_paths(), data_dir=os.environ.get("LMGRAD_PRETRAIN_DATA", "runs/pretrain_gpu/data"),
        vocab_size=32768, tokenizer_max_bytes=50_000_000, family=family, seq_len=512, batch_size=64,
        steps=6000, warmup_steps=300, compute_dtype="bfloat16", checkpoint_every=500, resume_every=250,
        blimp_pairs_per_task=50, eval_batch_size=128, val_sequences=1024,
    )
    if family not in ("llama", "gpt_neox"):
        raise ValueError(f"unknown family in config variant {arg!r}; known: llama, gpt_neox")
    if size == "smoke":
        return dataclasses.replace(base, **SIZES["27m"], data_dir="", max_corpus_bytes=5_000_000, steps=50,
                                   warmup_steps=10, checkpoint_every=0, resume_every=25, blimp_pairs_per_task=10)
    if size not in SIZES:
        raise ValueError(f"unknown config variant {arg!r}; known: {', '.join(SIZES)}, smoke (optionally ,gpt_neox)")
    opts = dataclasses.replace(base, **SIZES[size])
    if family == "gpt_neox":  # a GELU MLP of 4·d instead of SwiGLU's three matrices
        opts = dataclasses.replace(opts, intermediate_size=4 * opts.hidden_size)
    return opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return to_config(options(arg))
