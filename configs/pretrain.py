r"""Local checkpoint series, one config file: NAME[,FAMILY] with FAMILY llama (default) or gpt_neox.

  export LMGRAD_CORPORA_DIR=/path/to/shared/data/corpora     # the Makefile does this; or --config.corpus
  python launch/pretrain.py --config=configs/pretrain.py:tiny   --workdir=runs/pretrain/tiny
  python launch/pretrain.py --config=configs/pretrain.py:cpu_s  --workdir=runs/pretrain/cpu_s   # cpu_m, cpu_l
  python launch/pretrain.py --config=configs/pretrain.py:cpu_m,gpt_neox --workdir=runs/pretrain/cpu_m_neox
  python launch/pretrain.py --config=configs/pretrain.py:gpu_70m --workdir=runs/pretrain/gpu_70m  # gpu_27m, gpu_203m

* `tiny` (alias `smoke`): 30 steps of a 0.26M model on the first 2 MB of each corpus, 4 BLiMP
  paradigms; under a minute on 2 CPU cores (the tests run it).
* `cpu_s` / `cpu_m` / `cpu_l`: the CPU series, Llama-style, 0.26M / 1.4M / 2.7M parameters (10.5×
  apart; vocabulary 4,096, tied embeddings) on OpenStax + Wikipedia summaries (3.1M tokens). Every
  size sees the same 1.2M tokens (600 steps × 16 × 128) in the same order, with checkpoints at 0, 1,
  2, 4, …, 512 and 600, each exported and scored on BLiMP (67 × 20 pairs). The sizes share one
  tokenizer and token file (`data_dir`, default $LMGRAD_PRETRAIN_DATA or runs/pretrain/data).
* `gpu_27m` / `gpu_70m` / `gpu_203m`: the seed study's sizes for one GPU (vocabulary 32,768,
  bfloat16 compute, float32 master weights) on all three corpora (≈27M tokens), 6,000 steps of
  64 × 512 tokens, checkpoints at 0, 1, 2, …, 4096, every 500 and the last, BLiMP 67 × 50 pairs.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from lmgrad.jobs.pretrain import PretrainOptions
from lmgrad.jobs.schema import to_config

CPU_CORPORA = ("openstax_ccby.txt.gz", "wiki_vital_summaries.txt.gz")
GPU_CORPORA = ("gutenberg_modern.txt.gz",) + CPU_CORPORA
SIZES = {
    "cpu_s": dict(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=144),        # 0.26M
    "cpu_m": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),       # 1.38M
    "cpu_l": dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=576),       # 2.71M
    "gpu_27m": dict(hidden_size=512, num_layers=3, num_heads=8, intermediate_size=1536, lr=1e-3),
    "gpu_70m": dict(hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1728, lr=6e-4),
    "gpu_203m": dict(hidden_size=1024, num_layers=13, num_heads=16, intermediate_size=2880, lr=3e-4),
}
TINY_TASKS = ("blimp:anaphor_gender_agreement,determiner_noun_agreement_1,"
              "regular_plural_subject_verb_agreement_1,wh_island")


def corpus_paths(names: tuple[str, ...]) -> tuple[str, ...]:
    """The corpora under $LMGRAD_CORPORA_DIR (unset: the names stay relative and a run says which
    file it cannot find, and which option to set)."""
    root = os.environ.get("LMGRAD_CORPORA_DIR", "$LMGRAD_CORPORA_DIR")
    return tuple(os.path.join(root, n) for n in names)


def _cpu() -> PretrainOptions:
    return PretrainOptions(
        corpus=corpus_paths(CPU_CORPORA), data_dir=os.environ.get("LMGRAD_PRETRAIN_DATA", "runs/pretrain/data"),
        vocab_size=4096, seq_len=128, batch_size=16, steps=600, lr=2e-3, warmup_steps=50,
        checkpoint_every=0, resume_every=50, blimp_pairs_per_task=20)


def _gpu() -> PretrainOptions:
    return PretrainOptions(
        corpus=corpus_paths(GPU_CORPORA),
        data_dir=os.environ.get("LMGRAD_PRETRAIN_DATA_GPU", "runs/pretrain/data_gpu"),
        vocab_size=32768, tokenizer_max_bytes=50_000_000, seq_len=512, batch_size=64, steps=6000,
        warmup_steps=300, compute_dtype="bfloat16", checkpoint_every=500, resume_every=250,
        blimp_pairs_per_task=50, eval_batch_size=128, val_sequences=1024)


def options(arg: str | None = None) -> PretrainOptions:
    """`arg`: NAME[,FAMILY]; NAME in tiny (smoke), cpu_s, cpu_m (default), cpu_l, gpu_27m, gpu_70m, gpu_203m."""
    name, _, family = (arg or "cpu_m").partition(",")
    family = family or "llama"
    if family not in ("llama", "gpt_neox"):
        raise ValueError(f"unknown family in config variant {arg!r}; known: llama, gpt_neox")
    if name in ("tiny", "smoke"):
        opts = dataclasses.replace(_cpu(), **SIZES["cpu_s"], data_dir="", max_corpus_bytes=2_000_000, steps=30,
                                   warmup_steps=5, resume_every=10, blimp_tasks=TINY_TASKS,
                                   blimp_pairs_per_task=10, val_sequences=64)
    elif name in SIZES:
        opts = dataclasses.replace(_gpu() if name.startswith("gpu_") else _cpu(), **SIZES[name])
    else:
        raise ValueError(f"unknown config variant {arg!r}; known: tiny, smoke, {', '.join(SIZES)} "
                         "(optionally ,gpt_neox)")
    opts = dataclasses.replace(opts, family=family)
    if family == "gpt_neox":  # a GELU MLP of 4·d instead of SwiGLU's three matrices
        opts = dataclasses.replace(opts, intermediate_size=4 * opts.hidden_size)
    return opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return to_config(options(arg))
