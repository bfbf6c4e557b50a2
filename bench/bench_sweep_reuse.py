"""A sweep's per-checkpoint sketch time with and without reusing the traced sketch function.

    python -m bench run --suite=sweep_reuse [-- --series cpu_s --steps 0,8,64,600]

Runs the `smoke` sweep pipeline (6 paradigms × 8 pairs, factored r = 4) over checkpoints of one local
series (configs/pretrain.py; `--pretrain_root`, default runs/pretrain) twice, each in a fresh process
with its own empty compilation cache: once as lmgrad does it (`build_sketcher` memoised per module,
shapes, options and mesh) and once with the memo cleared before every build (a re-trace per
checkpoint, the persistent compilation cache still serving the compile). The first checkpoint
compiles in both; the later ones show the reuse. Appends one JSON line to
bench/results/sweep_reuse.jsonl. Needs BLiMP (LMGRAD_BLIMP_DIR) and a trained series.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def one(mode: str, series: str, steps: str, root: str) -> dict:
    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("sweepcfg", os.path.join(ROOT, "configs", "sweep.py"))
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    from lmgrad.jobs import sketch as sk
    from lmgrad.jobs import sweep

    if mode == "retrace":
        orig = sk.build_sketcher

        def fresh(*a, **k):
            sk._SKETCHERS.clear()
            return orig(*a, **k)

        sk.build_sketcher = fresh
    o = dataclasses.replace(cfg.options("smoke"), series=(series,), series_steps=steps, pretrain_root=root)
    rec = sweep.run(o, tempfile.mkdtemp(prefix="sweep_reuse_"), progress=False)
    return {n: r["timings_s"].get("pipeline:sketch:sketches") for n, r in rec["runs"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="cpu_s")
    ap.add_argument("--steps", default="0,8,64,600")
    ap.add_argument("--pretrain_root", default=os.path.join(ROOT, "runs", "pretrain"))
    ap.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mode:
        print(json.dumps(one(args._mode, args.series, args.steps, args.pretrain_root)))
        return
    sys.path.insert(0, HERE)
    from _common import append_jsonl, loadavg, results_path, run_meta

    meta = run_meta(suite="sweep_reuse")
    out = {}
    for mode in ("reuse", "retrace"):
        p = subprocess.run([sys.executable, __file__, f"--_mode={mode}", f"--series={args.series}",
                            f"--steps={args.steps}", f"--pretrain_root={args.pretrain_root}"],
                           capture_output=True, text=True, check=True)
        out[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    later = [n for n in out["reuse"]][1:]
    ratio = sum(out["retrace"][n] for n in later) / sum(out["reuse"][n] for n in later)
    row = {**meta, "series": args.series, "steps": args.steps, "sketch_s": out, "loadavg_after": loadavg(),
           "later_checkpoints_retrace_over_reuse": ratio}
    for mode in out:
        print(mode, {n: round(v, 2) for n, v in out[mode].items()})
    print(f"later checkpoints: re-trace / reuse = {ratio:.1f}x")
    append_jsonl(results_path("sweep_reuse"), [row])


if __name__ == "__main__":
    main()
