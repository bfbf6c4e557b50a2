r"""Table and plot of a local checkpoint series (validation perplexity and BLiMP accuracy per step).

  python launch/pretrain_report.py --runs=runs/pretrain/cpu_s,runs/pretrain/cpu_m,runs/pretrain/cpu_l \
      --out=results/pretrain_cpu

Writes series.md (the table), series.json and series.png into --out (lmgrad.pretrain.report).
"""

from __future__ import annotations

import sys

from absl import app, flags

from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.pretrain.report import write_report

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Pretraining workdirs (launch/pretrain.py --workdir), in order.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    command = "python launch/pretrain_report.py " + " ".join(a for a in sys.argv[1:] if a.startswith("--"))
    paths = write_report(FLAGS.runs, FLAGS.out, command=command)
    print(f"table: {paths['table']}\nplot: {paths['plot']}")


if __name__ == "__main__":
    app.run(main)
