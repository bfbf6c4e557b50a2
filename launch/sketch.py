r"""Sketches the gradient differential ∇ℓ(good) − ∇ℓ(bad) of every minimal pair into a run store.

  python launch/sketch.py --model=smollm2 --tasks=blimp --max_pairs_per_task=10 \
      --method=exact --projector=sjlt --k=4096 --projection_seed=0 --workdir=runs/sketch [--resume]
  python launch/sketch.py --method=factored --r_in=16 --r_out=16 ...   # Kronecker-factored, per module
  python launch/sketch.py --model=/ckpt/pythia-12b --mesh=data:2,fsdp:4 ...  # parameters split over 4 devices
  python launch/sketch.py --model=llama-3-8b --mesh=fsdp:8 --dry_run --workdir=unused  # memory plan only

The store (`WORKDIR/manifest.json`, `WORKDIR/shards/`) loads back with `lmgrad.store.open(WORKDIR)`.
A killed run continues with `--resume` and ends with exactly the rows of an uninterrupted run.
Flags are the fields of `lmgrad.jobs.InputOptions` and `lmgrad.jobs.SketchOptions`, plus how to run.
"""

from __future__ import annotations

from absl import app, flags

from lmgrad import plan
from lmgrad.jobs import sketch as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import define_flags, from_flags

FLAGS = flags.FLAGS
define_flags(InputOptions)
define_flags(job.SketchOptions)
flags.DEFINE_integer("num_devices", None, "Local devices on the data axis (default: all).")
flags.DEFINE_bool("resume", False, "Continue a killed run in WORKDIR (its configuration must match).")
flags.DEFINE_integer("max_batches", None, "Stop after N batches (testing).")
flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize(); each process sketches "
                  "its share of the batches into WORKDIR/process-XXXXX/ (BUILD.md).")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0 (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "--distributed: this process's id (or JAX_PROCESS_ID).")
flags.DEFINE_string("workdir", None, "Run directory (unused with --dry_run).", required=True)
plan.define_flags()


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    inputs, options = from_flags(InputOptions), from_flags(job.SketchOptions)
    if FLAGS.dry_run:
        plan.dry_run("sketch", inputs, sketch=options, batch_size=options.batch_size, num_devices=FLAGS.num_devices)
        return
    if FLAGS.distributed:
        job.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    stats = job.run(inputs, options, FLAGS.workdir, resume=FLAGS.resume,
                    num_devices=FLAGS.num_devices, max_batches=FLAGS.max_batches)
    print(f"sketched {stats['pairs']} pairs at {stats['pairs_per_s']:.2f} pairs/s ({stats['method']}, "
          f"k={stats['k']}); store {stats['workdir']}: {stats['rows_total']} rows, complete={stats['complete']}")


if __name__ == "__main__":
    app.run(main)
