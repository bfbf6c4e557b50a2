"""One entry point for lmgrad's benchmarks: ``python -m bench run --suite=NAME [suite flags]``.

    python -m bench list                                   # the suites and what each measures
    python -m bench run --suite=speed                      # factored vs plain step, matmul, PyTorch peers
    python -m bench run --suite=speed --seqs 16 128 --batches 8
    python -m bench run --suite=scaling                    # pairs/s and memory vs B, T, width, depth, r (+ plots)
    python -m bench report --since 2026-12-01T01:58        # scaling plots and table from the runs since then
    python -m bench run --suite=fusion                     # the factored path's variants, ratios in one run
    python -m bench run --suite=scoring -- --bf16 --e2e    # older benches: flags after -- go to the script

Every suite prints a table and appends one JSON line per measurement to ``bench/results/<suite>.jsonl``
(fields from `_common.run_meta`: date, commit, command, host, versions, device, cores, load average;
then model shape, seq, batch, method, k or r, pairs/s, tokens/s, FLOP/s, peak memory, compile time).
The suites ``speed``, ``scaling`` and ``fusion`` also write their latest table, with the command that
made it, to ``bench/results/<suite>.md``. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the scripts' own `import _common`, and `peers`
# Torch's spinning OpenMP workers starve everything else on a shared machine (bench/README.md, scoring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Suites that are the older per-stage scripts, run unchanged (their flags after `--`).
SCRIPTS = {
    "scoring": ("bench_scoring.py", "sentences/s of BLiMP scoring: lmgrad vs transformers (SmolLM2-135M)"),
    "projectors": ("bench_projectors.py", "projection generators and [B, n] → k projection rates"),
    "factored": ("bench_factored.py", "the first factored bench (per-method processes; --smollm2 fidelity)"),
    "exact": ("bench_exact.py", "exact per-example path: vmap(grad) + projection, chunking"),
    "fidelity": ("bench_fidelity.py", "factored sketch fidelity vs exact gradients (SmolLM2; --stage ...)"),
    "stats": ("bench_stats.py", "task-similarity statistics: coverage and preconditioner curves"),
    "transfer": ("bench_transfer.py", "FTGD tuning: vmapped vs sequential"),
    "sweep_reuse": ("bench_sweep_reuse.py", "a sweep's per-checkpoint sketch time: memoised sketcher vs re-trace"),
    "kernels": ("bench_kernels.py", "GPT-2-small components (attention, bmm, MLP, vocabulary head) in JAX vs torch"),
    "sketch_stage": ("bench_sketch_stage.py", "the main job's sketch stage (SmolLM2, BLiMP): packed pairs vs length buckets"),
    "probe_stage": ("bench_probe_stage.py", "the FTGD probe job (SmolLM2, BLiMP): packed rows vs length buckets"),
}
NATIVE = {
    "speed": "factored sketch vs plain step, large matmul, PyTorch hook and vmap peers; ratios in one process",
    "scaling": "factored (and exact per-example) pairs/s and memory vs batch, length, width, depth, rank (plots)",
    "fusion": "factored path implementation variants on one batch, interleaved (ratios, bitwise check)",
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the suites")
    rep = sub.add_parser("report", help="scaling: plots and results/scaling.md from the recorded lines of runs since a date")
    rep.add_argument("--since", required=True, help="ISO date/time: the runs (their `date`) to include")
    run = sub.add_parser("run", help="run one suite")
    run.add_argument("--suite", required=True, choices=sorted({**SCRIPTS, **NATIVE}))
    run.add_argument("--shapes", nargs="+", default=["gpt2-small"], help="GPT-2 shapes (speed, fusion)")
    run.add_argument("--seqs", type=int, nargs="+", default=[16, 128], help="tokens per sentence (speed, fusion)")
    run.add_argument("--batches", type=int, nargs="+", default=[8], help="pairs per call (speed, fusion)")
    run.add_argument("--r", type=int, default=None, help="uniform rank (default: lmgrad's default ranks)")
    run.add_argument("--reps", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    run.add_argument("--peers", nargs="*", default=["torch_hooks", "torch_vmap", "torch_plain"])
    run.add_argument("--vmap_chunk", type=int, default=4, help="pairs per torch.func vmap call (memory)")
    run.add_argument("--matmul_n", type=int, default=2048)
    run.add_argument("--variants", nargs="+", default=["loop", "grouped"], help="fusion: FactoredSketchFn(fuse=...)")
    run.add_argument("--vectors", default="project", help="fusion: handle_vectors of the spec")
    run.add_argument("--scaling_layers", type=int, default=2,
                     help="scaling: blocks of the GPT-2 shapes in the batch/seq/width/r sweeps (0: their own depth)")
    run.add_argument("--sweep_batches", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    run.add_argument("--sweep_batches_exact", type=int, nargs="*", default=[1, 4, 16],
                     help="scaling: B of the exact per-example path (jit(vmap(grad)), all parameters)")
    run.add_argument("--sweep_batches_medium", type=int, nargs="*", default=[])
    run.add_argument("--sweep_batches_plain", type=int, nargs="*", default=[])
    run.add_argument("--sweep_seqs", type=int, nargs="*", default=[16, 32, 64, 128, 256, 512])
    run.add_argument("--seq_batch", type=int, default=1)
    run.add_argument("--sweep_shapes", nargs="*", default=["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    run.add_argument("--sweep_shapes_exact", nargs="*", default=["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    run.add_argument("--width_batch", type=int, default=4, help="scaling: B of the width, depth and r sweeps")
    run.add_argument("--sweep_depths", type=int, nargs="*", default=[2, 4, 8, 12], help="scaling: blocks at d=768")
    run.add_argument("--sweep_depths_exact", type=int, nargs="*", default=[2, 4, 8, 12])
    run.add_argument("--sweep_rs", type=int, nargs="*", default=[4, 16, 64])
    run.add_argument("--run_max_gib", type=float, default=1.5,
                     help="scaling: a point whose XLA plan (temp + outputs) is larger is compiled only (memory analysis)")
    run.add_argument("--point_timeout", type=int, default=600, help="scaling: seconds before a point is given up")
    run.add_argument("--no_write", action="store_true", help="print only; append nothing")
    run.add_argument("rest", nargs=argparse.REMAINDER, help="(older suites) flags for the script, after --")
    return ap


def _write_latest(suite: str, command: str, table: str, rows: list[dict]) -> None:
    meta = next((r for r in rows if "error" not in r), rows[0] if rows else {})
    loads = [r["loadavg"] for r in rows if r.get("loadavg") is not None]
    load = f"{min(loads)}–{max(loads)} (per point in the table)" if len(set(loads)) > 1 else meta.get("loadavg")
    cmd = command if command.startswith("`") else f"`{command}`"
    text = (f"# `{suite}`: latest run\n\nCommand {cmd}, commit `{meta.get('commit')}`, {meta.get('date')}, "
            f"device {meta.get('device')} ({meta.get('cores')} cores, {meta.get('cpu')}), jax {meta.get('jax')}, "
            f"load average {load}.\n\n{table}\n")
    with open(os.path.join(HERE, "results", f"{suite}.md"), "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_point"]:  # a scaling point in its own process
        import speed

        print(json.dumps(speed.scaling_point(*json.loads(argv[1]))))
        return 0
    args = _parser().parse_args(argv)
    if args.cmd == "report":  # several scaling runs (e.g. 2 blocks and full depth) in one set of plots
        import speed
        from _common import results_path

        rows = speed.scaling_rows(results_path("scaling"), args.since)
        paths = speed.plot_scaling(rows, os.path.join(HERE, "results"))
        commands = sorted({r["command"] for r in rows}, key=lambda c: min(r["date"] for r in rows if r["command"] == c))
        table = (speed.scaling_table(rows) + "\n\n" + "\n".join(
            f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths))
        print(table)
        _write_latest("scaling", " && ".join(f"`{c}`" for c in commands) + f", then `python -m bench report --since {args.since}`",
                      table, rows)
        return 0
    if args.cmd == "list":
        for name, (script, what) in sorted(SCRIPTS.items()):
            print(f"{name:11s} {what}  [bench/{script}]")
        for name, what in sorted(NATIVE.items()):
            print(f"{name:11s} {what}")
        return 0
    command = "python -m bench " + " ".join(argv)
    os.environ["LMGRAD_BENCH_SUITE"], os.environ["LMGRAD_BENCH_COMMAND"] = args.suite, command
    if args.suite in SCRIPTS:
        rest = [a for a in args.rest if a != "--"]
        return subprocess.call([sys.executable, os.path.join(HERE, SCRIPTS[args.suite][0]), *rest])
    import speed
    from _common import append_jsonl, results_path

    rows = getattr(speed, args.suite)(args)
    if args.suite == "speed":
        table = speed.speed_table(rows)
    elif args.suite == "scaling":
        paths = speed.plot_scaling(rows, os.path.join(HERE, "results"))
        table = speed.scaling_table(rows) + "\n\n" + "\n".join(
            f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths)
    else:
        table = speed.fusion_table(rows)
    print(table)
    if not args.no_write:
        if args.suite != "scaling":  # scaling appends each point as it finishes
            append_jsonl(results_path(args.suite), rows)
        _write_latest(args.suite, command, table, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
