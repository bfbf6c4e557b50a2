"""Throughput of projection generators and of projecting a [B, n] gradient to k numbers.

    python bench/bench_projectors.py                       # full grid, n ∈ {1e5, 1e6, 1e7}, k ∈ {512, 4096}
    python bench/bench_projectors.py --n 100000 --k 512     # one point

Two tables:
* generation: G entries/s of [k, block] blocks (summed so nothing is elided) for jax.random.normal with
  threefry2x32 / rbg / unsafe_rbg, and lmgrad's hashed Rademacher and Gaussian generators;
* projection: [B, n] -> [B, k] per second for lmgrad's gaussian / rademacher / sjlt (s=1, 4) projectors,
  a blocked jax.random threefry projection, and the baseline g @ W.T with W pre-materialised (only where
  W fits in --max_w_gb). Points whose predicted time exceeds --budget_s are skipped and the prediction
  (from the measured rate at smaller n) is recorded instead.

Each row is appended as JSON to bench/results/projectors.jsonl with the command, date, commit, jax
version and device.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import append_jsonl, results_path, run_meta
from lmgrad.sketch import hashing, make_projector

RESULTS = results_path("projectors")


def _timeit(fn, *args, min_time: float = 0.5, max_reps: int = 20) -> float:
    """Seconds per call (best of repeats) after one warm-up/compile call."""
    jax.block_until_ready(fn(*args))
    best, total, reps = float("inf"), 0.0, 0
    while total < min_time and reps < max_reps:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        dt = time.perf_counter() - t
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


# --------------------------------------------------------------------------------- generators
def _gen_fn(kind: str, k: int, block: int, nblocks: int):
    if kind in ("threefry2x32", "rbg", "unsafe_rbg"):
        key = jax.random.key(0, impl=kind)

        def block_fn(i):
            return jax.random.normal(jax.random.fold_in(key, i), (k, block), jnp.float32)
    else:
        keys = jnp.asarray(hashing.keys_array(hashing.param_keys(0, "bench", kind)))
        gen = hashing.rademacher_block if kind == "hash-rademacher" else hashing.gaussian_block

        def block_fn(i):
            return gen(keys, i.astype(jnp.uint32) * jnp.uint32(block), k, block)

    @jax.jit
    def run():
        return jax.lax.fori_loop(0, nblocks, lambda i, acc: acc + block_fn(i).sum(), jnp.float32(0))

    return run


# --------------------------------------------------------------------------------- baselines
@functools.partial(jax.jit, static_argnames=("k", "block"))
def _threefry_project(g, *, k: int, block: int):
    """Blocked projection with jax.random.normal blocks (only valid for n divisible by block)."""
    key = jax.random.key(0, impl="threefry2x32")
    b, n = g.shape

    def step(i, acc):
        g_blk = jax.lax.dynamic_slice_in_dim(g, i * block, block, axis=1)
        m = jax.random.normal(jax.random.fold_in(key, i), (k, block), jnp.float32)
        return acc + jnp.einsum("bn,kn->bk", g_blk, m, precision="highest")

    return jax.lax.fori_loop(0, n // block, step, jnp.zeros((b, k), jnp.float32)) / np.sqrt(k)


@jax.jit
def _matmul(g, w):
    return jnp.einsum("bn,kn->bk", g, w, precision="highest")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    ap.add_argument("--k", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget_s", type=float, default=20.0, help="skip points predicted to take longer than this per call")
    ap.add_argument("--max_w_gb", type=float, default=2.0, help="largest pre-materialised W for the baseline")
    ap.add_argument("--gen_entries", type=float, default=2**27, help="entries generated per generation timing")
    ap.add_argument("--no_save", action="store_true")
    args = ap.parse_args()
    meta = run_meta(batch=args.batch)
    rows = []

    print(f"# {meta['backend']}:{meta['device']}  jax {meta['jax']}  cores {meta['cores']}  commit {meta['commit']}")
    print("\n## generation (G entries/s)")
    print(f"{'generator':>16} {'k':>6} {'G/s':>8}")
    for k in args.k:
        block = max(64, 2**20 // k)
        nblocks = max(1, int(args.gen_entries) // (k * block))
        for kind in ["threefry2x32", "rbg", "unsafe_rbg", "hash-rademacher", "hash-gaussian"]:
            dt = _timeit(_gen_fn(kind, k, block, nblocks), max_reps=3)
            rate = k * block * nblocks / dt / 1e9
            print(f"{kind:>16} {k:>6} {rate:>8.3f}")
            rows.append({**meta, "table": "generation", "generator": kind, "k": k, "block": block, "gentries_per_s": rate})

    print("\n## projection [B, n] -> [B, k]")
    print(f"{'method':>16} {'n':>10} {'k':>6} {'s/call':>9} {'proj/s':>9} {'G entries/s':>12}  note")
    rng = np.random.default_rng(0)
    methods = ["rademacher", "gaussian", "sjlt-s1", "sjlt-s4", "threefry-blocked", "matmul-W"]
    rates: dict[tuple[str, int], float] = {}  # seconds per (n·k) entry, to predict skipped points
    for n in sorted(int(x) for x in args.n):
        g = jnp.asarray(rng.standard_normal((args.batch, n), dtype=np.float32))
        for k in args.k:
            for method in methods:
                note, secs = "", None
                predicted = rates.get((method, k), 0.0) * n * k
                if method == "matmul-W" and k * n * 4 > args.max_w_gb * 2**30:
                    note = f"W is {k * n * 4 / 2**30:.0f} GiB > --max_w_gb"
                elif predicted > args.budget_s:
                    note = f"skipped, predicted {predicted:.0f} s"
                else:
                    if method == "matmul-W":
                        w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
                        secs = _timeit(_matmul, g, w, max_reps=5)
                        del w
                    elif method == "threefry-blocked":
                        block = max(64, 2**20 // k)
                        n_used = n // block * block
                        secs = _timeit(functools.partial(_threefry_project, k=k, block=block), g[:, :n_used], max_reps=3) * n / n_used
                    else:
                        kind, opts = (method.split("-")[0], {"s": int(method[-1])}) if method.startswith("sjlt") else (method, {})
                        proj = make_projector(kind, k, seed=0, **opts)
                        secs = _timeit(functools.partial(proj.project_leaf, "bench.w"), g, max_reps=5)
                    rates[(method, k)] = secs / (n * k)
                row = {**meta, "table": "projection", "method": method, "n": n, "k": k}
                if secs is not None:
                    row.update(seconds=secs, proj_per_s=args.batch / secs, gentries_per_s=n * k / secs / 1e9)
                    print(f"{method:>16} {n:>10} {k:>6} {secs:>9.4f} {args.batch / secs:>9.1f} {n * k / secs / 1e9:>12.3f}")
                else:
                    row.update(skipped=note, predicted_seconds=predicted or None)
                    print(f"{method:>16} {n:>10} {k:>6} {'-':>9} {'-':>9} {'-':>12}  {note}")
                rows.append(row)
        del g

    if not args.no_save:
        count = append_jsonl(RESULTS, rows)
        print(f"\nappended {count} rows to {os.path.relpath(RESULTS)}")


if __name__ == "__main__":
    main()
