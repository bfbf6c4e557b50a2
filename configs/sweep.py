r"""Sweeps over model sizes and pre-training checkpoints, with the cross-run analysis.

  python -m launch.sweep --config=configs/sweep.py:cpu_sizes --workdir=runs/sweep/cpu_sizes
  python -m launch.sweep --config=configs/sweep.py:cpu_steps --workdir=runs/sweep/cpu_steps
  python -m launch.sweep --config=configs/sweep.py:real      --workdir=runs/sweep/real
  python -m launch.sweep --config=configs/sweep.py:hub_zoo   --workdir=runs/sweep/hub_zoo   # needs a hub
  python -m launch.sweep --config=configs/sweep.py:smoke --config.pretrain_root=DIR --workdir=...

* `cpu_sizes` (default): the local CPU series (configs/pretrain.py: cpu_s, cpu_m, cpu_l, 0.26M–2.7M
  parameters) at their last step. The series live under `pretrain_root` (default
  $LMGRAD_PRETRAIN_ROOT, else runs/pretrain).
* `cpu_steps`: each local size at 7 log-spaced checkpoints (0 … 600; configs/pretrain.py exports
  0, 1, 2, 4, …, 512, 600).
  Both cpu_* variants: all 67 BLiMP paradigms at 24 pairs each (the models are tiny, so more pairs
  are cheap and tighten every interval), factored sketches, no second projection seed, 500
  permutations.
* `real`: the three GGUF models (SmolLM2-135M, Gemma-3-270M, Qwen2.5-Coder-0.5B) at 12 pairs per
  paradigm, as configs/default.py.
* `hub_zoo`: Pythia 14M…12B (final, and 70M/410M/1.4B over steps), GPT-2 small…XL, SmolLM2,
  Qwen2.5, Llama-3.2, Gemma-3 from the Hugging Face hub, for users with a hub and an accelerator.
* `smoke`: every step of the series `tiny` under `pretrain_root`, 6 paradigms × 8 pairs; the tests
  build such a tiny checkpoint series and run it.

Every default lives on the options dataclasses (`lmgrad.jobs`); this file states only what differs.
"""

from __future__ import annotations

import ml_collections

from lmgrad.jobs import InputOptions, PipelineOptions, SketchOptions, TaskSpaceOptions
from lmgrad.jobs.schema import to_config
from lmgrad.jobs.sweep import CrossRunOptions, RunSpec, SweepOptions

CPU_SERIES = ("cpu_s", "cpu_m", "cpu_l")
SMOKE_TASKS = ("blimp:anaphor_gender_agreement,anaphor_number_agreement,npi_present_1,npi_present_2,"
               "wh_island,adjunct_island")
REAL = (RunSpec(name="smollm2-135m", model="smollm2", size="smollm2-135m"),
        RunSpec(name="gemma3-270m", model="gemma3-270m", size="gemma3-270m"),
        RunSpec(name="qwen2.5-coder-0.5b", model="qwen2.5-coder-0.5b", size="qwen2.5-coder-0.5b"))
PYTHIA = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
PYTHIA_STEPS = (0, 512, 4000, 16000, 64000, 143000)
HUB = (("gpt2", "openai-community/gpt2"), ("gpt2-medium", "openai-community/gpt2-medium"),
       ("gpt2-large", "openai-community/gpt2-large"), ("gpt2-xl", "openai-community/gpt2-xl"),
       ("smollm2-135m-hf", "HuggingFaceTB/SmolLM2-135M"), ("smollm2-360m", "HuggingFaceTB/SmolLM2-360M"),
       ("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B"), ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
       ("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B"), ("qwen2.5-3b", "Qwen/Qwen2.5-3B"),
       ("llama3.2-1b", "meta-llama/Llama-3.2-1B"), ("llama3.2-3b", "meta-llama/Llama-3.2-3B"),
       ("gemma3-270m-hf", "google/gemma-3-270m"), ("gemma3-1b", "google/gemma-3-1b-pt"))


def _hub_zoo() -> tuple[RunSpec, ...]:
    runs = [RunSpec(name=f"pythia-{s}", model=f"EleutherAI/pythia-{s}", size=f"pythia-{s}") for s in PYTHIA
            if s not in ("70m", "410m", "1.4b")]
    for s in ("70m", "410m", "1.4b"):  # series over pre-training (revisions stepN on the hub)
        runs += [RunSpec(name=f"pythia-{s}@step{t}", model=f"EleutherAI/pythia-{s}@step{t}",
                         size=f"pythia-{s}", step=t) for t in PYTHIA_STEPS]
    runs += [RunSpec(name=n, model=m, size=n) for n, m in HUB]
    return tuple(runs)


def _cpu_pipeline() -> PipelineOptions:
    return PipelineOptions(inputs=InputOptions(model="", max_pairs_per_task=24),
                           sketch=SketchOptions(method="factored"), check_seed=None,
                           task_space=TaskSpaceOptions(n_perm=500, n_boot=100))


def options(arg: str | None = None) -> SweepOptions:
    """`arg`: cpu_sizes (default), cpu_steps, real, hub_zoo or smoke."""
    name = arg or "cpu_sizes"
    if name == "cpu_sizes":
        return SweepOptions(series=CPU_SERIES, series_steps="last", pipeline=_cpu_pipeline())
    if name == "cpu_steps":
        return SweepOptions(series=CPU_SERIES, series_steps="log:7", pipeline=_cpu_pipeline())
    real = PipelineOptions(inputs=InputOptions(model="", max_pairs_per_task=12),
                           sketch=SketchOptions(method="factored"), check_seed=None,
                           task_space=TaskSpaceOptions(n_perm=2000))
    if name == "real":
        return SweepOptions(runs=REAL, pipeline=real)
    if name == "hub_zoo":
        return SweepOptions(runs=_hub_zoo(), pipeline=real)
    if name == "smoke":
        pipe = PipelineOptions(
            inputs=InputOptions(model="", tasks=SMOKE_TASKS, max_pairs_per_task=8),
            sketch=SketchOptions(method="factored", r_in=4, r_out=4, overrides=(), batch_size=16, shard_rows=8),
            check_seed=None,
            task_space=TaskSpaceOptions(n_perm=50, n_boot=20, n_splits=4, robustness=False))
        return SweepOptions(series=("tiny",), series_steps="all", pipeline=pipe,
                            cross_run=CrossRunOptions(n_boot=50, n_splits=4))
    raise ValueError(f"unknown config variant {arg!r}; known: cpu_sizes, cpu_steps, real, hub_zoo, smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return to_config(options(arg))
