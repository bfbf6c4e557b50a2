"""Compile time of SmolLM2-135M (30 layers) with scanned against unrolled layers, and the persistent cache.

    python bench/bench_compile.py            # the full measurement (~10 min on 2 loaded cores)
    python bench/bench_compile.py --quick    # scoring forward only, no cache workers
    python bench/bench_compile.py --only factored   # one function (score | differential | factored)

One process, one model (`load_model("smollm2")`, float32), with JAX's persistent compilation cache
off for the in-process points so every compile is a real one. For each of ``unrolled``
(`scan_layers=False`, one traced copy per block) and ``scan`` (`scan_layers=True`, one `lax.scan`
body), and each function:

* ``score``: `make_score_fn(logits_fn(model))`, the jitted forward of `score_sequences`, at one
  BLiMP bucket shape (B=16 sentences, T=32 tokens);
* ``differential``: `per_example_core` (what `make_per_example_fn` / `make_sketch_fn` jit) over every
  parameter, B=4 pairs of T=16 tokens, chunk 1, reduced per example to each parameter's squared norm
  (the exact path's per-example gradients without a projection's cost);
* ``factored``: the factored sketch (`FactoredSketchFn.core`, lmgrad's default ranks, factors as an
  argument) at the default run's batch, B=16 pairs of T=16 tokens; scanned, the blocks' x and δ are
  recorded stacked over the scan (`lmgrad.models.layers.run_layers`);

it times `jax.jit(f).lower(...)` (trace + lowering to HLO) and `.compile()` separately (AOT), then the
median of a few calls of the compiled executable, and checks the two modes' outputs agree.

Then (without ``--quick``) two fresh worker processes share an empty temporary cache directory
(`lmgrad.compilation.enable_compilation_cache`): each loads the model and compiles the scanned
``score``; the second finds the first's executable on disk. The second worker also perturbs every
parameter (another "checkpoint" of the same architecture) and checks the cached executable's
output moves with it.

Writes bench/results/compile.json (overwritten: one run's numbers, with its command, commit, CPU and
load averages before and after each point; the machine's 2 cores are shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, loadavg, run_meta

RESULT = RESULTS_DIR / "compile.json"


def _load(scan: bool = False):
    from lmgrad.models import load_model

    return load_model("smollm2", dtype="float32", scan_layers=scan)


def _score_args(model, b: int, t: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1, model.config.vocab_size, (b, t)).astype(np.int32)
    am = np.ones((b, t), np.int32)
    am[b // 2:, t // 2:] = 0  # ragged rows, as in a bucket
    tm = am.astype(np.float32)
    tm[:, 0] = 0
    return ids, am, tm


def _pairs(model, b: int, t: int):
    import numpy as np

    rng = np.random.default_rng(1)

    def make():
        ids = rng.integers(1, model.config.vocab_size, (b, t)).astype(np.int32)
        am = np.ones((b, t), np.int32)
        tm = am.astype(np.float32)
        tm[:, 0] = 0
        return {"input_ids": ids, "attention_mask": am, "target_mask": tm, "valid": np.ones(b, bool)}

    return make(), make()


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def _measure(fn, args: tuple, runs: int) -> dict[str, Any]:
    """AOT trace+lower and compile seconds, then the median of `runs` calls, and the last output."""
    import jax
    import numpy as np

    load0 = loadavg()
    lower_s, lowered = _timed(lambda: jax.jit(fn).lower(*args))
    compile_s, compiled = _timed(lowered.compile)
    times, out = [], None
    for _ in range(runs):
        dt, out = _timed(lambda: jax.block_until_ready(compiled(*args)))
        times.append(dt)
    return {"lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3),
            "total_compile_s": round(lower_s + compile_s, 3), "run_s": round(float(np.median(times)), 4),
            "runs": runs, "loadavg_before": load0, "loadavg_after": loadavg()}, out


def in_process(quick: bool, only: str | None = None) -> dict[str, Any]:
    os.environ["LMGRAD_COMPILATION_CACHE"] = "off"  # real compiles only
    import jax
    import numpy as np

    from lmgrad.grads.differential import per_example_core
    from lmgrad.models import build_module
    from lmgrad.params import flatten, split
    from lmgrad.scoring import sequence_logprob

    model = _load()
    results: dict[str, Any] = {"model": {"spec": "smollm2", "num_layers": model.config.num_layers,
                                         "num_params": model.provenance["num_params"]}}
    modules = {name: build_module(dataclasses.replace(model.config, scan_layers=scan))
               for name, scan in (("unrolled", False), ("scan", True))}

    want = (lambda key: only == key) if only else (lambda key: key == "score" or not quick)
    ids, am, tm = _score_args(model, 16, 32)
    outs = {}
    for name, module in modules.items() if want("score") else ():
        results.setdefault("score", {"shape": [16, 32]})
        def score(params, ids, am, tm, module=module):
            return sequence_logprob(module.apply({"params": params}, ids, am), ids, tm)

        results["score"][name], outs[name] = _measure(score, (model.params, ids, am, tm), runs=5)
        print(f"score {name}: {results['score'][name]}", flush=True)
    if outs:
        results["score"]["max_abs_diff"] = float(np.max(np.abs(np.asarray(outs["unrolled"]) - np.asarray(outs["scan"]))))

    if want("differential"):
        good, bad = _pairs(model, 4, 16)
        selected = sorted(flatten(model.params))
        trainable, frozen = split(model.params, selected)
        results["differential"] = {"shape": [4, 16], "chunk_size": 1, "selected": len(selected)}
        outs = {}
        for name, module in modules.items():
            def apply(params, i, a, module=module):
                return module.apply({"params": params}, i, a)

            def norms(grads):
                return jax.numpy.stack([jax.numpy.sum(jax.numpy.square(grads[k]).reshape(grads[k].shape[0], -1), axis=1)
                                        for k in sorted(grads)], axis=1)

            core = per_example_core(apply, 1, norms)
            results["differential"][name], outs[name] = _measure(core, (trainable, frozen, good, bad), runs=2)
            print(f"differential {name}: {results['differential'][name]}", flush=True)
        a, b = np.asarray(outs["unrolled"]), np.asarray(outs["scan"])
        results["differential"]["max_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    if want("factored"):
        from lmgrad.grads.factored import FactoredSketchFn, FactoredSpec

        good, bad = _pairs(model, 16, 16)
        results["factored"] = {"shape": [16, 16], "spec": "FactoredSpec() (lmgrad's default ranks)"}
        outs = {}
        for name, module in modules.items():
            fn = FactoredSketchFn(module, model.params, FactoredSpec())
            results["factored"][name], outs[name] = _measure(
                lambda p, g, b, f, fn=fn: fn.core(p, g, b, f), (model.params, good, bad, fn.factors()), runs=3)
            print(f"factored {name}: {results['factored'][name]}", flush=True)
        a, b = np.asarray(outs["unrolled"]), np.asarray(outs["scan"])
        results["factored"]["max_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    for key in ("score", "differential", "factored"):
        if key in results:
            r = results[key]
            r["compile_speedup"] = round(r["unrolled"]["total_compile_s"] / r["scan"]["total_compile_s"], 2)
            r["run_ratio_scan_over_unrolled"] = round(r["scan"]["run_s"] / r["unrolled"]["run_s"], 3)
    return results


def worker(cache: str, perturb: bool) -> dict[str, Any]:
    """One cold process: load, enable the cache at `cache`, compile and run the scanned score fn."""
    import jax
    import jax.monitoring
    import numpy as np

    from lmgrad.compilation import enable_compilation_cache
    from lmgrad.models import logits_fn
    from lmgrad.scoring import make_score_fn

    events: list[str] = []
    jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
    os.environ["LMGRAD_COMPILATION_CACHE"] = cache
    load_s, model = _timed(lambda: _load(scan=True))
    assert enable_compilation_cache() == Path(cache)
    params = model.params
    if perturb:
        params = jax.tree.map(lambda x: x * 1.01, params)
    args = _score_args(model, 16, 32)
    load0 = loadavg()
    lower_s, lowered = _timed(lambda: make_score_fn(logits_fn(model)).lower(params, *args))
    compile_s, compiled = _timed(lowered.compile)
    out = np.asarray(compiled(params, *args))
    return {"load_s": round(load_s, 2), "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3),
            "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
            "cache_misses": events.count("/jax/compilation_cache/cache_misses"),
            "perturbed_params": perturb, "logprob_sum": float(out.sum()),
            "loadavg_before": load0, "loadavg_after": loadavg()}


def cache_workers() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lmgrad-jaxcache-") as cache:
        for name, perturb in (("cold", False), ("warm_other_checkpoint", True)):
            proc = subprocess.run([sys.executable, __file__, "--worker", cache] + (["--perturb"] if perturb else []),
                                  capture_output=True, text=True, check=True)
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"cache {name}: {out[name]}", flush=True)
        out["entries"] = len(os.listdir(cache))
    out["compile_speedup"] = round(out["cold"]["compile_s"] / out["warm_other_checkpoint"]["compile_s"], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="scoring forward only, no cache workers")
    ap.add_argument("--only", choices=("score", "differential", "factored"),
                    help="measure one function (no cache workers); writes compile_<name>.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--perturb", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.perturb)))
        return
    meta = run_meta()
    results = in_process(args.quick, args.only)
    if not args.quick and not args.only:
        results["persistent_cache"] = cache_workers()
    results = {**meta, **results, "loadavg_end": loadavg()}
    out = RESULT if not args.only else RESULT.with_name(f"compile_{args.only}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
