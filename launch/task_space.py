r"""Task space of a sketch store, tested against a linguistic hypothesis.

  python launch/task_space.py --store=runs/gpt2_blimp --hypothesis=linguistics_term \
      --workdir=runs/gpt2_blimp/task_space [--similarity=cosine] [--n_boot=200] \
      [--n_perm=1000] [--resample_seed=0] [--store_b=runs/gpt2_blimp_seed1]

Writes task_space.npz, stats.json, heatmap.png, layers.png, hypothesis.png and report.md into
--workdir. --hypothesis is a taxonomy column of the store's meta (linguistics_term, field) or a
file (.json {task: category}, .csv / .npz square matrix); --store_b is a second store over the
same tasks (another projection seed, or the identity projector) for the sketch-error check.
Flags are the fields of `lmgrad.jobs.TaskSpaceOptions`, plus the stores and the output directory.
"""

from __future__ import annotations

from absl import app, flags

from lmgrad.jobs import task_space as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.schema import define_flags, from_flags

FLAGS = flags.FLAGS
define_flags(job.TaskSpaceOptions)
flags.DEFINE_string("store", None, "Sketch store directory (lmgrad.store run dir).", required=True)
flags.DEFINE_string("store_b", None, "Second store over the same tasks: sketch-error check.")
flags.DEFINE_string("workdir", None, "Output directory for the task-space files.", required=True)


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = job.run(from_flags(job.TaskSpaceOptions), FLAGS.store, FLAGS.workdir, store_b=FLAGS.store_b)
    print(f"report: {paths['report']}")


if __name__ == "__main__":
    app.run(main)
