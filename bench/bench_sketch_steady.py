"""Compile time and steady per-batch time of the factored SmolLM2 sketch function of a checkout.

    LMGRAD_BLIMP_DIR=../shared/data/blimp LMGRAD_COMPILATION_CACHE=$(mktemp -d) \\
        python bench/bench_sketch_steady.py PATH_TO_CHECKOUT

Imports lmgrad from PATH_TO_CHECKOUT (a `git worktree` of an older commit compares releases: the
older API `lmgrad.sketch_run` is handled), builds the default factored sketcher, and times the first
call (compile) and five more on the longest 16-pair batch of two BLiMP paradigms. Results of
2026-12-01: bench/results/default_run.json.
"""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import jax
from lmgrad.models import load_model
from lmgrad.tasks import select_tasks, encode_pairs, iter_pair_batches
try:
    from lmgrad.jobs.sketch import SketchOptions, build_sketcher
    new = True
except ImportError:
    from lmgrad.sketch_run import SketchOptions, build_sketcher
    new = False
import lmgrad; print("lmgrad at", lmgrad.__file__)
m = load_model("smollm2")
if new:
    opts = SketchOptions(method="factored").resolve(m)
else:
    opts = SketchOptions(method="factored", k=0)
sk = build_sketcher(m, opts)
tasks = select_tasks("blimp:wh_island,anaphor_number_agreement", max_pairs_per_task=32)
pairs = [p for t in tasks for p in t.pairs]
g, b, sg, sb = encode_pairs(m.tokenizer, pairs)
batches = list(iter_pair_batches(g, b, batch_size=16, score_from_good=sg, score_from_bad=sb, max_len=m.max_length))
shapes = sorted({x[0].input_ids.shape for x in batches})
print("shapes", shapes)
gb = max(batches, key=lambda x: x[0].input_ids.shape[1])
t = time.perf_counter(); np.asarray(sk.fn(m.params, *gb)); print("first call", round(time.perf_counter() - t, 1))
ts = []
for _ in range(5):
    t = time.perf_counter(); np.asarray(sk.fn(m.params, *gb)); ts.append(time.perf_counter() - t)
print("steady", gb[0].input_ids.shape, "median s/call", round(float(np.median(ts)), 3), [round(x, 2) for x in ts])
