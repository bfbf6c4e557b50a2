r"""Sketches the gradient differential ∇ℓ(good) − ∇ℓ(bad) of every minimal pair into a run store.

  python launch/sketch.py --model=smollm2 --tasks=blimp --max_pairs_per_task=10 \
      --projector=sjlt --k=4096 --seed=0 --workdir=runs/sketch [--resume]
  python launch/sketch.py --method=factored --r_in=16 --r_out=16 ...   # Kronecker-factored, per module

The store (`WORKDIR/manifest.json`, `WORKDIR/shards/`) loads back with `lmgrad.store.open(WORKDIR)`.
A killed run continues with `--resume` and ends with exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
# Above this size the exact path's per-example gradient (one parameter-sized copy per example in a
# chunk) dominates time and memory; the factored path was 4.4x faster at flat memory on a
# GPT-2-small shape (bench/results/factored.jsonl). Below it, exact sketches are cheap and exact.
AUTO_FACTORED_PARAMS = 50_000_000
flags.DEFINE_string("model", "smollm2", "Model spec: HF dir, hub id[@revision], .gguf file, or 'smollm2'.")
flags.DEFINE_string("tasks", "blimp", "Task selector (see lmgrad.tasks.select_tasks).")
flags.DEFINE_integer("max_pairs_per_task", None, "Seeded sample of at most N pairs per task.")
flags.DEFINE_integer("pair_seed", 0, "Seed of the pair sample.")
flags.DEFINE_enum("method", "auto", ["auto", "exact", "factored"],
                  "exact: vmap(grad) + --projector; factored: Kronecker per linear layer; auto: factored "
                  f"for models above {AUTO_FACTORED_PARAMS // 10**6}M parameters (bench/README.md), else exact.")
flags.DEFINE_string("projector", "sjlt", "identity, gaussian, rademacher, sjlt (exact path), or factored "
                    "(same as --method=factored).")
flags.DEFINE_integer("k", None, "Sketch size. Exact path: default 4096. Factored path: width of an optional "
                     "global sparse-JL stage over the module blocks (default 0 = off, one block per module).")
flags.DEFINE_integer("r_in", 8, "Factored path: input-side projection size per module.")
flags.DEFINE_integer("r_out", 16, "Factored path: output-side projection size per module.")
flags.DEFINE_list("r_override", ["*.v_proj.weight:8:128", "*.down_proj.weight:8:128", "embed:16:256", "norm:8:256"], "Factored path: TYPE_OR_PATTERN:R_IN:R_OUT entries (types: embed, head, "
                  "attn, mlp, norm, other), first match wins.")
flags.DEFINE_integer("seed", 0, "Projection seed: same seed, same projection on any device count.")
flags.DEFINE_list("include", [], "HF parameter-name patterns to differentiate (glob, or re:REGEX).")
flags.DEFINE_list("exclude", [], "HF parameter-name patterns to leave out.")
flags.DEFINE_bool("from_first_difference", False, "Score tokens only from the first differing token.")
flags.DEFINE_integer("batch_size", 16, "Pairs per batch.")
flags.DEFINE_integer("chunk_size", 4, "Exact path: examples per vmap micro-batch (bounds memory).")
flags.DEFINE_integer("shard_rows", 256, "Rows per store shard (committed atomically).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model compute dtype.")
flags.DEFINE_enum("store_dtype", "float32", ["float32", "bfloat16"], "Stored row dtype.")
flags.DEFINE_string("bos", "auto", "Token prepended to each sentence: auto, none, or a token.")
flags.DEFINE_integer("num_devices", None, "Local devices on the data axis (default: all).")
flags.DEFINE_bool("resume", False, "Continue a killed run in WORKDIR (its configuration must match).")
flags.DEFINE_integer("max_batches", None, "Stop after N batches (testing).")
flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize(); each process sketches "
                  "its share of the batches into WORKDIR/process-XXXXX/ (BUILD.md).")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "--distributed: this process's id (or JAX_PROCESS_ID).")
flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def _overrides(entries: list[str]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for e in entries:
        key, _, rest = e.rpartition(":")
        key, _, r_in = key.rpartition(":")
        if not key or not r_in.isdigit() or not rest.isdigit():
            raise app.UsageError(f"--r_override entry {e!r}: expected TYPE_OR_PATTERN:R_IN:R_OUT")
        out.append((key, int(r_in), int(rest)))
    return tuple(out)


def main(argv: list[str]) -> None:
    del argv
    import jax
    from tqdm import tqdm

    from lmgrad.models import load_model
    from lmgrad.sketch_run import SketchOptions, run_sketch
    from lmgrad.tasks import select_tasks

    if FLAGS.distributed:
        # Explicit values where given (flags or JAX_* variables); else jax detects TPU/SLURM/MPI.
        env = os.environ
        nproc = FLAGS.num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
        pid = FLAGS.process_id if FLAGS.process_id is not None else (
            int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address
                                   or env.get("JAX_COORDINATOR_ADDRESS"), num_processes=nproc, process_id=pid)
    tasks = select_tasks(FLAGS.tasks, max_pairs_per_task=FLAGS.max_pairs_per_task, seed=FLAGS.pair_seed)
    n = sum(len(t) for t in tasks)
    logging.info("%d tasks, %d pairs; loading %s", len(tasks), n, FLAGS.model)
    model = load_model(FLAGS.model, dtype=FLAGS.dtype)
    method, projector = FLAGS.method, FLAGS.projector
    if projector == "factored":
        method, projector = "factored", "sjlt"
    elif method == "auto":
        method = "factored" if model.provenance["num_params"] > AUTO_FACTORED_PARAMS else "exact"
    logging.info("sketch method: %s", method)
    k = FLAGS.k if FLAGS.k is not None else (4096 if method == "exact" else 0)
    opts = SketchOptions(method=method, projector=projector, k=k, seed=FLAGS.seed,
                         include=tuple(FLAGS.include), exclude=tuple(FLAGS.exclude),
                         from_first_difference=FLAGS.from_first_difference, r_in=FLAGS.r_in,
                         r_out=FLAGS.r_out, bos=FLAGS.bos, overrides=_overrides(FLAGS.r_override), dtype=FLAGS.store_dtype)
    with tqdm(total=n, unit="pair", desc="sketching") as bar:
        stats = run_sketch(model, tasks, FLAGS.workdir, opts, batch_size=FLAGS.batch_size,
                           chunk_size=FLAGS.chunk_size, shard_rows=FLAGS.shard_rows, resume=FLAGS.resume,
                           num_devices=FLAGS.num_devices, progress=bar.update, max_batches=FLAGS.max_batches,
                           process_index=jax.process_index(), process_count=jax.process_count())
    logging.info("sketch stats: %s", stats)
    print(f"sketched {stats['pairs']} pairs at {stats['pairs_per_s']:.2f} pairs/s (k={stats['k']}); "
          f"store {stats['workdir']}: {stats['rows_total']} rows, complete={stats['complete']}")


if __name__ == "__main__":
    app.run(main)
