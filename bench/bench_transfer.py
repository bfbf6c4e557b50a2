r"""Tuning many tasks: vmap over stacked parameter copies (task_batch = G) vs sequential (G = 1).

  python bench/bench_transfer.py [--sizes=tiny,mid] [--tasks=4] [--steps=4] [--groups=1,4]

Random Llama checkpoints (built with transformers, no download), 4 BLiMP tasks, FTGD with Adam and
a top-5% mask. For each size and G: compile time (first pass minus second) and steady-state
seconds per task-step of the second pass, and the process's peak RSS growth. Prints a table and
appends one JSON line per measurement to bench/results/transfer.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("LMGRAD_BLIMP_DIR", str(ROOT.parent / "shared" / "data" / "blimp"))

SIZES = {"tiny": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
         "mid": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8)}
TASKS = "blimp:anaphor_gender_agreement,passive_1,wh_island,npi_present_1,adjunct_island,causative,drop_argument,ellipsis_n_bar_1"


def build(size: str, path: str) -> None:
    import torch
    import transformers
    from helpers_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), max_position_embeddings=64, num_key_value_heads=2,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SIZES[size])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def measure(size: str, n_tasks: int, steps: int, group: int) -> dict:
    import jax

    from lmgrad.models import load_model, logits_fn
    from lmgrad.params import flatten
    from lmgrad.tasks import select_tasks
    from lmgrad.transfer import (TuneSpec, encode_task_pairs, make_group_step, make_task_grad_fn, split_pairs,
                                 task_gradient, top_p_mask, tune_tasks)

    path = tempfile.mkdtemp()
    build(size, path)
    model = load_model(path)
    apply_fn = logits_fn(model)
    names = sorted(flatten(model.params))
    tasks = select_tasks(",".join(TASKS.split(",")[: n_tasks]), max_pairs_per_task=12)
    train = [encode_task_pairs(model.tokenizer, t.uid, split_pairs(t.uid, t.pairs, 2)[0]) for t in tasks]
    diff = make_task_grad_fn(apply_fn)
    masks = [top_p_mask(task_gradient(diff, model.params, names, t), 0.05) for t in train]
    spec = TuneSpec(optimizer="adam", learning_rate=1e-3, steps=steps, batch_size=8, task_batch=group)
    step = make_group_step(apply_fn, spec)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for g in tune_tasks(apply_fn, model.params, names, train, masks, spec, step=step):
            jax.block_until_ready(g.trainable)
        times.append(time.perf_counter() - t0)
    n_params = sum(int(v.size) for v in flatten(model.params).values())
    return {"size": size, "n_params": n_params, "tasks": len(train), "steps": steps, "task_batch": group,
            "compile_s": times[0] - times[1], "s_per_task_step": times[1] / (len(train) * steps),
            "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
            "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
            "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,mid")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", default="1,4")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # size:group, run in a child process
    a = ap.parse_args()
    if a.one:
        size, group = a.one.split(":")
        print(json.dumps(measure(size, a.tasks, a.steps, int(group))))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    rows = []
    for size in a.sizes.split(","):
        for group in a.groups.split(","):
            # One process per measurement, so peak memory is this configuration's own.
            out = subprocess.run([sys.executable, __file__, f"--one={size}:{group}", f"--tasks={a.tasks}",
                                  f"--steps={a.steps}"], capture_output=True, text=True, check=True).stdout
            row = {**json.loads(out.strip().splitlines()[-1]), "commit": commit,
                   "date": time.strftime("%Y-%m-%d")}
            rows.append(row)
            with open(ROOT / "bench" / "results" / "transfer.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"{'size':6} {'params':>10} {'G':>3} {'compile s':>10} {'s/task-step':>12} {'peak RSS +MB':>13} {'load':>5}")
    for r in rows:
        print(f"{r['size']:6} {r['n_params']:>10,} {r['task_batch']:>3} {r['compile_s']:>10.1f} "
              f"{r['s_per_task_step']:>12.4f} {r['peak_rss_growth_mb']:>13.0f} {r['load_avg']:>5.1f}")


if __name__ == "__main__":
    main()
