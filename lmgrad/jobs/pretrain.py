"""The pretrain stage: a local checkpoint series of a Llama- or GPT-NeoX-style model trained from
scratch on text corpora, every saved step a Hugging Face directory that lmgrad and `transformers` load.

`run(options, workdir)` does, in order (each step reused when already done):

1. the tokenizer: a byte-level BPE trained on the corpora (`DATA/tokenizer/`);
2. the token file: the corpora encoded once into a memory-mapped `DATA/tokens.bin`;
3. training: packed windows in a seeded order that is a pure function of (data_seed, step), AdamW
   with warmup and cosine decay (`lmgrad.pretrain.train`);
4. at every checkpoint step (0, 1, 2, 4, …, every `checkpoint_every`, and the last): an orbax
   checkpoint (`checkpoints/`), a Hugging Face export (`hf/step_XXXXXX/`), the validation
   perplexity and BLiMP accuracy of that export (one row of `metrics.jsonl`, the BLiMP summary in
   `blimp/step_XXXXXX.json`).

DATA is `options.data_dir`, or `WORKDIR/data`: runs of a series share one tokenizer and token file
by pointing at one data_dir.

**Resume is automatic**: run the same command again on the same workdir and it continues from the
latest checkpoint (a logged one in `checkpoints/` or the rolling one in `resume/`, saved every
`resume_every` steps and not exported), provided the options that change the numbers match
`options.json` (otherwise an error names the fields that differ). The restored params and optimiser
state are bit-exact and the data order depends on (data_seed, step) alone, so a killed and resumed
run ends with the same parameters, bit for bit, as an uninterrupted one on the same machine
(`tests/test_pretrain.py`). Steps between the checkpoint and the kill are recomputed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import numpy as np

from lmgrad import io as lio
from lmgrad.jobs.schema import check_choices, from_dict, option, to_dict

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
TRAIN_LOG = "train.jsonl"
OPTIONS = "options.json"
SUMMARY = "summary.json"

# Options that do not change the trained parameters: they may differ between a run and its resume.
_FREE_ON_RESUME = ("blimp_tasks", "blimp_pairs_per_task", "blimp_dir", "eval_batch_size", "val_sequences",
                   "log_every", "resume_every")


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
    """What to train, on what, and how often to save and evaluate it."""

    corpus: tuple[str, ...] = option((), "Corpus files (plain or .gz text, one document per line), in order.")
    data_dir: str = option("", "Where the tokenizer and token file live ('': WORKDIR/data); share it across a series.")
    max_corpus_bytes: int | None = option(None, "Read at most about N bytes of text per corpus (None: all).")
    vocab_size: int = option(8192, "BPE vocabulary size (byte-level, plus <|endoftext|>).")
    tokenizer_max_bytes: int = option(20_000_000, "Text per corpus the tokenizer is trained on (its first bytes).")
    val_fraction: float = option(0.01, "Validation slice: the last fraction of each corpus's tokens.")
    family: str = option("llama", "Architecture.", choices=("llama", "gpt_neox"))
    hidden_size: int = option(128, "Model width.")
    num_layers: int = option(4, "Transformer blocks.")
    num_heads: int = option(4, "Attention heads.")
    num_kv_heads: int | None = option(None, "Llama key/value heads (None: num_heads).")
    intermediate_size: int = option(512, "MLP width.")
    tie_word_embeddings: bool = option(True, "Share the input embedding and the output head.")
    rotary_pct: float = option(0.25, "GPT-NeoX: fraction of each head that is rotated (Llama: all).")
    seq_len: int = option(128, "Tokens per packed training sequence.")
    batch_size: int = option(32, "Sequences per step.")
    steps: int = option(2000, "Optimiser steps.")
    lr: float = option(1e-3, "Peak learning rate.")
    warmup_steps: int = option(100, "Linear warmup steps.")
    min_lr_ratio: float = option(0.1, "Cosine decay ends at lr * min_lr_ratio.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only).")
    clip_norm: float = option(1.0, "Global gradient-norm clip (0: off).")
    compute_dtype: str = option("float32", "Forward/backward dtype (float32 master weights either way).",
                                choices=("float32", "bfloat16"))
    seed: int = option(0, "Seed of the initialisation.")
    data_seed: int = option(0, "Seed of the data order.")
    checkpoint_every: int = option(0, "Besides 0, 1, 2, 4, ... and the last step, log every N steps (0: off).")
    resume_every: int = option(200, "Rolling resume checkpoint every N steps (not exported; 0: off).")
    val_sequences: int = option(256, "Validation sequences evaluated per checkpoint (spread over the slice).")
    blimp_tasks: str = option("blimp", "Task selector scored at each checkpoint ('' : none).")
    blimp_pairs_per_task: int = option(20, "Seeded sample of pairs per task for the per-checkpoint BLiMP score.")
    blimp_dir: str = option("", "BLiMP directory ('': $LMGRAD_BLIMP_DIR, else the cache).")
    eval_batch_size: int = option(64, "Sequences per evaluation batch.")
    log_every: int = option(10, "Training-loss row in train.jsonl every N steps.")

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_len",
                     "batch_size", "steps", "eval_batch_size", "log_every", "val_sequences",
                     "blimp_pairs_per_task", "tokenizer_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainOptions.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "checkpoint_every", "resume_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainOptions.{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size < 257:
            raise ValueError(f"PretrainOptions.vocab_size must be >= 257 (256 bytes + <|endoftext|>), "
                             f"got {self.vocab_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"PretrainOptions.val_fraction must be in (0, 1), got {self.val_fraction}")

    def hf_config(self, eot_id: int = 0) -> Any:
        """The `transformers` config of the model these options train."""
        from lmgrad.pretrain.model import hf_config

        return hf_config(self.family, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                         num_layers=self.num_layers, num_heads=self.num_heads,
                         intermediate_size=self.intermediate_size, seq_len=self.seq_len,
                         num_kv_heads=self.num_kv_heads, tie_word_embeddings=self.tie_word_embeddings,
                         rotary_pct=self.rotary_pct, eot_id=eot_id)

    def num_params(self) -> int:
        """Parameter count, without allocating (`jax.eval_shape`)."""
        from lmgrad.models.config import from_hf_config
        from lmgrad.models.loading import param_shapes

        return int(sum(math.prod(s) for s in param_shapes(from_hf_config(self.hf_config())).values()))


# ---------------------------------------------------------------------------- data

def _corpus_fingerprint(paths: list[pathlib.Path], max_bytes: int | None) -> list[dict[str, Any]]:
    return [{"file": str(p.resolve()), "size": p.stat().st_size, "sha256": lio.sha256_file(p),
             "max_bytes": max_bytes} for p in paths]


def prepare_data(options: PretrainOptions, data_dir: str | os.PathLike) -> tuple[Any, Any]:
    """(tokenizer, TokenData): trains the tokenizer and writes the token file unless the ones in
    `data_dir` were made from the same corpora and settings."""
    from transformers import AutoTokenizer

    from lmgrad.pretrain.data import TokenData, check_corpora, tokenize_corpora, train_tokenizer

    paths = check_corpora(options.corpus)
    data_dir = pathlib.Path(data_dir)
    tok_dir = data_dir / "tokenizer"
    corpora = _corpus_fingerprint(paths, options.max_corpus_bytes)
    tok_key = {"corpora": corpora, "vocab_size": options.vocab_size,
               "tokenizer_max_bytes": options.tokenizer_max_bytes}
    stamp = tok_dir / "lmgrad_tokenizer.json"
    if stamp.exists() and json.loads(stamp.read_text()) == tok_key:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    else:
        log.info("training a %d-token byte-level BPE on %s", options.vocab_size, [str(p) for p in paths])
        limit = options.tokenizer_max_bytes
        if options.max_corpus_bytes is not None:
            limit = min(limit, options.max_corpus_bytes)
        tokenizer = train_tokenizer(paths, options.vocab_size, max_bytes=limit)
        tokenizer.save_pretrained(str(tok_dir))
        lio.write_json(stamp, tok_key)
    fingerprint = {"corpora": corpora, "tokenizer_sha256": lio.sha256_file(tok_dir / "tokenizer.json")}
    tokenize_corpora(tokenizer, paths, data_dir, fingerprint=fingerprint, max_bytes=options.max_corpus_bytes)
    return tokenizer, TokenData.open(data_dir, options.seq_len, options.val_fraction)


# ---------------------------------------------------------------------------- run

def _check_resume(workdir: pathlib.Path, options: PretrainOptions) -> None:
    path = workdir / OPTIONS
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(to_dict(options)))
    diff = sorted(k for k in set(old) | set(new) if k not in _FREE_ON_RESUME and old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{workdir}: holds a run with other options ({', '.join(f'{k}: {old.get(k)!r} → {new.get(k)!r}' for k in diff)}); "
                         "use another workdir, or the same options to resume")


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_name(step: int) -> str:
    return f"step_{step:06d}"


def _optimizer_args(options: PretrainOptions) -> tuple[Any, ...]:
    return (options.lr, options.warmup_steps, options.steps, options.min_lr_ratio, options.weight_decay,
            options.clip_norm)


@functools.lru_cache(maxsize=4)
def _compiled(config: Any, optimizer_args: tuple[Any, ...], compute_dtype: str) -> tuple[Any, Any, Any]:
    """(optax transform, jitted train step, jitted eval NLL) for a model config and optimiser,
    cached so that runs in one process (a resume, a test session) compile once."""
    import jax.numpy as jnp

    from lmgrad.compilation import enable_compilation_cache
    from lmgrad.models.loading import build_module
    from lmgrad.pretrain import train as pt

    enable_compilation_cache()
    lr, warmup, steps, min_lr_ratio, weight_decay, clip_norm = optimizer_args
    module = build_module(config)
    tx = pt.optimizer(lr, warmup, steps, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, clip_norm=clip_norm)
    dtype = jnp.dtype(compute_dtype)
    return tx, pt.make_train_step(module.apply, tx, dtype), pt.make_eval_fn(module.apply, dtype)


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO records (a dozen lines per checkpoint) from absl's logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def run(options: PretrainOptions, workdir: str | os.PathLike, *, max_steps: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the summary also written to `summary.json`.

    `max_steps` stops after that global step without saving (a simulated kill, for tests); the
    schedule, checkpoint steps and data order still follow `options.steps`.
    """
    quiet = _QuietOrbax()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        return _run(options, workdir, max_steps=max_steps, progress=progress)
    finally:
        absl_logger.removeFilter(quiet)


