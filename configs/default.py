r"""The main job: BLiMP on SmolLM2-135M (embedded default) → scores, sketches, task space, report.

  python launch/pipeline.py --config=configs/default.py --workdir=runs/default
  python launch/pipeline.py --config=configs/default.py:smoke --workdir=runs/smoke   # seconds-scale

Arguments after ':' select a variant: `smoke` shrinks everything (a handful of tasks and pairs).
"""

from __future__ import annotations

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "smollm2"  # HF dir, hub id[@revision], .gguf file, or 'smollm2'
    c.dtype = "float32"
    c.tasks = "blimp"  # see lmgrad.tasks.select_tasks
    c.max_pairs_per_task = 12
    c.seed = 0  # pair sample
    c.bos = "auto"

    c.evaluate = ml_collections.ConfigDict(dict(enabled=True, batch_size=32))

    c.sketch = ml_collections.ConfigDict()
    c.sketch.method = "factored"  # factored (Kronecker, per module) | exact (vmap(grad) + projector)
    c.sketch.projector = "sjlt"  # exact path: identity | gaussian | rademacher | sjlt (set k > 0)
    # Exact path: sketch size. Factored path: optional global sparse-JL stage (0 = off, keeping one
    # block per module so the task space can be read per layer and per module type).
    c.sketch.k = 0
    # Ranks from bench/README.md "Factored sketch fidelity": pair-cosine Pearson 0.975 vs exact, K=100,352 (r=16: 0.85)
    c.sketch.r_in = 8  # factored path: per-module projection sizes (block = r_out · r_in)
    c.sketch.r_out = 16
    # ((module type | HF-name pattern, r_in, r_out), ...), first match wins. Ranks go where the
    # gradient norm is (bench/README.md, "Factored sketch fidelity"). The two name patterns are
    # Llama-family names; other families fall back to (r_in, r_out) for those modules.
    c.sketch.overrides = (("*.v_proj.weight", 8, 128), ("*.down_proj.weight", 8, 128),
                          ("embed", 16, 256), ("norm", 8, 256))
    c.sketch.seed = 0
    c.sketch.include = ()  # HF-name patterns; empty = all parameters
    c.sketch.exclude = ()
    c.sketch.from_first_difference = False
    c.sketch.batch_size = 16
    c.sketch.chunk_size = 4  # exact path: examples per vmap micro-batch (bounds memory)
    c.sketch.shard_rows = 256

    c.task_space = ml_collections.ConfigDict(
        dict(hypothesis="linguistics_term", similarity="cosine", n_boot=200, n_perm=2000, seed=0,
             # Sketch a second time with this projection seed and report how well the two task
             # spaces agree (None: skip; it doubles the sketching time).
             check_seed=1)
    )

    if arg == "smoke":
        c.tasks = "blimp:anaphor_gender_agreement,anaphor_number_agreement,npi_present_1,npi_present_2,wh_island,adjunct_island"
        c.max_pairs_per_task = 4
        c.sketch.shard_rows = 8
        c.task_space.n_boot = 20
        c.task_space.n_perm = 200
    elif arg not in (None, ""):
        raise ValueError(f"unknown config variant {arg!r}; known: smoke")
    return c
