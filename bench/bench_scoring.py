"""Sentence-scoring throughput: lmgrad (JAX) vs transformers (PyTorch) on the same model and batches.

    python bench/bench_scoring.py                                   # SmolLM2-135M, BLiMP, 1 pair/task
    python bench/bench_scoring.py --max_pairs_per_task 4 --batch_size 16 --bf16 --e2e
    python bench/bench_scoring.py --model /ckpt/pythia-70m --tasks term:island_effects

In one process, on the same sentences cut into the same length-bucketed batches
(`lmgrad.tasks.iter_bucketed`, what `score_sequences(pack=False)` builds, one right-padded sentence per
row, as transformers users batch), it measures sentences/s of:

* lmgrad float32: the jitted `make_score_fn(logits_fn(model))` on those batches, after a warm-up pass
  that compiles every bucket shape (compile seconds reported separately, read from jax.monitoring's
  compile-duration events): the like-for-like comparison of the two frameworks' kernels;
* lmgrad packed (`lmgrad_packed`): `score_sequences` as `launch/evaluate.py` calls it, sentences packed
  several to a row (`lmgrad.tasks.iter_packed`), so little compute goes to padding: the same job
  (the same sentences' log-probs), less work;
* transformers float32: `AutoModelForCausalLM` on the same checkpoint, `torch.no_grad()`, torch threads
  = the cores this process may use, the same sum of masked token log-probs computed in torch;
* optionally (--bf16) lmgrad with bfloat16 parameters and compute;
* optionally (--e2e) one `score_sequences(pack=False)` call after the warm-up (the cached scorer
  compiles nothing).

Timed passes of the frameworks are interleaved (jax, torch, [bf16]) repeat by repeat, so load from other
processes on a shared machine hits all of them about alike; the reported rate is the median over
repeats, and the lmgrad/torch ratio is the number to read. Contention does not slow both equally (torch's
OpenMP pool suffers more), so each repeat's ratio and the ratio of the fastest repeats are kept too. Before timing, the log-probs of both float32 paths are
compared (max abs diff printed; exit status 1 if they differ beyond rtol 1e-4 / atol 1e-3, the tolerance
of tests/test_smollm2.py).

Prints a table and appends one JSON line per configuration (float32, packed, bfloat16) to
bench/results/scoring.jsonl.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from _common import append_jsonl, loadavg, results_path, run_meta, usable_cores

RESULTS = results_path("scoring")
RTOL, ATOL = 1e-4, 1e-3  # float32 parity tolerance on sentence log-probs, as in tests/test_smollm2.py


# ----------------------------------------------------------------------------- workload
def make_batches(model: Any, seqs: Sequence[np.ndarray], batch_size: int) -> list[Any]:
    """The batches `score_sequences` would build for `seqs` (same call, same arguments)."""
    from lmgrad.tasks import iter_bucketed

    return list(iter_bucketed(seqs, batch_size=batch_size, max_len=model.max_length))


def gather(batches: Sequence[Any], per_batch: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Per-batch row scores → float64 [n] in the caller's sentence order (padding rows dropped)."""
    out = np.full(n, np.nan, dtype=np.float64)
    for b, lp in zip(batches, per_batch):
        out[b.index[b.valid]] = np.asarray(lp, dtype=np.float64)[b.valid]
    return out


# ----------------------------------------------------------------------------- lmgrad
def lmgrad_pass(score: Callable[..., Any], params: Any, batches: Sequence[Any]) -> list[np.ndarray]:
    """One pass of the `score_sequences` loop body: jitted call, then device→host copy per batch."""
    return [np.asarray(score(params, b.input_ids, b.attention_mask, b.target_mask)) for b in batches]


class CompileClock:
    """Sums jax.monitoring's trace/lower/compile durations while active (jit compiles lazily,
    so compile time hides inside the first call of each shape; these events isolate it)."""

    _EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
               "/jax/core/compile/jaxpr_to_mlir_module_duration",
               "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        import jax.monitoring

        self.seconds = 0.0
        self.compiles = 0
        self._on = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name: str, duration: float, **_: Any) -> None:
        if self._on and name in self._EVENTS:
            self.seconds += duration
            self.compiles += name.endswith("backend_compile_duration")

    def __enter__(self) -> "CompileClock":
        self.seconds, self.compiles, self._on = 0.0, 0, True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._on = False


