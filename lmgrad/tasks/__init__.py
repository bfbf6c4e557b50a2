"""Minimal-pair tasks: schema and loader, BLiMP (read from a directory or downloaded and cached),
selection, tokenisation and length-bucketed batching."""
from lmgrad.tasks.batching import (
    PAD_ID,
    Batch,
    PackedBatch,
    PackedPairBatch,
    bos_id,
    bucket_length,
    degenerate_pairs,
    encode,
    encode_pairs,
    first_difference,
    first_fit_rows,
    iter_bucketed,
    iter_packed,
    iter_pair_batches,
    iter_packed_pairs,
    make_batch,
    packed_pair_shape,
    packed_row_length,
)
from lmgrad.tasks.blimp import (
    BLIMP_DIR_ENV_VAR,
    BLIMP_UIDS,
    blimp_path,
    blimp_source_dir,
    blimp_taxonomy,
    blimp_uids,
    load_blimp,
    set_blimp_dir,
)
from lmgrad.tasks.pairs import Pair, Task, TaskDataError, load_jsonl, normalise_field, parse_jsonl
from lmgrad.tasks.selection import drop_degenerate, select_tasks, subsample, task_provenance

__all__ = [
    "PAD_ID", "Batch", "bos_id", "bucket_length", "degenerate_pairs", "encode", "encode_pairs",
    "first_difference", "iter_bucketed", "iter_pair_batches", "make_batch", "PackedBatch", "iter_packed",
    "PackedPairBatch", "iter_packed_pairs",
    "packed_row_length", "packed_pair_shape", "first_fit_rows",
    "BLIMP_DIR_ENV_VAR", "BLIMP_UIDS", "blimp_path", "blimp_source_dir", "blimp_taxonomy", "blimp_uids",
    "load_blimp", "set_blimp_dir",
    "Pair", "Task", "TaskDataError", "load_jsonl", "normalise_field", "parse_jsonl",
    "drop_degenerate", "select_tasks", "subsample", "task_provenance",
]
