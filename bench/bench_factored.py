"""Factored (Kronecker) sketches: speed, memory and fidelity.

    python bench/bench_factored.py                 # GPT-2-small shape: factored vs plain step vs exact vmap(grad)
    python bench/bench_factored.py --smollm2       # cosine-similarity fidelity on SmolLM2-135M over a BLiMP sample

Speed table (GPT-2 small: 12 layers, d=768, vocab 50257, random init via the Flax module's `init`;
16-token sentences): every (method, B, r) point runs in its own subprocess so `ru_maxrss` is that
method's peak resident memory. Methods, all on the same [B] batch of pairs:
* ``factored``: `make_factored_sketch_fn` (one batched forward/backward w.r.t. activations);
* ``plain``: `jax.grad` of Σ_b [ℓ(good_b) − ℓ(bad_b)] w.r.t. all params (a training step's gradient);
* ``exact``: `jit(vmap(grad))` full per-pair differentials (the exact path before any projection).
FLOPs per call come from XLA's cost analysis of the compiled program; achieved FLOP/s is compared
with a 2048³ float32 matmul measured in the same run.

Fidelity (``--smollm2``): Pearson correlation, over pair-pair entries, between cosine similarities
of factored sketches (several r) and of exact per-pair gradients (all parameters) sketched by a
sparse JL projection with large k (error ≈ 1/√k). Rows append to bench/results/factored.jsonl.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import append_jsonl, results_path, run_meta

RESULTS = results_path("factored")


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops")) if ca and ca.get("flops") is not None else None
    except Exception:  # cost analysis is best-effort across backends
        return None


def _time(fn, args, reps: int) -> float:
    import jax

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------- worker
def worker(method: str, batch: int, r: int, seq: int, reps: int) -> dict:
    """One measurement in a fresh process: compile, time `reps` calls, report peak RSS."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn
    from lmgrad.models import build_module, from_hf_config
    from lmgrad.scoring import sequence_logprob

    config = from_hf_config(transformers.GPT2Config())  # GPT-2 small
    module = build_module(config)
    rng = np.random.default_rng(0)
    ids0 = jnp.zeros((1, seq), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), ids0, jnp.ones_like(ids0))["params"]

    def make(seed):
        r_ = np.random.default_rng(seed)
        ids = r_.integers(1, config.vocab_size, (batch, seq)).astype(np.int32)
        tm = np.ones((batch, seq), np.float32)
        tm[:, 0] = 0
        return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq), jnp.int32),
                "target_mask": jnp.asarray(tm), "valid": jnp.ones(batch, bool)}

    good, bad = make(1), make(2)
    del rng

    def nll(p, ids, am, tm):
        return -sequence_logprob(module.apply({"params": p}, ids, am), ids, tm)

    if method == "factored":
        fn = make_factored_sketch_fn(module, FactoredSpec(seed=0, r_in=r, r_out=r), params=params)
        factors = fn.factors()
        jitted, args = fn._jit, (params, good, bad, factors)
        k = fn.dim
    elif method == "plain":
        def step(p, g, b):
            cat = {key: jnp.concatenate([g[key], b[key]]) for key in ("input_ids", "attention_mask", "target_mask")}
            sign = jnp.concatenate([jnp.ones(batch), -jnp.ones(batch)])
            return jax.grad(lambda q: jnp.sum(sign * nll(q, cat["input_ids"], cat["attention_mask"], cat["target_mask"])))(p)

        jitted, args, k = jax.jit(step), (params, good, bad), None
    elif method == "exact":
        def one(p, gi, ga, gt, bi, ba, bt):
            return jax.grad(lambda q: nll(q, gi[None], ga[None], gt[None])[0] - nll(q, bi[None], ba[None], bt[None])[0])(p)

        def per_example(p, g, b):
            return jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0, 0))(
                p, g["input_ids"], g["attention_mask"], g["target_mask"], b["input_ids"], b["attention_mask"], b["target_mask"])

        jitted, args, k = jax.jit(per_example), (params, good, bad), None
    elif method == "matmul":
        n = 2048
        a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
        jitted, args, k = jax.jit(lambda x, y: x @ y), (a, a), None
    else:
        raise ValueError(method)
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t
    flops = 2 * 2048**3 if method == "matmul" else _flops(compiled)
    jax.block_until_ready(compiled(*args))  # warm-up
    sec = _time(compiled, args, reps)
    return {
        "bench": "speed", "model": "gpt2-small(random)", "method": method, "batch_pairs": batch, "seq": seq,
        "r": r if method == "factored" else None, "k": k, "sec_per_call": sec,
        "pairs_per_s": batch / sec if method != "matmul" else None, "compile_s": compile_s,
        "flops_per_call": flops, "gflops_per_s": None if flops is None else flops / sec / 1e9,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _run_worker(method: str, batch: int, r: int, seq: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--batch", str(batch), "--r", str(r), "--seq", str(seq),
           "--reps", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"bench": "speed", "method": method, "batch_pairs": batch, "r": r, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(args) -> list[dict]:
    points = [("matmul", 0, 0), ("plain", 8, 0), ("exact", 8, 0), ("factored", 8, 16)]
    points += [("factored", b, 16) for b in args.batches if b != 8] + [("factored", 8, r) for r in args.rs if r != 16]
    meta, rows = run_meta(), []
    print(f"{'method':9s} {'B':>3s} {'r':>4s} {'s/call':>8s} {'pairs/s':>8s} {'GFLOP/s':>8s} {'GFLOP':>8s} {'RSS GiB':>8s}")
    for method, b, r in points:
        row = {**meta, **_run_worker(method, b, r, args.seq, args.reps)}
        rows.append(row)
        if "error" in row:
            print(method, b, r, "ERROR", row["error"][-400:])
            continue
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"{method:9s} {b:3d} {r:4d} {row['sec_per_call']:8.3f} {f(row['pairs_per_s'], '8.2f')} "
              f"{f(row['gflops_per_s'], '8.1f')} {f(row['flops_per_call'] and row['flops_per_call'] / 1e9, '8.1f')} "
              f"{row['peak_rss_gib']:8.2f}")
    by = {(x["method"], x.get("batch_pairs"), x.get("r")): x for x in rows if "error" not in x}
    fac, plain, exact = by.get(("factored", 8, 16)), by.get(("plain", 8, 0)), by.get(("exact", 8, 0))
    if fac and plain and exact:
        summary = {**meta, "bench": "speed_summary", "model": "gpt2-small(random)", "batch_pairs": 8, "r": 16,
                   "speedup_vs_plain": plain["sec_per_call"] / fac["sec_per_call"],
                   "speedup_vs_exact": exact["sec_per_call"] / fac["sec_per_call"],
                   "goal_plain_1.5x": plain["sec_per_call"] / fac["sec_per_call"] >= 1.5,
                   "goal_exact_4x": exact["sec_per_call"] / fac["sec_per_call"] >= 4}
        rows.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if k.startswith(("speedup", "goal"))}))
    return rows


