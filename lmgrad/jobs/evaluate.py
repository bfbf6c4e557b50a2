"""The evaluate stage: is log p(good) > log p(bad) for each minimal pair?

`evaluate` returns per-pair records and a summary (accuracy per UID, per linguistics_term, per
field, overall) with the model and task provenance; `run` writes them as `scores.jsonl` and
`summary.json` into a workdir (what `launch/evaluate.py` and the pipeline call).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np

from lmgrad import io as lio
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import option, to_dict
from lmgrad.models.loading import LoadedModel
from lmgrad.provenance import run_info
from lmgrad.scoring import score_sequences
from lmgrad.tasks import Task, bos_id, encode_pairs, task_provenance

SCORES = "scores.jsonl"
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How the evaluate stage scores sentences."""

    batch_size: int = option(32, "Sentences per batch.")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _accuracy(groups: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
    return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def evaluate(
    model: LoadedModel,
    tasks: Sequence[Task],
    *,
    batch_size: int = 32,
    bos: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Scores every pair of `tasks`; returns (records, summary).

    Each record: UID, pairID, field, linguistics_term, logprob_good, logprob_bad, correct.
    Ties (identical sentences, which BLiMP has a few of) count as incorrect, as in the BLiMP paper's
    strict comparison.
    """
    if model.tokenizer is None:
        raise ValueError(f"{model.spec}: model was loaded without a tokenizer")
    pairs = [p for t in tasks for p in t.pairs]
    good, bad, _, _ = encode_pairs(model.tokenizer, pairs, bos=bos, max_length=model.max_length)
    t0 = time.perf_counter()
    lp = score_sequences(model, good + bad, batch_size=batch_size, progress=progress)
    elapsed = time.perf_counter() - t0
    lp_good, lp_bad = lp[: len(pairs)], lp[len(pairs):]
    records = []
    by_uid: dict[str, list[bool]] = collections.defaultdict(list)
    by_term: dict[str, list[bool]] = collections.defaultdict(list)
    by_field: dict[str, list[bool]] = collections.defaultdict(list)
    for p, g, b in zip(pairs, lp_good, lp_bad):
        correct = bool(g > b)
        records.append({
            "UID": p.UID, "pairID": p.pairID, "field": p.field, "linguistics_term": p.linguistics_term,
            "logprob_good": float(g), "logprob_bad": float(b), "correct": correct,
        })
        by_uid[p.UID].append(correct)
        by_term[str(p.linguistics_term)].append(correct)
        by_field[str(p.field)].append(correct)
    per_uid = _accuracy(by_uid)
    summary = {
        "overall": {
            "accuracy": float(np.mean([r["correct"] for r in records])),
            "macro_accuracy_over_uids": float(np.mean([v["accuracy"] for v in per_uid.values()])),
            "n_pairs": len(records),
            "n_tasks": len(per_uid),
        },
        "per_uid": per_uid,
        "per_linguistics_term": _accuracy(by_term),
        "per_field": _accuracy(by_field),
        "timing": {"sentences": 2 * len(pairs), "seconds": elapsed,
                   "sentences_per_s": 2 * len(pairs) / max(elapsed, 1e-9)},
        "scoring": {"method": "sum of token log-probs (full sentence)", "bos": bos,
                    "bos_token": _bos_token(model, bos), "batch_size": batch_size},
        "model": model.provenance,
        "tasks": task_provenance(tasks),
        "run": run_info(),
    }
    return records, summary


def _bos_token(model: LoadedModel, bos: str) -> str | None:
    i = bos_id(model.tokenizer, bos)
    return None if i is None else model.tokenizer.convert_ids_to_tokens(i)


def run(inputs: InputOptions, options: EvalOptions, workdir: str | pathlib.Path, *,
        model: LoadedModel | None = None, tasks: Sequence[Task] | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Scores the pairs `inputs` select; writes `scores.jsonl` and `summary.json` into `workdir`
    (atomically) and returns the summary. `model`/`tasks` reuse ones already loaded."""
    from tqdm import tqdm

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = inputs.select_tasks() if tasks is None else tasks
    # With an fsdp mesh the parameters arrive in their shards and jit partitions the forward by them.
    model = inputs.load_model(inputs.make_mesh()) if model is None else model
    n_pairs = sum(len(t) for t in tasks)
    with tqdm(total=2 * n_pairs, unit="sent", desc="scoring", disable=not progress) as bar:
        records, summary = evaluate(model, tasks, batch_size=options.batch_size, bos=inputs.bos,
                                    progress=bar.update)
    summary["options"] = {"inputs": to_dict(inputs), "evaluate": to_dict(options)}
    lio.write_jsonl(workdir / SCORES, records)
    lio.write_json(workdir / SUMMARY, summary)
    return summary
