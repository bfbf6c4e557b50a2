r"""A local checkpoint series on CPU: three Llama-style sizes (0.26M, 1.4M, 2.7M parameters, 10.5×
apart; vocabulary 4,096, tied embeddings) on modern English (OpenStax + Wikipedia summaries).

  export LMGRAD_CORPORA_DIR=/path/to/shared/data/corpora     # or pass --config.corpus
  python launch/pretrain.py --config=configs/pretrain_cpu.py:tiny   --workdir=runs/pretrain/tiny
  python launch/pretrain.py --config=configs/pretrain_cpu.py:small  --workdir=runs/pretrain/small
  python launch/pretrain.py --config=configs/pretrain_cpu.py:medium --workdir=runs/pretrain/medium
  python launch/pretrain.py --config=configs/pretrain_cpu.py:small,gpt_neox --workdir=...  # GPT-NeoX
  python launch/pretrain.py --config=configs/pretrain_cpu.py:smoke  --workdir=runs/pretrain/smoke

The sizes of a series share one tokenizer and token file (`data_dir`, default
$LMGRAD_PRETRAIN_DATA or runs/pretrain/data) and see the same tokens in the same order. Every size
trains on the same 3.1M tokens (1,500 steps × 16 × 128), with checkpoints at 0, 1, 2, 4, …, 1024,
every 250 steps and the last, each scored on BLiMP (67 × 20 pairs); the README gives the measured
time per size. `smoke` trains the tiny size for 30 steps on the first 2 MB of each corpus, scoring
4 BLiMP paradigms.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from lmgrad.jobs.pretrain import PretrainOptions
from lmgrad.jobs.schema import to_config

CORPORA = ("openstax_ccby.txt.gz", "wiki_vital_summaries.txt.gz")
SIZES = {
    "tiny": dict(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=144),       # 0.26M
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),     # 1.38M
    "medium": dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=576),    # 2.71M
}
SMOKE_TASKS = "blimp:anaphor_gender_agreement,determiner_noun_agreement_1,regular_plural_subject_verb_agreement_1,wh_island"


def corpus_paths(names: tuple[str, ...] = CORPORA) -> tuple[str, ...]:
    """The corpora under $LMGRAD_CORPORA_DIR (unset: the names stay relative and a run says which
    file it cannot find)."""
    root = os.environ.get("LMGRAD_CORPORA_DIR", "$LMGRAD_CORPORA_DIR")
    return tuple(os.path.join(root, n) for n in names)


def options(arg: str | None = None) -> PretrainOptions:
    """`arg`: SIZE[,FAMILY] with SIZE in tiny, small (default), medium, smoke; FAMILY llama or gpt_neox."""
    size, _, family = (arg or "small").partition(",")
    family = family or "llama"
    base = PretrainOptions(
        corpus=corpus_paths(), data_dir=os.environ.get("LMGRAD_PRETRAIN_DATA", "runs/pretrain/data"),
        vocab_size=4096, family=family, seq_len=128, batch_size=16, steps=1500, lr=2e-3, warmup_steps=100,
        checkpoint_every=250, resume_every=50, blimp_pairs_per_task=20,
    )
    if size == "smoke":
        return dataclasses.replace(base, **SIZES["tiny"], data_dir="", max_corpus_bytes=2_000_000, steps=30,
                                   warmup_steps=5, checkpoint_every=0, resume_every=10, blimp_tasks=SMOKE_TASKS,
                                   blimp_pairs_per_task=10, val_sequences=64)
    if size not in SIZES:
        raise ValueError(f"unknown config variant {arg!r}; known: {', '.join(SIZES)}, smoke (optionally ,gpt_neox)")
    if family not in ("llama", "gpt_neox"):
        raise ValueError(f"unknown family in config variant {arg!r}; known: llama, gpt_neox")
    opts = dataclasses.replace(base, **SIZES[size])
    if family == "gpt_neox":  # a GELU MLP of 4·d instead of SwiGLU's three matrices
        opts = dataclasses.replace(opts, intermediate_size=4 * opts.hidden_size)
    return opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return to_config(options(arg))
