"""The main job, end to end: scores → sketches (→ a second projection seed) → task space → report.

Outputs in a workdir: `eval/{scores.jsonl,summary.json}` (the evaluate stage), `sketches/` (a run
store), `sketches_seedN/` (the same pairs with projection seed N, for the sketch-error check;
`check_seed=None` skips it), `task_space/` (task_space.npz, stats.json, figures, report.md) and
`pipeline.json` (options, stage timings, paths). Running again with the same workdir reuses
finished stages and resumes an interrupted sketch stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

from lmgrad import io as lio
from lmgrad import store as lstore
from lmgrad.jobs import evaluate as evaluate_job
from lmgrad.jobs import sketch as sketch_job
from lmgrad.jobs import task_space as task_space_job
from lmgrad.jobs.evaluate import EvalOptions
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import nested, option, to_dict
from lmgrad.jobs.sketch import SketchOptions
from lmgrad.jobs.task_space import TaskSpaceOptions

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Every stage's options, and which stages run."""

    inputs: InputOptions = nested(InputOptions, "Model and pair sample.")
    run_evaluate: bool = option(True, "Score every pair (eval/) before sketching.")
    evaluate: EvalOptions = nested(EvalOptions, "Evaluate stage.")
    sketch: SketchOptions = nested(SketchOptions, "Sketch stage.")
    # Sketch a second time with this projection seed and report how well the two task spaces
    # agree: whether the sketch is large enough (None: skip; it doubles the sketching time).
    check_seed: int | None = option(1, "Projection seed of the sketch-error check (None: skip).")
    task_space: TaskSpaceOptions = nested(TaskSpaceOptions, "Task-space stage.")

    def __post_init__(self) -> None:
        if self.check_seed is not None and self.check_seed == self.sketch.projection_seed:
            raise ValueError(f"check_seed ({self.check_seed}) must differ from sketch.projection_seed")


def _store_complete(path: pathlib.Path) -> bool:
    return (path / "manifest.json").exists() and lstore.open(path, verify=False).complete


def _say(msg: str) -> None:
    print(f"[lmgrad] {msg}", flush=True)


def run(options: PipelineOptions, workdir: str | os.PathLike, *, progress: bool = True,
        model: Any = None) -> dict[str, Any]:
    """Runs the stages into `workdir`, reusing finished ones; returns what `pipeline.json` holds.
    `model`: the `LoadedModel` of `options.inputs.model`, already loaded (a sweep reuses one object
    per architecture so that its compiled scorer serves every checkpoint)."""
    o = options
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    tasks = o.inputs.select_tasks()
    n_pairs = sum(len(t) for t in tasks)
    _say(f"{len(tasks)} tasks, {n_pairs} pairs; model {o.inputs.model}")
    t = time.perf_counter()
    if model is None:  # with an fsdp mesh, read the weights straight into their shards
        model = o.inputs.load_model(o.inputs.make_mesh() if o.inputs.mesh else None)
    timings["load_model"] = time.perf_counter() - t

    eval_dir = work / "eval"
    summary_path = eval_dir / evaluate_job.SUMMARY
    if o.run_evaluate and not summary_path.exists():
        t = time.perf_counter()
        evaluate_job.run(o.inputs, o.evaluate, eval_dir, model=model, tasks=tasks, progress=progress)
        timings["evaluate"] = time.perf_counter() - t
    if summary_path.exists():
        acc = json.loads(summary_path.read_text())["overall"]["accuracy"]
        _say(f"BLiMP accuracy {acc:.3f} ({summary_path})")

    def sketch_stage(store: pathlib.Path, sketch: SketchOptions, label: str) -> None:
        if _store_complete(store):
            return
        t = time.perf_counter()
        stats = sketch_job.run(o.inputs, sketch, store, resume=(store / "manifest.json").exists(), model=model,
                               tasks=tasks, progress=progress, desc=f"{label} sketching")
        timings[f"sketch:{store.name}"] = time.perf_counter() - t
        _say(f"sketched {stats['pairs']} pairs at {stats['pairs_per_s']:.2f} pairs/s, k={stats['k']} ({store})")

    sketch_dir = work / "sketches"
    sketch_stage(sketch_dir, o.sketch, "2/3")
    store_b = None
    if o.check_seed is not None:
        store_b = work / f"sketches_seed{o.check_seed}"
        sketch_stage(store_b, dataclasses.replace(o.sketch, projection_seed=o.check_seed), "2b/3")

    t = time.perf_counter()
    paths = task_space_job.run(o.task_space, sketch_dir, work / "task_space", store_b=store_b)
    timings["task_space"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    record = {"options": to_dict(o), "timings_s": timings, "outputs": {k: str(v) for k, v in paths.items()},
              "eval": str(summary_path), "store": str(sketch_dir)}
    lio.write_json(work / "pipeline.json", record, default=str)
    log.info("timings: %s", timings)
    _say(f"done in {timings['total']:.0f} s. Report: {paths['report']}")
    return record
