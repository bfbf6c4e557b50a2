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
from collections.abc import Mapping
from typing import Any

from absl import app, flags, logging

try:
    import lmgrad  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from lmgrad import analysis  # noqa: E402
from lmgrad import store as lstore  # noqa: E402

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


def _open(path: str, allow_incomplete: bool) -> Any:
    st = lstore.open(path)
    if not st.complete:
        if not allow_incomplete:
            raise ValueError(f"{path}: store is incomplete ({len(st)} of {st.total_rows} rows); "
                             "finish the run or pass --allow_incomplete")
        logging.warning("%s: analysing an incomplete store (%d rows)", path, len(st))
    return st


def _tasks(st: Any, path: str, column: str) -> np.ndarray:
    if column not in st.meta:
        raise ValueError(f"{path}: meta has no {column!r} column (have {sorted(st.meta)})")
    return np.asarray(st.meta[column]).astype(str)


def run_task_space(store: str, workdir: str, hypothesis: str = "linguistics_term", *,
                   similarity: str = "cosine", group_by: str = "layer", n_boot: int = 200,
                   n_perm: int = 1000, n_splits: int = 20, seed: int = 0,
                   ci_method: str = "percentile", store_b: str | None = None, task_column: str = "UID",
                   allow_incomplete: bool = False, nonfinite: str = "raise") -> Mapping[str, str]:
    """Open the store(s), analyse, write every output; returns ``{kind: path}``."""
    st = _open(store, allow_incomplete)
    sketches, tasks = analysis.check_sketches(st.sketches, _tasks(st, store, task_column),
                                              nonfinite=nonfinite)
    names = np.unique(tasks)
    meta = {k: np.asarray(v) for k, v in st.meta.items()}
    if nonfinite == "drop":  # keep meta aligned with the surviving rows
        keep = np.isfinite(np.asarray(st.sketches)).all(axis=1)
        meta = {k: v[keep] for k, v in meta.items()}
    try:
        taxonomy = analysis.taxonomy_from_meta(meta, task_column)
    except ValueError:
        if hypothesis in ("linguistics_term", "field"):
            raise
        taxonomy = None
    hyp = analysis.resolve_hypothesis(hypothesis, names, taxonomy)
    sketch_b = tasks_b = None
    if store_b:
        st_b = _open(store_b, allow_incomplete)
        sketch_b, tasks_b = analysis.check_sketches(st_b.sketches,
                                                    _tasks(st_b, store_b, task_column))
    result = analysis.analyze(sketches, tasks, hyp, layout=st.layout, kind=similarity,
                              group_by=group_by, n_boot=n_boot, n_perm=n_perm,
                              n_splits=n_splits, seed=seed, ci_method=ci_method,
                              sketch_b=sketch_b, tasks_b=tasks_b)
    provenance = analysis.provenance_from_manifest(st.manifest)
    provenance["store"] = os.path.abspath(store)
    if store_b:
        provenance["store_b"] = os.path.abspath(store_b)
    return analysis.save(result, workdir, provenance)


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
