r"""Trains a Llama- or GPT-NeoX-style model from scratch on text corpora: a local checkpoint series,
every saved step a Hugging Face directory (lmgrad.jobs.pretrain).

  python launch/pretrain.py --config=configs/pretrain.py:cpu_m --workdir=runs/pretrain/small
  python launch/pretrain.py --config=configs/pretrain.py:cpu_m --config.steps=8000 --workdir=...
  python launch/pretrain.py --corpus=/data/a.txt.gz,/data/b.txt --family=gpt_neox --hidden_size=64 \
      --num_layers=2 --steps=500 --workdir=runs/pretrain/mine          # options as flags, no config

Either a `--config` file (a `PretrainOptions` as a ConfigDict; override any field as
--config.FIELD=VALUE) or the per-field flags (the fields of `lmgrad.jobs.pretrain.PretrainOptions`),
not both. Outputs in WORKDIR: `hf/step_XXXXXX/` (Hugging Face directories), `metrics.jsonl`
(validation perplexity and BLiMP accuracy per checkpoint), `train.jsonl`, `checkpoints/` (orbax),
`summary.json`. Running the same command again on the same WORKDIR resumes after a kill.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from lmgrad.jobs import pretrain as job
from lmgrad.jobs.cli import main_with_clean_errors
from lmgrad.jobs.schema import define_flags, from_dict, from_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pretrain config (get_config(arg) file), e.g. "
                                "configs/pretrain.py:cpu_m; instead of the per-field flags.")
OPTION_FLAGS = define_flags(job.PretrainOptions)
flags.DEFINE_integer("max_steps", None, "Stop after this global step without saving (testing a resume).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("workdir", None, "Run directory.", required=True)


def options_from_flags() -> job.PretrainOptions:
    """The options from --config (with its overrides) or from the per-field flags."""
    if FLAGS.config is not None:
        given = [f"--{n}" for n in OPTION_FLAGS if FLAGS[n].present]
        if given:
            raise ValueError(f"{', '.join(given)}: with --config, set options as --config.FIELD=VALUE")
        return from_dict(job.PretrainOptions, FLAGS.config.to_dict())
    return from_flags(job.PretrainOptions)


@main_with_clean_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = job.run(options_from_flags(), FLAGS.workdir, max_steps=FLAGS.max_steps, progress=FLAGS.progress)
    last = summary["metrics"][-1] if summary["metrics"] else {}
    print(f"pretrained {summary['num_params'] / 1e6:.2f}M parameters to step {summary['step']} "
          f"(complete={summary['complete']}); {len(summary['exports'])} exports in {FLAGS.workdir}/hf; "
          f"last checkpoint: val ppl {last.get('val_ppl', float('nan')):.1f}, "
          f"BLiMP {last.get('blimp_accuracy', float('nan')):.3f}")


if __name__ == "__main__":
    app.run(main)
