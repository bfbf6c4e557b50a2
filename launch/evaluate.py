r"""Scores minimal pairs: is log p(good) > log p(bad)?

  python launch/evaluate.py --model=smollm2 --tasks=blimp --max_pairs_per_task=20 --workdir=runs/eval

Writes `WORKDIR/scores.jsonl` (one line per pair: UID, pairID, logprob_good, logprob_bad, ...) and
`WORKDIR/summary.json` (accuracy per UID, per linguistics_term, per field, overall; provenance).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "Model spec: HF dir, hub id[@revision], .gguf file, or 'smollm2'.")
flags.DEFINE_string("tasks", "blimp", "Task selector (see lmgrad.tasks.select_tasks).")
flags.DEFINE_integer("max_pairs_per_task", None, "Seeded sample of at most N pairs per task.")
flags.DEFINE_integer("seed", 0, "Seed of the pair sample.")
flags.DEFINE_integer("batch_size", 32, "Sentences per batch.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_string("bos", "auto", "Token prepended to each sentence: auto (BOS, else EOS), none, or a token.")
flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from tqdm import tqdm

    from lmgrad.evaluate import evaluate, write_json_atomic
    from lmgrad.models import load_model
    from lmgrad.tasks import select_tasks

    workdir = pathlib.Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = select_tasks(FLAGS.tasks, max_pairs_per_task=FLAGS.max_pairs_per_task, seed=FLAGS.seed)
    n_pairs = sum(len(t) for t in tasks)
    logging.info("%d tasks, %d pairs; loading %s", len(tasks), n_pairs, FLAGS.model)
    model = load_model(FLAGS.model, dtype=FLAGS.dtype)
    with tqdm(total=2 * n_pairs, unit="sent", desc="scoring") as bar:
        records, summary = evaluate(model, tasks, batch_size=FLAGS.batch_size, bos=FLAGS.bos,
                                    progress=bar.update)
    summary["flags"] = {k: FLAGS[k].value for k in
                        ("model", "tasks", "max_pairs_per_task", "seed", "batch_size", "dtype", "bos")}
    write_json_atomic(workdir / "scores.jsonl", records, lines=True)
    write_json_atomic(workdir / "summary.json", summary)
    o = summary["overall"]
    print(f"accuracy {o['accuracy']:.3f} over {o['n_pairs']} pairs in {o['n_tasks']} tasks "
          f"({summary['timing']['sentences_per_s']:.1f} sentences/s); wrote {workdir}/summary.json")


if __name__ == "__main__":
    app.run(main)