# ----------------------------------------------------------------------------------- fidelity
def fidelity(args) -> list[dict]:
    import jax
    import numpy as np

    from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn
    from lmgrad.models import load_model
    from lmgrad.sketch import make_projector
    from lmgrad.tasks import select_tasks
    from lmgrad.tasks.batching import encode_pairs, iter_pair_batches

    model = load_model("smollm2")
    tasks = select_tasks("blimp", max_pairs_per_task=args.pairs_per_task)
    pairs = [p for t in tasks for p in t.pairs]
    good, bad, sg, sb = encode_pairs(model.tokenizer, pairs)
    batches = list(iter_pair_batches(good, bad, batch_size=args.fid_batch, score_from_good=sg, score_from_bad=sb))
    n = len(pairs)
    print(f"SmolLM2-135M, {len(tasks)} tasks, {n} pairs, {len(batches)} batches")

    def collect(fn) -> np.ndarray:
        out = None
        for g, b in batches:
            s = np.asarray(fn(g, b))
            out = np.zeros((n, s.shape[1]), np.float32) if out is None else out
            out[g.index[g.valid]] = s[g.valid]
        return out

    def cos(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        return x @ x.T

    # Reference: exact per-pair gradient differentials, all parameters, through a large-k sparse JL.
    from lmgrad.grads import make_sketch_fn
    from lmgrad.models import logits_fn
    from lmgrad.params import flatten as flatten_params

    names = sorted(flatten_params(model.params))
    proj = make_projector("sjlt", args.ref_k, 1234)
    ref_fn = make_sketch_fn(logits_fn(model), names, proj.project, chunk_size=1)
    t = time.perf_counter()
    ref = collect(lambda g, b: ref_fn(model.params, g, b))
    ref_s = time.perf_counter() - t
    iu = np.triu_indices(n, 1)
    c_ref = cos(ref)[iu]
    print(f"reference: exact grads + sjlt k={args.ref_k}: {ref_s:.1f} s ({n / ref_s:.2f} pairs/s)")
    meta, rows = run_meta(), []
    for r in args.fid_rs:
        fn = make_factored_sketch_fn(model, FactoredSpec(seed=0, r_in=r, r_out=r))
        t = time.perf_counter()
        sk = collect(lambda g, b: fn(model.params, g, b)[0])
        sec = time.perf_counter() - t
        c = cos(sk)[iu]
        corr = float(np.corrcoef(c, c_ref)[0, 1])
        row = {**meta, "bench": "fidelity", "model": "smollm2-135m", "pairs": n, "r": r, "k": fn.dim,
               "ref": f"exact+sjlt k={args.ref_k}", "pearson_cos": corr,
               "mean_abs_cos_err": float(np.mean(np.abs(c - c_ref))), "ref_cos_std": float(np.std(c_ref)),
               "factored_s": sec, "ref_s": ref_s, "goal_0.95": corr > 0.95}
        rows.append(row)
        print(f"r={r:3d} K={fn.dim:7d}  pearson(cos)={corr:.4f}  mean|Δcos|={row['mean_abs_cos_err']:.4f}  "
              f"({sec:.1f} s incl. compile)")
    # Noise floor of the reference itself: a second SJLT seed of the same exact gradients would need a
    # second pass; report the theoretical 1/√k instead.
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--rs", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--pairs_per_task", type=int, default=2)
    ap.add_argument("--fid_batch", type=int, default=16)
    ap.add_argument("--fid_rs", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--ref_k", type=int, default=65536)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.r, args.seq, args.reps)))
        return
    rows = fidelity(args) if args.smollm2 else speed(args)
    append_jsonl(RESULTS, rows)


if __name__ == "__main__":
    main()
