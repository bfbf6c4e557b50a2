"""Task space of a sketch store, tested against a linguistic hypothesis.

    python launch/task_space.py --store=runs/gpt2_blimp --hypothesis=linguistics_term \
        --workdir=runs/gpt2_blimp/task_space [--similarity=cosine] [--n_boot=200] \
        [--n_perm=1000] [--seed=0] [--store_b=runs/gpt2_blimp_seed1]

Writes task_space.npz, stats.json, heatmap.png, layers.png, hypothesis.png and report.md into
--workdir. --hypothesis is a taxonomy column of the store's meta (linguistics_term, field) or a
file (.json {task: category}, .csv / .npz square matrix); --store_b is a second store over the
same tasks (another projector seed, or the identity projector) for the sketch-error check.
"""
from __future__ import annotations

import os
import sys
from absl import app, flags

try:
    import lmgrad  # noqa: F401  (is lmgrad importable?)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmgrad.analysis.job import run_task_space  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "Sketch store directory (lmgrad.store run dir).")
flags.DEFINE_string("workdir", None, "Output directory for the task-space files.")
flags.DEFINE_string("hypothesis", "linguistics_term",
                    "Taxonomy column (linguistics_term, field) or a hypothesis file path.")
flags.DEFINE_enum("similarity", "cosine", ["cosine", "pearson"], "Similarity of task means.")
flags.DEFINE_enum("group_by", "layer", ["layer", "module_type", "block"],
                  "How per-module sketch blocks are grouped for the per-group view.")
flags.DEFINE_integer("n_boot", 200, "Bootstrap resamples for per-entry CIs.")
flags.DEFINE_enum("ci_method", "percentile", ["percentile", "bc"],
                  "Bootstrap interval: plain percentile or bias-corrected percentile.")
flags.DEFINE_integer("n_perm", 1000, "Permutations for Mantel / within-between / ARI tests.")
flags.DEFINE_integer("n_splits", 20, "Random split-halves for the reliability estimate.")
flags.DEFINE_integer("seed", 0, "Seed for every resampling step.")
flags.DEFINE_string("store_b", None, "Second store over the same tasks: sketch-error check.")
flags.DEFINE_string("task_column", "UID", "Meta column naming the task of each pair.")
flags.DEFINE_bool("allow_incomplete", False, "Analyse a store whose run has not finished.")
flags.DEFINE_enum("nonfinite", "raise", ["raise", "drop"],
                  "Rows with NaN/inf: raise (default, naming them) or drop with a warning.")
flags.mark_flags_as_required(["store", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths = run_task_space(FLAGS.store, FLAGS.workdir, FLAGS.hypothesis,
                           similarity=FLAGS.similarity, group_by=FLAGS.group_by,
                           n_boot=FLAGS.n_boot, n_perm=FLAGS.n_perm, n_splits=FLAGS.n_splits,
                           seed=FLAGS.seed, ci_method=FLAGS.ci_method, store_b=FLAGS.store_b, task_column=FLAGS.task_column,
                           allow_incomplete=FLAGS.allow_incomplete, nonfinite=FLAGS.nonfinite)
    print(f"report: {paths['report']}")


if __name__ == "__main__":
    app.run(main)
