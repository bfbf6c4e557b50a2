"""The sketch stage end to end (`lmgrad.jobs.sketch.sketch_pairs`): packed pairs vs length buckets.

    LMGRAD_BLIMP_DIR=../shared/data/blimp python -m bench run --suite=sketch_stage
    LMGRAD_BLIMP_DIR=../shared/data/blimp python -m bench run --suite=sketch_stage -- --max_pairs_per_task=4

The main job's sketch stage (SmolLM2-135M, factored default ranks, the BLiMP selection of
configs/default.py) run once per batching in one process, each into its own store, each with its
own traces and compiles (the two are different functions; nothing is shared but the loaded model).
Per mode: wall time of the stage, the time of each shape's first batch (trace + compile + run),
the steady seconds per batch after it, token slots against real tokens, and pairs/s. Then the two
stores are matched pair by pair: the packed rows must be the bucketed rows up to float32 rounding.
Appends to bench/results/sketch_stage.jsonl.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import _common

# Both modes compile from nothing, whatever earlier runs left in the persistent cache.
os.environ.setdefault("LMGRAD_COMPILATION_CACHE", "off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max_pairs_per_task", type=int, default=12, help="the main job's selection (configs/default.py)")
    ap.add_argument("--tasks", default="blimp")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["bucketed", "packed"])
    args = ap.parse_args()

    import jax

    from lmgrad import store as lstore
    from lmgrad.jobs.sketch import SketchOptions, sketch_batches, sketch_pairs
    from lmgrad.models import load_model
    from lmgrad.tasks import PackedPairBatch, encode_pairs, select_tasks

    model = load_model(args.model)
    tasks = select_tasks(args.tasks, max_pairs_per_task=args.max_pairs_per_task)
    pairs = [p for t in tasks for p in t.pairs]
    good, bad, sg, sb = encode_pairs(model.tokenizer, pairs)
    real_tokens = int(sum(len(g) + len(b) for g, b in zip(good, bad)))
    out, stores = [], {}
    for mode in args.modes:
        opts = SketchOptions(method="factored", batch_size=args.batch_size, pack=mode == "packed").resolve(model)
        batches = sketch_batches(good, bad, opts, score_from_good=sg, score_from_bad=sb, max_len=model.max_length)
        shape = lambda b: b.shape if isinstance(b, PackedPairBatch) else (2 * b[0].shape[0], b[0].shape[1])  # noqa: E731
        slots = int(sum(np.prod(shape(b)) for b in batches))
        stamps: list[float] = []
        work = tempfile.mkdtemp(prefix=f"sketch_stage_{mode}_")
        t0 = time.perf_counter()
        res = sketch_pairs(model, tasks, work, opts, progress=lambda n: stamps.append(time.perf_counter()))
        wall = time.perf_counter() - t0
        per = np.diff([t0] + stamps)
        shapes = [shape(b) for b in batches]
        first = {s: shapes.index(s) for s in dict.fromkeys(shapes)}
        steady = [per[i] for i in range(len(per)) if i not in first.values()]
        rec = _common.run_meta(
            bench="sketch_stage", model=args.model, mode=mode, pairs=res["pairs"], batches=len(batches),
            shapes=[list(map(int, s)) for s in first], real_tokens=real_tokens, token_slots=slots,
            fill=round(real_tokens / slots, 4), wall_s=round(wall, 2),
            first_batch_s={"x".join(map(str, s)): round(float(per[i]), 2) for s, i in first.items()},
            steady_s_per_batch=round(float(np.median(steady)), 3) if steady else None,
            steady_s_total=round(float(np.sum(steady)), 2), pairs_per_s=round(res["pairs"] / wall, 2),
            batch_size=args.batch_size, jax=jax.__version__)
        out.append(rec)
        stores[mode] = lstore.open(work)
        print(f"{mode:9s} wall {wall:7.1f} s  batches {len(batches):3d}  shapes {len(first)}  fill {rec['fill']:.3f}  "
              f"first batches {sum(rec['first_batch_s'].values()):6.1f} s  steady {rec['steady_s_total']:6.1f} s "
              f"({rec['steady_s_per_batch']} s/batch)  {rec['pairs_per_s']} pairs/s", flush=True)
    if len(stores) == 2:
        a, b = (stores[m] for m in args.modes)
        key = lambda st: {(u, p): i for i, (u, p) in enumerate(zip(st.meta["UID"], st.meta["pairID"]))}  # noqa: E731
        ka, kb = key(a), key(b)
        assert ka.keys() == kb.keys(), "both stores hold the same pairs"
        order = [kb[k] for k in ka]
        xa, xb = np.asarray(a.sketches, np.float64), np.asarray(b.sketches, np.float64)[order]
        rel = np.linalg.norm(xa - xb, axis=1) / np.maximum(np.linalg.norm(xa, axis=1), 1e-30)
        cmp = {"max_rel_row_diff": float(rel.max()), "median_rel_row_diff": float(np.median(rel))}
        for r in out:
            r["rows_vs_other_mode"] = cmp
        walls = {r["mode"]: r for r in out}
        if {"packed", "bucketed"} <= walls.keys():
            for r in out:
                r["wall_ratio_bucketed_over_packed"] = round(walls["bucketed"]["wall_s"] / walls["packed"]["wall_s"], 3)
                r["steady_ratio_bucketed_over_packed"] = round(
                    walls["bucketed"]["steady_s_total"] / max(walls["packed"]["steady_s_total"], 1e-9), 3)
        print(f"rows: max relative difference {cmp['max_rel_row_diff']:.2e} (median {cmp['median_rel_row_diff']:.2e})")
    _common.append_jsonl(_common.results_path("sketch_stage"), out)


if __name__ == "__main__":
    main()
