r"""The probe job: a transfer-based task space of BLiMP on SmolLM2-135M by FTGD.

  python launch/probe.py --config=configs/probe.py --workdir=results/probe
  python launch/probe.py --config=configs/probe.py:smoke --workdir=runs/probe_smoke --config.inputs.model=DIR

`smoke` shrinks everything (4 tasks, few pairs and steps). Every default lives on
`lmgrad.jobs.InputOptions` / `lmgrad.jobs.probe.ProbeOptions`; this file states only what differs.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.probe import ProbeJobOptions, ProbeOptions
from lmgrad.jobs.schema import to_config

# Two paradigms for each of three linguistics_terms (6 tasks), sized so the job finishes in well under
# an hour on 2 CPU cores (timing in results/probe/README.md). Tasks are tuned one at a time with one
# compiled step: on CPU a vmapped group is no faster (bench/results/transfer.jsonl); on an
# accelerator raise task_batch, and widen TASKS (e.g. two paradigms per term for all 13 terms).
TASKS = ("blimp:anaphor_gender_agreement,anaphor_number_agreement,"
         "determiner_noun_agreement_1,determiner_noun_agreement_2,"
         "wh_questions_object_gap,wh_questions_subject_gap")
SMOKE_TASKS = "blimp:anaphor_gender_agreement,anaphor_number_agreement,passive_1,passive_2"


def options(arg: str | None = None) -> ProbeJobOptions:
    inputs = InputOptions(model="smollm2", tasks=TASKS, max_pairs_per_task=14)
    probe = ProbeOptions(held_out=6, steps=4, batch_size=8, learning_rate=1e-4, task_batch=1,
                         neutral_sentences=24, n_perm=719, first_order_lrs=(1e-3,))
    if arg == "smoke":
        return ProbeJobOptions(
            dataclasses.replace(inputs, tasks=SMOKE_TASKS, max_pairs_per_task=6),
            dataclasses.replace(probe, held_out=2, steps=2, batch_size=4, neutral_sentences=8, n_perm=50,
                                first_order_lrs=(1e-3,)))
    if arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return ProbeJobOptions(inputs, probe)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return to_config(options(arg))
