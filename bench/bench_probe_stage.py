"""The probe job end to end (`launch/probe.py`, FTGD): packed rows vs length buckets.

    LMGRAD_BLIMP_DIR=../shared/data/blimp python -m bench run --suite=probe_stage
    LMGRAD_BLIMP_DIR=../shared/data/blimp python -m bench run --suite=probe_stage -- --config=configs/probe.py:smoke

Runs the job of `--config` once per mode (`--config.probe.pack=False`, then True, by default, `--rounds` times
alternating), each in a fresh process with its own empty compilation cache, so every compile is
counted. Per run: the job's own stage timings (`stats.json`: task gradients, evaluation before,
FTGD, unmasked tuning, one-step probes) and the process's wall time and peak RSS. Then the two
modes' outputs (`transfer.npz`) are compared array by array: the packed job must give the bucketed
job's numbers up to float32 rounding. Appends to bench/results/probe_stage.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

import _common

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_job(config: str, pack: bool, workdir: str) -> dict:
    env = {**os.environ, "LMGRAD_COMPILATION_CACHE": tempfile.mkdtemp(prefix="probe_cc_")}
    cmd = [sys.executable, str(ROOT / "launch" / "probe.py"), f"--config={config}", f"--workdir={workdir}",
           f"--config.probe.pack={pack}"]
    log = pathlib.Path(workdir, "job.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)    # this child's own rusage: its peak RSS
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)})")
    stats = json.loads(pathlib.Path(workdir, "stats.json").read_text())
    return {"wall_s": round(wall, 2), "timings_s": {k: round(v, 2) for k, v in stats["timings"].items()},
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def compare(a: str, b: str) -> dict[str, float]:
    """Largest absolute difference per float array of two transfer.npz, relative to the array's scale."""
    x, y = np.load(pathlib.Path(a, "transfer.npz")), np.load(pathlib.Path(b, "transfer.npz"))
    out = {}
    for k in x.files:
        u, v = x[k], y[k]
        if u.dtype.kind == "f" and u.size:
            scale = float(np.nanmax(np.abs(u))) or 1.0
            out[k] = float(np.nanmax(np.abs(u - v))) / scale
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/probe.py")
    ap.add_argument("--modes", nargs="+", default=["bucketed", "packed"])
    ap.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating")
    args = ap.parse_args()

    runs: list[dict] = []
    dirs: dict[str, str] = {}
    for r in range(args.rounds):
        for mode in args.modes:
            work = tempfile.mkdtemp(prefix=f"probe_stage_{mode}_")
            res = run_job(args.config, mode == "packed", work)
            dirs[mode] = work
            runs.append({"mode": mode, "round": r, **res})
            t = res["timings_s"]
            print(f"{mode:9s} round {r}: wall {res['wall_s']:7.1f} s  job {t['total']:7.1f} s  "
                  + "  ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total"), flush=True)
    diffs = compare(dirs["bucketed"], dirs["packed"]) if {"bucketed", "packed"} <= dirs.keys() else {}
    if diffs:
        worst = max(diffs, key=diffs.get)
        print(f"outputs: largest relative difference {diffs[worst]:.2e} ({worst})")
    med = {m: float(np.median([x["timings_s"]["total"] for x in runs if x["mode"] == m])) for m in args.modes}
    recs = [_common.run_meta(bench="probe_stage", config=args.config, **x,
                             **({"total_ratio_bucketed_over_packed": round(med["bucketed"] / med["packed"], 3)}
                                if len(med) == 2 else {}),
                             outputs_max_rel_diff=diffs) for x in runs]
    if len(med) == 2:
        print(f"job total (median): bucketed {med['bucketed']:.1f} s, packed {med['packed']:.1f} s, "
              f"{med['bucketed'] / med['packed']:.2f}x")
    _common.append_jsonl(_common.results_path("probe_stage"), recs)


if __name__ == "__main__":
    main()
