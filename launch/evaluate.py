r"""Scores minimal pairs: is log p(good) > log p(bad)?

  python launch/evaluate.py --model=smollm2 --tasks=blimp --max_pairs_per_task=20 --workdir=runs/eval

Writes WORKDIR/scores.jsonl (one record per pair) and WORKDIR/summary.json (accuracy per paradigm,
per linguistics_term, per field, overall; provenance). Flags are the fields of
`lmgrad.jobs.InputOptions` and `lmgrad.jobs.EvalOptions`.
"""

from __future__ import annotations

from absl import app, flags

from lmgrad import plan
from lmgrad.jobs import evaluate as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import define_flags, from_flags

FLAGS = flags.FLAGS
define_flags(InputOptions)
define_flags(job.EvalOptions)
flags.DEFINE_string("workdir", None, "Output directory (unused with --dry_run).", required=True)
plan.define_flags()


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    inputs, options = from_flags(InputOptions), from_flags(job.EvalOptions)
    if FLAGS.dry_run:
        plan.dry_run("evaluate", inputs, batch_size=options.batch_size)
        return
    summary = job.run(inputs, options, FLAGS.workdir)
    o = summary["overall"]
    print(f"accuracy {o['accuracy']:.3f} over {o['n_pairs']} pairs in {o['n_tasks']} tasks "
          f"({summary['timing']['sentences_per_s']:.1f} sentences/s); wrote {FLAGS.workdir}/summary.json")


if __name__ == "__main__":
    app.run(main)
