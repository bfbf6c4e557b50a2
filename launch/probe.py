r"""Transfer-based task spaces: tune on each task by FTGD, score every task's held-out pairs.

  python launch/probe.py --model=smollm2 --tasks=term:island_effects --max_pairs_per_task=16 \
      --top_p=0.05 --objective=logistic --optimizer=adam --learning_rate=1e-4 --steps=10 --workdir=runs/probe
  python launch/probe.py ... --target=wh_island      # also print the auxiliary-task ranking for one task
  python launch/probe.py --config=configs/probe.py:smoke --workdir=runs/probe_smoke

Writes WORKDIR/transfer.npz, stats.json, transfer.png, mask_overlap.png, first_order.png, report.md
(and WORKDIR/tuned/UID/ with --save_tuned). Flags are the fields of `lmgrad.jobs.InputOptions` and
`lmgrad.jobs.probe.ProbeOptions`; with --config, the config's sections (inputs, probe) are used
instead and --config.SECTION.FIELD=VALUE overrides them.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lmgrad import plan
from lmgrad.jobs import probe as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import define_flags, from_dict, from_flags

FLAGS = flags.FLAGS
define_flags(InputOptions)
define_flags(job.ProbeOptions)
config_flags.DEFINE_config_file("config", None, "Optional config file (configs/probe.py[:smoke]).",
                                lock_config=True)
flags.DEFINE_string("target", None, "Print the auxiliary-task ranking for this task uid.")
flags.DEFINE_string("workdir", None, "Output directory (unused with --dry_run).", required=True)
plan.define_flags()


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is not None:
        cfg = from_dict(job.ProbeJobOptions, FLAGS.config.to_dict())
        inputs, options = cfg.inputs, cfg.probe
    else:
        inputs, options = from_flags(InputOptions), from_flags(job.ProbeOptions)
    if FLAGS.dry_run:
        plan.dry_run("probe", inputs, batch_size=options.batch_size, optimizer=options.optimizer,
                     task_batch=options.task_batch, pack=options.pack)
        return
    result = job.run(inputs, options, FLAGS.workdir, target=FLAGS.target)
    f = result["summary"]["ftgd"]
    print(f"tuned {len(result['summary']['tasks'])} tasks: mean own Δ margin {f['mean_own_margin_gain']:.3f}, "
          f"median Δ neutral perplexity {f['median_perplexity_change']:+.2%}; report {FLAGS.workdir}/report.md")
    if result["summary"]["failed"]:
        print("failed: " + "; ".join(f"{k}: {v}" for k, v in result["summary"]["failed"].items()))
    if FLAGS.target:
        rk = result["ranking"]
        print(f"auxiliary tasks for {rk['target']} (best first):")
        for name, order in rk.items():
            if name != "target":
                print(f"  {name}: {', '.join(order)}")


if __name__ == "__main__":
    app.run(main)
