"""Exact sketch path: pairs/s and peak memory of `make_sketch_fn` against a plain training step.

    python bench/bench_exact.py                     # GPT-2-small shape, B=8, the default grid (~10 min, 2 cores)
    python bench/bench_exact.py --quick             # two points, to check the script runs (~2 min)
    python bench/bench_exact.py --chunks 8 --mesh 2 --sjlt_ks 4096   # chunk = B, and a 2-device mesh (~5 min)

Model: GPT-2 small (12 layers, d=768, vocab 50257, 124.4 M parameters), random init through the Flax
module's `init`; 16-token sentences, B=8 random pairs. Every point runs in its own subprocess, so
`ru_maxrss` is that configuration's peak resident memory (parameters and JAX runtime included).

Points (all on the same [B] batch of pairs):
* ``plain``: `jax.grad` of Σ_b [ℓ(good_b) − ℓ(bad_b)] w.r.t. all params, one batched forward/backward
  (a training step's gradient) — the baseline. Run first and last, to bracket drift in the machine's
  load; ratios use the faster of the two.
* ``norms``: `make_sketch_fn` whose "projection" is each leaf's squared norm ([c, #leaves]): the cost of
  the exact path's per-example gradients alone (jit(vmap(grad)), chunked), almost no projection work.
* ``sjlt`` k=4096 and k=16384: the global sparse JL projection of all 124 M parameters, fused per chunk.
* ``rademacher`` / ``gaussian`` k=1024: dense projections regenerate k·n entries per chunk, minutes per
  batch for all 124 M parameters on this CPU (`lmgrad/sketch/projectors.py`). They run on a subset
  (`--dense_include`, default ``transformer.h.11.attn.c_proj.*``, 0.59 M parameters) beside a ``norms``
  point on the same subset; the full-model time is extrapolated linearly in n:
  t_full ≈ t_norms(all params) + [t_dense(subset) − t_norms(subset)] · n_all / n_subset.

Each for chunk_size ∈ `--chunks` (default 1 4). With ``--mesh N`` the sjlt points also run through
`sharded_sketch_fn` on N fake CPU devices (batch split over ``data``), at the chunk sizes that tile B/N.
Prints a table and appends one JSON line per point to bench/results/exact.jsonl (date, commit, command,
device, jax version, shapes, projector, k, chunk, pairs/s, ratio vs the plain step, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import append_jsonl, loadavg, results_path, run_meta

RESULTS = results_path("exact")
MODEL = "gpt2-small(random)"


def _rss_now_gib() -> float:
    """Current resident set (VmRSS) in GiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------------------------- worker
