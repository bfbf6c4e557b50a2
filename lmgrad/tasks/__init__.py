"""Minimal-pair tasks: schema and loader, packaged BLiMP, selection, tokenisation and
length-bucketed batching."""
from lmgrad.tasks.batching import (
    PAD_ID,
    Batch,
    bos_id,
    bucket_length,
    encode,
    encode_pairs,
    first_difference,
    iter_bucketed,
    iter_pair_batches,
    make_batch,
)
from lmgrad.tasks.blimp import blimp_taxonomy, blimp_uids, load_blimp
from lmgrad.tasks.pairs import Pair, Task, TaskDataError, load_jsonl, normalise_field, parse_jsonl
from lmgrad.tasks.selection import select_tasks, subsample, task_provenance

__all__ = [
    "PAD_ID", "Batch", "bos_id", "bucket_length", "encode", "encode_pairs", "first_difference",
    "iter_bucketed", "iter_pair_batches", "make_batch",
    "blimp_taxonomy", "blimp_uids", "load_blimp",
    "Pair", "Task", "TaskDataError", "load_jsonl", "normalise_field", "parse_jsonl",
    "select_tasks", "subsample", "task_provenance",
]
