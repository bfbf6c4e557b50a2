r"""The main job, end to end: scores → sketches → task space → report (lmgrad.jobs.pipeline).

  python launch/pipeline.py --config=configs/default.py --workdir=runs/default
  python launch/pipeline.py --config=configs/default.py:smoke --workdir=runs/smoke
  python launch/pipeline.py --config=configs/default.py --config.inputs.model=/ckpt/pythia-70m --workdir=...

The config is a `lmgrad.jobs.PipelineOptions` as a ConfigDict (sections inputs, evaluate, sketch,
task_space); any field can be overridden as --config.SECTION.FIELD=VALUE. Re-running with the same
WORKDIR reuses finished stages and resumes an interrupted sketch stage.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lmgrad import plan
from lmgrad.jobs import pipeline as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.schema import from_dict

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Pipeline config (get_config(arg) file).")
flags.DEFINE_string("workdir", None, "Run directory (unused with --dry_run).", required=True)
plan.define_flags()


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    options = from_dict(job.PipelineOptions, FLAGS.config.to_dict())
    if FLAGS.dry_run:  # the sketch stage is the pipeline's memory peak
        plan.dry_run("sketch", options.inputs, sketch=options.sketch, batch_size=options.sketch.batch_size)
        return
    job.run(options, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