def _model(seq: int, batch: int):
    """(apply_fn, params, good, bad): GPT-2 small with random weights and a random batch of pairs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers

    from lmgrad.models import build_module, from_hf_config

    config = from_hf_config(transformers.GPT2Config())
    module = build_module(config)
    ids0 = jnp.zeros((1, seq), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), ids0, jnp.ones_like(ids0))["params"]

    def make(seed: int) -> dict:
        r = np.random.default_rng(seed)
        tm = np.ones((batch, seq), np.float32)
        tm[:, 0] = 0  # the first token has no context
        return {"input_ids": r.integers(1, config.vocab_size, (batch, seq)).astype(np.int32),
                "attention_mask": np.ones((batch, seq), np.int32), "target_mask": tm,
                "valid": np.ones(batch, bool)}

    def apply_fn(p, input_ids, attention_mask):
        return module.apply({"params": p}, input_ids, attention_mask)

    return apply_fn, params, make(1), make(2)


def _leaf_sq_norms(grads) -> "jax.Array":
    """[c, #leaves] squared norm of each leaf's per-example gradient: forces every gradient entry to be
    computed while adding almost no work, so a `norms` point times the per-example gradients alone."""
    import jax.numpy as jnp

    return jnp.stack([jnp.sum(jnp.square(grads[n].reshape(grads[n].shape[0], -1).astype(jnp.float32)), axis=1)
                      for n in sorted(grads)], axis=1)


def worker(spec: dict) -> dict:
    """One point in a fresh process: build, first call (compile + run), `reps` timed calls, peak RSS."""
    import math

    devices = spec.get("devices", 1)
    if devices > 1:  # fake CPU devices must be requested before jax initialises its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={devices}").strip()
    import jax

    from lmgrad.grads import make_batch_grad_fn, make_mesh, make_sketch_fn, sharded_sketch_fn
    from lmgrad.params import select as select_params
    from lmgrad.params import flatten as flatten_params
    from lmgrad.sketch import make_projector

    apply_fn, params, good, bad = _model(spec["seq"], spec["batch"])
    flat = flatten_params(params)
    names = select_params(sorted(flat), spec["include"])
    n_selected = int(sum(math.prod(flat[n].shape) for n in names))
    del flat
    rss_init = _rss_now_gib()

    method, chunk = spec["method"], spec["chunk"]
    if method == "plain":
        fn = make_batch_grad_fn(apply_fn, names)
    else:
        project = _leaf_sq_norms if method == "norms" else make_projector(method, spec["k"], 0).project
        if devices > 1:
            fn = sharded_sketch_fn(apply_fn, names, project, make_mesh(devices), chunk_size=chunk)
        else:
            fn = make_sketch_fn(apply_fn, names, project, chunk_size=chunk)

    t = time.perf_counter()
    jax.block_until_ready(fn(params, good, bad))
    first = time.perf_counter() - t
    times = []
    for _ in range(spec["reps"]):
        t = time.perf_counter()
        jax.block_until_ready(fn(params, good, bad))
        times.append(time.perf_counter() - t)
    sec = min(times)
    return {
        **spec, "n_params_selected": n_selected, "n_selected_tensors": len(names),
        "sec_per_call": sec, "times": times, "first_call_s": first, "compile_s_est": max(first - sec, 0.0),
        "pairs_per_s": spec["batch"] / sec, "rss_after_init_gib": rss_init,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _run_worker(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {**spec, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- driver
def _meta() -> dict:
    return run_meta(model=MODEL, n_layer=12, d_model=768, vocab=50257)


def _points(args) -> list[dict]:
    base = {"batch": args.batch, "seq": args.seq, "reps": args.reps, "devices": 1}
    full = {**base, "include": None, "subset": "all"}
    sub = {**base, "include": args.dense_include, "subset": ",".join(args.dense_include)}
    plain = {**full, "method": "plain", "k": None, "chunk": None}
    if args.quick:
        return [plain, {**full, "method": "sjlt", "k": 4096, "chunk": 4}]
    pts = [plain]
    for c in args.chunks:
        pts.append({**full, "method": "norms", "k": None, "chunk": c})
        pts += [{**full, "method": "sjlt", "k": k, "chunk": c} for k in args.sjlt_ks]
    if args.mesh > 1:
        # Chunks that tile each device's B/N rows exactly: the sharded path pads B to a multiple of
        # N·chunk, and padded rows cost as much as real ones.
        per_dev = args.batch // args.mesh
        mesh_chunks = sorted({c for c in args.chunks if args.batch % (args.mesh * c) == 0} | {per_dev})
        pts += [{**full, "method": "sjlt", "k": k, "chunk": c, "devices": args.mesh}
                for c in mesh_chunks for k in args.sjlt_ks]
    for c in args.chunks:
        pts.append({**sub, "method": "norms", "k": None, "chunk": c})
        pts += [{**sub, "method": kind, "k": args.dense_k, "chunk": c} for kind in args.dense_kinds]
    return pts + [dict(plain)]


def _extrapolate(rows: list[dict], n_all: int, plain_s: float) -> list[dict]:
    """Full-model estimates for the dense kinds measured on a subset (see the module docstring)."""
    ok = [r for r in rows if "error" not in r]
    norms_all = {r["chunk"]: r for r in ok if r["method"] == "norms" and r["subset"] == "all"}
    norms_sub = {r["chunk"]: r for r in ok if r["method"] == "norms" and r["subset"] != "all"}
    out = []
    for r in ok:
        if r["subset"] == "all" or r["method"] in ("norms", "plain"):
            continue
        c = r["chunk"]
        if c not in norms_all or c not in norms_sub:
            continue
        proj_sub = max(r["sec_per_call"] - norms_sub[c]["sec_per_call"], 0.0)
        sec = norms_all[c]["sec_per_call"] + proj_sub * n_all / r["n_params_selected"]
        out.append({**{k: r[k] for k in ("batch", "seq", "method", "k", "chunk")}, "subset": "all (extrapolated)",
                    "extrapolated_from": r["subset"], "n_params_selected": n_all, "sec_per_call": sec,
                    "projection_s_on_subset": proj_sub, "pairs_per_s": r["batch"] / sec,
                    "ratio_vs_plain": plain_s / sec, "time_x_plain": sec / plain_s, "peak_rss_gib": None})
    return out


def _label(row: dict) -> str:
    d = row.get("devices", 1)
    return row["method"] + (f"/{d}dev" if d > 1 else "")


def _fmt(v, spec: str) -> str:
    """format(v, spec), or a dash right-aligned to the spec's width for a missing value."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8, help="pairs per call")
    ap.add_argument("--seq", type=int, default=16, help="tokens per sentence")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per point after the first (min is reported)")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--sjlt_ks", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dense_kinds", nargs="+", default=["rademacher", "gaussian"])
    ap.add_argument("--dense_k", type=int, default=1024)
    ap.add_argument("--dense_include", nargs="+", default=["transformer.h.11.attn.c_proj.*"],
                    help="parameter patterns the dense kinds are measured on (lmgrad.params.select syntax)")
    ap.add_argument("--mesh", type=int, default=1,
                    help="N > 1: also run the sjlt points through sharded_sketch_fn on N fake CPU devices")
    ap.add_argument("--quick", action="store_true", help="plain + one sjlt point only")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--no_write", action="store_true", help="print only, append nothing")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    meta, load0, t_start = _meta(), loadavg(), time.perf_counter()
    rows = []
    head = (f"{'projector':11s} {'k':>6s} {'chunk':>5s} {'params':>9s} {'s/call':>7s} {'pairs/s':>8s} "
            f"{'x plain':>7s} {'RSS GiB':>7s} {'compile':>7s}")
    print(head, flush=True)
    for spec in _points(args):
        row = _run_worker(spec)
        rows.append(row)
        if "error" in row:
            print(spec["method"], spec["k"], spec["chunk"], "ERROR:", row["error"][-600:], flush=True)
            continue
        print(f"{_label(row):11s} {_fmt(row['k'], '6d')} {_fmt(row['chunk'], '5d')} "
              f"{row['n_params_selected'] / 1e6:8.2f}M {row['sec_per_call']:7.2f} {row['pairs_per_s']:8.2f} "
              f"{'':7s} {row['peak_rss_gib']:7.2f} {row['compile_s_est']:7.1f}", flush=True)
    plains = [r["sec_per_call"] for r in rows if r.get("method") == "plain" and "error" not in r]
    if not plains:
        sys.exit("bench_exact: the plain baseline failed; no ratios")
    plain_s = min(plains)
    n_all = next(r["n_params_selected"] for r in rows if r.get("method") == "plain" and "error" not in r)
    for r in rows:
        if "error" not in r:
            r["ratio_vs_plain"] = plain_s / r["sec_per_call"]  # = pairs/s ÷ plain pairs/s
            r["time_x_plain"] = r["sec_per_call"] / plain_s
    rows += _extrapolate(rows, n_all, plain_s)
    load1 = loadavg()
    wall = time.perf_counter() - t_start

    print(f"\nplain step: {', '.join(f'{s:.2f}' for s in plains)} s/call (ratios vs {plain_s:.2f}); "
          f"load {load0} -> {load1}; {wall / 60:.1f} min")
    print(f"{'projector':11s} {'k':>6s} {'chunk':>5s} {'params':>22s} {'pairs/s':>8s} {'x plain time':>12s} "
          f"{'rel. pairs/s':>12s} {'RSS GiB':>7s}")
    for r in rows:
        if "error" in r:
            continue
        where = r["subset"] if r["subset"] in ("all", "all (extrapolated)") else "subset"
        where = f"{where} {r['n_params_selected'] / 1e6:.2f}M"
        print(f"{_label(r):11s} {_fmt(r['k'], '6d')} {_fmt(r['chunk'], '5d')} "
              f"{where:>22s} {r['pairs_per_s']:8.3f} "
              f"{r['time_x_plain']:12.2f} {r['ratio_vs_plain']:12.3f} {_fmt(r['peak_rss_gib'], '7.2f')}")
    if args.no_write:
        return
    n = append_jsonl(args.results, ({**meta, "bench": "exact", "load_before": load0, "load_after": load1,
                                     "plain_s": plain_s, **r} for r in rows))
    print(f"appended {n} lines to {os.path.relpath(args.results)}")


if __name__ == "__main__":
    main()
