r"""The main job: BLiMP on SmolLM2-135M (embedded default) → scores, sketches, task space, report.

  python launch/pipeline.py --config=configs/default.py --workdir=runs/default
  python launch/pipeline.py --config=configs/default.py:smoke --workdir=runs/smoke   # seconds-scale

Arguments after ':' select a variant: `smoke` shrinks everything (a handful of tasks and pairs).
Every default lives on the options dataclasses (`lmgrad.jobs`); this file states only the choices
of the main job that differ from them.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from lmgrad.jobs import InputOptions, PipelineOptions, SketchOptions, TaskSpaceOptions
from lmgrad.jobs.schema import to_config

SMOKE_TASKS = ("blimp:anaphor_gender_agreement,anaphor_number_agreement,npi_present_1,npi_present_2,"
               "wh_island,adjunct_island")


def options(arg: str | None = None) -> PipelineOptions:
    """The main job's options (`arg`: None or 'smoke')."""
    opts = PipelineOptions(
        inputs=InputOptions(model="smollm2", max_pairs_per_task=12),
        # Factored (Kronecker, per module) so the task space can be read per layer and module type.
        sketch=SketchOptions(method="factored"),
        task_space=TaskSpaceOptions(n_perm=2000),
    )
    if arg == "smoke":
        return dataclasses.replace(
            opts,
            inputs=dataclasses.replace(opts.inputs, tasks=SMOKE_TASKS, max_pairs_per_task=4),
            sketch=dataclasses.replace(opts.sketch, shard_rows=8),
            task_space=dataclasses.replace(opts.task_space, n_boot=20, n_perm=200),
        )
    if arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return opts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return to_config(options(arg))
