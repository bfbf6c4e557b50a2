r"""A sweep over model sizes and checkpoints, then the cross-run analysis (lmgrad.jobs.sweep).

  python -m launch.sweep --config=configs/sweep.py:cpu_sizes --workdir=runs/sweep_cpu_sizes
  python -m launch.sweep --config=configs/sweep.py:cpu_steps --workdir=runs/sweep_cpu_steps
  python launch/sweep.py --config=configs/sweep.py:real --workdir=runs/sweep_real
  python launch/sweep.py --config=configs/sweep.py:cpu_steps --config.pretrain_root=/data/pretrain --workdir=...

The config is a `lmgrad.jobs.sweep.SweepOptions` as a ConfigDict: runs, series (pretrain workdirs
expanded into one run per selected step), the `pipeline` options every run shares, and
`cross_run`; fields are overridable as --config.FIELD=VALUE (--config.pipeline.SECTION.FIELD=...).
Outputs: WORKDIR/runs/<run>/ (a pipeline workdir each), WORKDIR/cross_run/ (report.md, stats.json,
figures), WORKDIR/sweep.json. Re-running skips finished runs and resumes an interrupted one.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lmgrad.jobs import sweep as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.schema import from_dict

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sweep.py:cpu_sizes", "Sweep config (get_config(arg) file).")
flags.DEFINE_string("workdir", None, "Sweep directory.", required=True)
flags.DEFINE_bool("progress", True, "Progress bars.")


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    job.run(from_dict(job.SweepOptions, FLAGS.config.to_dict()), FLAGS.workdir, progress=FLAGS.progress)


if __name__ == "__main__":
    app.run(main)
