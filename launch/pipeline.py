r"""The main job, end to end: scores → sketches → task space → report.

  python launch/pipeline.py --config=configs/default.py --workdir=runs/default
  python launch/pipeline.py --config=configs/default.py:smoke --workdir=runs/smoke
  python launch/pipeline.py --config=configs/default.py --config.model=/ckpt/pythia-70m --workdir=...

Writes WORKDIR/eval/{scores.jsonl,summary.json} (launch/evaluate.py's files),
WORKDIR/sketches/ (a run store, launch/sketch.py's), WORKDIR/sketches_seedN/ (the same with another
projection seed, for the sketch-error check; `task_space.check_seed=None` skips it), WORKDIR/task_space/ (launch/task_space.py's:
task_space.npz, stats.json, figures, report.md) and WORKDIR/pipeline.json (timings, paths).
Re-running with the same WORKDIR reuses finished stages and resumes an interrupted sketch stage.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Pipeline config (get_config(arg) file).")
flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from tqdm import tqdm

    from lmgrad import store as lstore
    from lmgrad.analysis.job import run_task_space
    from lmgrad.evaluate import evaluate, write_json_atomic
    from lmgrad.models import load_model
    from lmgrad.sketch_run import SketchOptions, run_sketch
    from lmgrad.tasks import select_tasks

    cfg = FLAGS.config
    work = pathlib.Path(FLAGS.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    tasks = select_tasks(cfg.tasks, max_pairs_per_task=cfg.max_pairs_per_task, seed=cfg.seed)
    n_pairs = sum(len(t) for t in tasks)
    print(f"[lmgrad] {len(tasks)} tasks, {n_pairs} pairs; model {cfg.model}", flush=True)
    t = time.perf_counter()
    model = load_model(cfg.model, dtype=cfg.dtype)
    timings["load_model"] = time.perf_counter() - t

    eval_dir = work / "eval"
    summary_path = eval_dir / "summary.json"
    if cfg.evaluate.enabled and not summary_path.exists():
        eval_dir.mkdir(exist_ok=True)
        t = time.perf_counter()
        with tqdm(total=2 * n_pairs, unit="sent", desc="1/3 scoring") as bar:
            records, summary = evaluate(model, tasks, batch_size=cfg.evaluate.batch_size, bos=cfg.bos,
                                        progress=bar.update)
        write_json_atomic(eval_dir / "scores.jsonl", records, lines=True)
        write_json_atomic(summary_path, summary)
        timings["evaluate"] = time.perf_counter() - t
    if summary_path.exists():
        acc = json.loads(summary_path.read_text())["overall"]["accuracy"]
        print(f"[lmgrad] BLiMP accuracy {acc:.3f} ({summary_path})", flush=True)

    s = cfg.sketch
    opts = SketchOptions(method=s.method, projector=s.projector, k=s.k, seed=s.seed, include=tuple(s.include),
                         exclude=tuple(s.exclude), from_first_difference=s.from_first_difference,
                         r_in=s.r_in, r_out=s.r_out, overrides=tuple(tuple(o) for o in s.overrides), bos=cfg.bos)
    def sketch_stage(sketch_dir: pathlib.Path, opts: SketchOptions, label: str) -> None:
        done = (sketch_dir / "manifest.json").exists() and lstore.open(sketch_dir, verify=False).complete
        if done:
            return
        t = time.perf_counter()
        with tqdm(total=n_pairs, unit="pair", desc=f"{label} sketching ({opts.method}, seed {opts.seed})") as bar:
            stats = run_sketch(model, tasks, str(sketch_dir), opts, batch_size=s.batch_size,
                               chunk_size=s.chunk_size, shard_rows=s.shard_rows,
                               resume=(sketch_dir / "manifest.json").exists(), progress=bar.update)
        timings[f"sketch:{sketch_dir.name}"] = time.perf_counter() - t
        print(f"[lmgrad] sketched {stats['pairs']} pairs at {stats['pairs_per_s']:.2f} pairs/s, "
              f"k={stats['k']} ({sketch_dir})", flush=True)

    sketch_dir = work / "sketches"
    sketch_stage(sketch_dir, opts, "2/3")
    # Sketch-error check: the same task space from an independent projection; its agreement with
    # the first shows whether the sketch size is adequate (reported in the task-space report).
    store_b = None
    if cfg.task_space.check_seed is not None:
        store_b = work / f"sketches_seed{cfg.task_space.check_seed}"
        sketch_stage(store_b, dataclasses.replace(opts, seed=cfg.task_space.check_seed), "2b/3")

    t = time.perf_counter()
    ts = cfg.task_space
    paths = run_task_space(str(sketch_dir), str(work / "task_space"), ts.hypothesis, similarity=ts.similarity,
                           n_boot=ts.n_boot, n_perm=ts.n_perm, seed=ts.seed,
                           store_b=None if store_b is None else str(store_b))
    timings["task_space"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    record = {"config": cfg.to_dict(), "timings_s": timings, "outputs": {k: str(v) for k, v in paths.items()},
              "eval": str(summary_path), "store": str(sketch_dir)}
    (work / "pipeline.json").write_text(json.dumps(record, indent=2, default=str))
    logging.info("timings: %s", timings)
    print(f"[lmgrad] done in {timings['total']:.0f} s. Report: {paths['report']}", flush=True)


if __name__ == "__main__":
    app.run(main)