def _run(options: PretrainOptions, workdir: str | os.PathLike, *, max_steps: int | None,
         progress: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from lmgrad.models.config import from_hf_config
    from lmgrad.pretrain import model as pm
    from lmgrad.pretrain import train as pt
    from lmgrad.pretrain.data import EOT

    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    _check_resume(workdir, options)
    lio.write_json(workdir / OPTIONS, to_dict(options))
    data_dir = pathlib.Path(options.data_dir).absolute() if options.data_dir else workdir / "data"
    t_data = time.perf_counter()
    tokenizer, data = prepare_data(options, data_dir)
    t_data = time.perf_counter() - t_data
    if len(tokenizer) != options.vocab_size:
        # A small corpus can stop BPE short of the requested size; the model keeps vocab_size rows.
        log.warning("tokenizer has %d tokens (< vocab_size %d): the extra embedding rows stay unused",
                    len(tokenizer), options.vocab_size)
    if len(tokenizer) > options.vocab_size:
        raise ValueError(f"{data_dir}: tokenizer has {len(tokenizer)} tokens > vocab_size {options.vocab_size}")

    hf = options.hf_config(eot_id=tokenizer.convert_tokens_to_ids(EOT))
    config = from_hf_config(hf)
    tx, train_step, eval_nll = _compiled(config, _optimizer_args(options), options.compute_dtype)
    params = pm.init_params(config, options.seed)
    state = {"params": params, "opt_state": tx.init(params)}
    n_params = pm.num_params(params)

    save_steps = pt.checkpoint_steps(options.steps, options.checkpoint_every)
    save_set = set(save_steps)
    mngr_opts = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False)
    ckpts = ocp.CheckpointManager(workdir / "checkpoints", options=mngr_opts)
    rolling = ocp.CheckpointManager(workdir / "resume", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def restore(mngr: Any, step: int) -> dict[str, Any]:
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))

    tasks = None
    if options.blimp_tasks:
        from lmgrad.tasks import select_tasks

        tasks = select_tasks(options.blimp_tasks, max_pairs_per_task=options.blimp_pairs_per_task, seed=0,
                             blimp_dir=options.blimp_dir or None)

    metrics = {r["step"]: r for r in _read_jsonl(workdir / METRICS) if r["step"] in set(ckpts.all_steps())}
    tokens_per_step = options.batch_size * options.seq_len
    t_start = time.perf_counter()
    eval_s = [0.0]
    eval_model: dict[str, Any] = {}

    def evaluate_step(step: int, params: Any, train_loss: float | None) -> dict[str, Any]:
        from lmgrad.jobs.evaluate import evaluate
        from lmgrad.models import load_model

        t0 = time.perf_counter()
        out = pm.export_hf(params, hf, tokenizer, workdir / "hf" / _step_name(step),
                           metadata={"step": step, "tokens_seen": step * tokens_per_step,
                                     "options": to_dict(options)})
        nll, count = 0.0, 0
        for w in data.val_batches(options.eval_batch_size, options.val_sequences):
            nll += float(eval_nll(params, jnp.asarray(w)))
            count += w.shape[0] * (w.shape[1] - 1)
        row: dict[str, Any] = {"step": step, "tokens_seen": step * tokens_per_step,
                               "lr": float(pt.schedule(options.lr, options.warmup_steps, options.steps,
                                                       options.min_lr_ratio)(step)),
                               "train_loss": train_loss, "val_loss": nll / count,
                               "val_ppl": math.exp(nll / count), "val_tokens": count, "export": str(out)}
        if tasks is not None:
            # Score what was exported, as any reader loads it; the first loaded model is kept so
            # that its compiled scoring function serves every checkpoint (same shapes, new params).
            loaded = load_model(str(out))
            model = eval_model.setdefault("model", loaded)
            model.params, model.spec, model.provenance = loaded.params, loaded.spec, loaded.provenance
            _, summary = evaluate(model, tasks, batch_size=options.eval_batch_size, bos="auto")
            row["blimp_accuracy"] = summary["overall"]["accuracy"]
            row["blimp_macro_accuracy"] = summary["overall"]["macro_accuracy_over_uids"]
            row["blimp_pairs"] = summary["overall"]["n_pairs"]
            (workdir / "blimp").mkdir(exist_ok=True)
            lio.write_json(workdir / "blimp" / f"{_step_name(step)}.json",
                           {k: summary[k] for k in ("overall", "per_uid", "per_linguistics_term", "per_field")})
        row["wall_s"] = time.perf_counter() - t_start
        row["eval_s"] = time.perf_counter() - t0
        eval_s[0] += row["eval_s"]
        return row

    def record(row: dict[str, Any]) -> None:
        metrics[row["step"]] = row
        lio.write_jsonl(workdir / METRICS, [metrics[s] for s in sorted(metrics)])

    # Where to start: the latest committed checkpoint of either manager.
    candidates = [(s, m) for m in (ckpts, rolling) for s in m.all_steps()]
    start = 0
    if candidates:
        start, mngr = max(candidates, key=lambda c: c[0])
        state = restore(mngr, start)
        log.info("resuming %s from step %d", workdir, start)
    # Logged steps whose export or evaluation a kill interrupted (the checkpoint is committed first).
    for s in ckpts.all_steps():
        if s not in metrics:
            p = state["params"] if s == start else restore(ckpts, s)["params"]
            record(evaluate_step(s, p, None))
    if start == 0 and 0 not in ckpts.all_steps():
        ckpts.save(0, args=ocp.args.StandardSave(state))
        record(evaluate_step(0, state["params"], None))

    train_rows = [r for r in _read_jsonl(workdir / TRAIN_LOG) if r["step"] <= start]
    stop = options.steps if max_steps is None else min(max_steps, options.steps)
    params, opt_state = state["params"], state["opt_state"]
    # Device scalars, read only when logged: no host sync per step on an accelerator.
    losses: collections.deque[Any] = collections.deque(maxlen=options.log_every)
    t_train = time.perf_counter()
    eval_before = eval_s[0]
    with tqdm(total=options.steps, initial=start, unit="step", desc=f"pretrain {options.family} "
              f"{n_params / 1e6:.2f}M", disable=not progress) as bar:
        for step in range(start, stop):
            windows = jnp.asarray(data.batch(options.data_seed, step, options.batch_size))
            params, opt_state, loss, gnorm = train_step(params, opt_state, windows)
            s = step + 1
            losses.append(loss)
            bar.update(1)
            if s % options.log_every == 0 or s in save_set:
                mean = float(np.mean([float(x) for x in losses]))
                train_rows.append({"step": s, "loss": float(loss), "loss_mean": mean, "grad_norm": float(gnorm)})
                lio.write_jsonl(workdir / TRAIN_LOG, train_rows)
                bar.set_postfix(loss=f"{mean:.3f}")
            if s in save_set:
                ckpts.save(s, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
                row = evaluate_step(s, params, mean)
                record(row)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_ppl=f"{row['val_ppl']:.1f}",
                                blimp=f"{row.get('blimp_accuracy', float('nan')):.3f}")
            elif options.resume_every and s % options.resume_every == 0:
                rolling.save(s, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    train_s = time.perf_counter() - t_train - (eval_s[0] - eval_before)
    ckpts.wait_until_finished()
    rolling.wait_until_finished()
    ckpts.close()
    rolling.close()
    steps_run = max(stop - start, 0)
    summary = {
        "complete": stop >= options.steps,
        "step": max(stop, start),
        "num_params": n_params,
        "checkpoint_steps": save_steps,
        "exports": [str(workdir / "hf" / _step_name(s)) for s in sorted(metrics)],
        "metrics": [metrics[s] for s in sorted(metrics)],
        "data": {"dir": str(data_dir), "n_tokens": int(len(data.tokens)), "parts": data.parts,
                 "train_sequences": int(len(data.train_offsets)), "val_sequences": int(len(data.val_offsets)),
                 "tokenizer_vocab": len(tokenizer), "seconds": t_data},
        "timing": {"steps_this_session": steps_run, "train_seconds": train_s, "eval_seconds": eval_s[0],
                   "steps_per_s": steps_run / max(train_s, 1e-9), "tokens_per_step": tokens_per_step,
                   "note": "train_seconds: the training loop less checkpoint export/evaluation (first step compiles)"},
        "options": to_dict(options),
    }
    lio.write_json(workdir / SUMMARY, summary)
    return summary


def options_from_json(path: str | os.PathLike) -> PretrainOptions:
    """The options a run was made with (`WORKDIR/options.json`)."""
    return from_dict(PretrainOptions, json.loads(pathlib.Path(path).read_text()))