# ----------------------------------------------------------------------------- transformers
def load_torch_model(model: Any) -> Any:
    """transformers' own float32 load of the checkpoint `model` (an lmgrad LoadedModel) came from."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = model.provenance.get("resolved", model.spec)
    path = pathlib.Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        kw: dict[str, Any] = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    elif path.is_dir():
        kw = dict(pretrained_model_name_or_path=str(path))
    else:  # hub id[@revision], already resolved once by load_model
        repo, _, rev = spec.partition("@")
        kw = dict(pretrained_model_name_or_path=repo, revision=rev or None)
    return AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32).eval()


def torch_logprob(ref: Any, batch: Any) -> np.ndarray:
    """Σ_t target_mask · log p(token t | < t) per row, computed in torch like `lmgrad.scoring`."""
    import torch

    ids = torch.from_numpy(batch.input_ids.astype(np.int64))
    logits = ref(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    lp = torch.gather(logp, -1, ids[:, 1:, None])[..., 0]
    return (lp * torch.from_numpy(batch.target_mask[:, 1:])).sum(-1).numpy()


def torch_pass(ref: Any, batches: Sequence[Any]) -> list[np.ndarray]:
    """One pass over `batches` under `torch.no_grad()`."""
    import torch

    with torch.no_grad():
        return [torch_logprob(ref, b) for b in batches]


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="lmgrad model spec (see lmgrad.models.load_model)")
    ap.add_argument("--tasks", default="blimp", help="task selector (see lmgrad.tasks.select_tasks)")
    ap.add_argument("--max_pairs_per_task", type=int, default=1,
                    help="seeded sample per task; 1 over all 67 BLiMP tasks = 134 sentences, ~3 min on 2 cores")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pair sample")
    ap.add_argument("--batch_size", type=int, default=32, help="sentences per batch (launch/evaluate.py default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per framework; the median is reported")
    ap.add_argument("--threads", type=int, default=usable_cores(), help="torch.set_num_threads")
    ap.add_argument("--omp_wait_policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                    help="OMP_WAIT_POLICY for torch's OpenMP pool. PASSIVE by default: on a shared machine, "
                         "spinning workers fight other processes (torch with 2 threads ran 9x slower at load "
                         "average 7 on 2 cores); 'unset' leaves the environment as it is")
    ap.add_argument("--bf16", action="store_true", help="also time lmgrad with bfloat16 params and compute")
    ap.add_argument("--e2e", action="store_true",
                    help="also time one cold score_sequences call (launch/evaluate.py's number, compile included)")
    ap.add_argument("--no_torch", action="store_true", help="skip transformers (no ratio, no parity check)")
    ap.add_argument("--results", default=RESULTS, help="JSONL file to append to ('' to skip)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/bench_scoring.py", *argv])])

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.omp_wait_policy != "unset":
        if "torch" in sys.modules:  # libgomp reads the variable once, when torch loads it
            print("warning: torch already imported; --omp_wait_policy has no effect", file=sys.stderr)
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    import jax
    import jax.numpy as jnp
    import torch

    from lmgrad.models import load_model
    from lmgrad.models.loading import logits_fn
    from lmgrad.scoring import make_score_fn, score_sequences
    from lmgrad.tasks import encode_pairs, select_tasks

    torch.set_num_threads(args.threads)
    clock = CompileClock()
    load_before = loadavg()

    tasks = select_tasks(args.tasks, max_pairs_per_task=args.max_pairs_per_task, seed=args.seed)
    pairs = [p for t in tasks for p in t.pairs]
    load_s, model = timed(lambda: load_model(args.model, dtype="float32"))
    good, bad, _, _ = encode_pairs(model.tokenizer, pairs, max_length=model.max_length)
    seqs = good + bad
    n = len(seqs)
    batches = make_batches(model, seqs, args.batch_size)
    shapes = sorted({b.shape for b in batches})
    tokens = int(sum(len(s) for s in seqs))
    padded = int(sum(b.input_ids.size for b in batches))
    print(f"{len(tasks)} tasks, {len(pairs)} pairs -> {n} sentences, {tokens} tokens, {len(batches)} batches "
          f"of {args.batch_size} ({padded} padded tokens), shapes {shapes}; lmgrad load {load_s:.1f}s", flush=True)

    # --- lmgrad float32: warm-up pass compiles every bucket shape.
    score = make_score_fn(logits_fn(model))
    runs: dict[str, dict[str, Any]] = {}
    with clock:
        warm_s, out = timed(lambda: lmgrad_pass(score, model.params, batches))
    runs["lmgrad_f32"] = {"fn": lambda: lmgrad_pass(score, model.params, batches), "warmup_s": warm_s,
                          "compile_s": clock.seconds, "compiles": clock.compiles, "lp": gather(batches, out, n)}
    print(f"lmgrad float32 warm-up {warm_s:.1f}s ({clock.compiles} compiles, {clock.seconds:.1f}s compiling)",
          flush=True)

    # --- lmgrad float32, packed rows: `score_sequences`' default (several sentences per row, no
    # padding beyond each row's end); other batches than the bucketed ones, the same sentences.
    with clock:
        warm_s, lp = timed(lambda: score_sequences(model, seqs, batch_size=args.batch_size))
    runs["lmgrad_packed"] = {"fn": lambda: score_sequences(model, seqs, batch_size=args.batch_size),
                             "warmup_s": warm_s, "compile_s": clock.seconds, "compiles": clock.compiles, "lp": lp}
    print(f"lmgrad packed warm-up {warm_s:.1f}s ({clock.compiles} compiles, {clock.seconds:.1f}s compiling)",
          flush=True)

    if args.bf16:
        # Casting the float32 params equals load_model(dtype="bfloat16") (same round-to-nearest cast of the
        # same dequantised tensors) and saves a second checkpoint read; compute follows the param dtype.
        params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params)
        score16 = make_score_fn(logits_fn(model))
        with clock:
            warm_s, out = timed(lambda: lmgrad_pass(score16, params16, batches))
        runs["lmgrad_bf16"] = {"fn": lambda: lmgrad_pass(score16, params16, batches), "warmup_s": warm_s,
                               "compile_s": clock.seconds, "compiles": clock.compiles,
                               "lp": gather(batches, out, n)}
        print(f"lmgrad bfloat16 warm-up {warm_s:.1f}s ({clock.compiles} compiles, {clock.seconds:.1f}s compiling)",
              flush=True)

    torch_load_s = None
    if not args.no_torch:
        torch_load_s, ref = timed(lambda: load_torch_model(model))
        # torch compiles nothing; one untimed pass warms its allocator and thread pool and gives the
        # log-probs for the parity check.
        warm_s, out = timed(lambda: torch_pass(ref, batches))
        runs["torch_f32"] = {"fn": lambda: torch_pass(ref, batches), "warmup_s": warm_s, "compile_s": 0.0,
                             "compiles": 0, "lp": gather(batches, out, n)}
        print(f"transformers load {torch_load_s:.1f}s, warm-up {warm_s:.1f}s", flush=True)

    # --- parity before timing.
    ok = True
    if "torch_f32" in runs:
        ref_lp = runs["torch_f32"]["lp"]
        for name, r in runs.items():
            if name == "torch_f32":
                continue
            r["max_abs_diff"] = float(np.max(np.abs(r["lp"] - ref_lp)))
            r["decisions_agree"] = int(np.sum((r["lp"][:len(pairs)] > r["lp"][len(pairs):])
                                              == (ref_lp[:len(pairs)] > ref_lp[len(pairs):])))
            if name in ("lmgrad_f32", "lmgrad_packed"):
                r["match"] = bool(np.allclose(r["lp"], ref_lp, rtol=RTOL, atol=ATOL))
                ok = ok and r["match"]
            print(f"{name} vs torch_f32: max |Δ log p| = {r['max_abs_diff']:.2e} over {n} sentences "
                  f"(|log p| up to {np.max(np.abs(ref_lp)):.1f}); pair decisions agree "
                  f"{r['decisions_agree']}/{len(pairs)}" + ("" if "match" not in r else
                                                            f"; within rtol {RTOL}/atol {ATOL}: {r['match']}"),
                  flush=True)

    # --- timed passes, interleaved across frameworks.
    for name in runs:
        runs[name]["times"] = []
    for rep in range(args.repeats):
        for name, r in runs.items():
            dt, _ = timed(r["fn"])
            r["times"].append(dt)
        print(f"repeat {rep + 1}/{args.repeats}: " +
              ", ".join(f"{k} {r['times'][-1]:.2f}s" for k, r in runs.items()), flush=True)

    e2e = None
    if args.e2e:
        with clock:
            dt, lp = timed(lambda: score_sequences(model, seqs, batch_size=args.batch_size, pack=False))
        e2e = {"seconds": dt, "sentences_per_s": n / dt, "compile_s": clock.seconds, "compiles": clock.compiles,
               "max_abs_diff_vs_warm": float(np.max(np.abs(lp - runs["lmgrad_f32"]["lp"])))}
        print(f"score_sequences cold call: {dt:.1f}s = {n / dt:.2f} sentences/s "
              f"({clock.compiles} compiles, {clock.seconds:.1f}s compiling)", flush=True)
    load_after = loadavg()

    # --- report.
    for r in runs.values():
        r["median_s"] = statistics.median(r["times"])
        r["sps"] = n / r["median_s"]
    torch_sps = runs["torch_f32"]["sps"] if "torch_f32" in runs else None
    for name, r in runs.items():
        if torch_sps is not None:
            # Contention from other processes hits the two frameworks unequally (torch's OpenMP pool
            # suffers more), so besides the ratio of medians keep each repeat's ratio and the ratio of
            # the fastest repeats, the least disturbed estimate of each framework's own speed.
            tt = runs["torch_f32"]["times"]
            r["ratio_per_repeat"] = [t / s for s, t in zip(r["times"], tt)]
            r["ratio_of_min"] = min(tt) / min(r["times"])
    print(f"\n{'path':<14}{'sent/s':>10}{'median s':>10}{'min s':>8}{'max s':>8}{'compile s':>11}"
          f"{'x torch':>9}{'(of min)':>9}{'max|Δlp|':>10}  per-repeat x torch")
    for name, r in runs.items():
        ratio = "" if torch_sps is None else f"{r['sps'] / torch_sps:.2f}"
        rmin = f"{r['ratio_of_min']:.2f}" if "ratio_of_min" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        per = " ".join(f"{x:.2f}" for x in r.get("ratio_per_repeat", []))
        print(f"{name:<14}{r['sps']:>10.2f}{r['median_s']:>10.2f}{min(r['times']):>8.2f}{max(r['times']):>8.2f}"
              f"{r['compile_s']:>11.1f}{ratio:>9}{rmin:>9}{diff:>10}  {per}")
    if e2e:
        print(f"{'score_seq cold':<14}{e2e['sentences_per_s']:>10.2f}{e2e['seconds']:>10.2f}{'':>16}"
              f"{e2e['compile_s']:>11.1f}")
    if args.repeats < 3:
        print(f"note: {args.repeats} repeat(s); use >= 3 for a median worth recording")
    print(f"load average {load_before} before, {load_after} after, on {usable_cores()} cores "
          "(other processes share this machine; read the ratio, not the absolute rates)")

    if args.results:
        base = {
            **run_meta(command=command),
            "bench": "scoring",
            "torch_threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_before_after": [load_before, load_after],
            "torch_version": torch.__version__,
            "model": model.spec,
            "model_resolved": model.provenance.get("resolved"),
            "num_params": model.provenance.get("num_params"),
            "tasks": args.tasks,
            "max_pairs_per_task": args.max_pairs_per_task,
            "n_sentences": n,
            "n_tokens": tokens,
            "n_padded_tokens": padded,
            "batch_size": args.batch_size,
            "batch_shapes": [list(s) for s in shapes],
            "repeats": args.repeats,
            "torch_sentences_per_s": torch_sps,
            "torch_times_s": runs["torch_f32"]["times"] if torch_sps else None,
        }
        rows = []
        for name in ("lmgrad_f32", "lmgrad_bf16", "lmgrad_packed"):
            if name not in runs:
                continue
            r = runs[name]
            rows.append({**base,
                         "dtype": "bfloat16" if name == "lmgrad_bf16" else "float32",
                         "path": "packed rows (score_sequences)" if name == "lmgrad_packed" else "bucketed batches",
                         "lmgrad_sentences_per_s": r["sps"],
                         "lmgrad_times_s": r["times"],
                         "ratio_lmgrad_over_torch": None if torch_sps is None else r["sps"] / torch_sps,
                         "ratio_of_min_times": r.get("ratio_of_min"),
                         "ratio_per_repeat": r.get("ratio_per_repeat"),
                         "compile_s": r["compile_s"],
                         "compiles": r["compiles"],
                         "warmup_s": r["warmup_s"],
                         "max_abs_logprob_diff_vs_torch_f32": r.get("max_abs_diff"),
                         "pair_decisions_agree": r.get("decisions_agree"),
                         "logprobs_match": r.get("match"),
                         "score_sequences_cold": e2e if name == "lmgrad_f32" else None})
        count = append_jsonl(args.results, rows)
        print(f"appended {count} row(s) to {args.results}")
    if not ok:
        print(f"FAIL: lmgrad float32 log-probs differ from transformers beyond rtol {RTOL} / atol {ATOL}",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
