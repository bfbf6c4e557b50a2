r"""Simulation records for lmgrad.analysis.estimators and .precondition (numpy only, 1 core).

    OMP_NUM_THREADS=1 python bench/bench_stats.py                       # both parts, ~5 min
    OMP_NUM_THREADS=1 python bench/bench_stats.py --part coverage --reps 200
    OMP_NUM_THREADS=1 python bench/bench_stats.py --part precondition

Part 1, coverage map → bench/results/stats_coverage.json. Planted task spaces from
``simulate_task_space`` (8 tasks, every off-diagonal population cosine 0.5, as in the issue; K=500;
isotropic noise), over coherence {0.02, 0.05, 0.1, 0.2, 0.4} × pairs per task {4, 8, 12, 24, 48}:
coverage of the default 95% interval (delete-one-pair jackknife) of the unbiased cosine, MAE of
the unbiased and the raw cosine, share of undefined tasks (‖μ‖² estimate ≤ 0). Coverage counts an
undefined entry as a miss; ``coverage_defined`` is over defined entries only; ``coverage_se`` is
the SE over simulated data sets (entries of one matrix are dependent). On a subset of cells (all
coherences at 12 pairs, all pair counts at coherence 0.1) the bootstrap alternatives too:
percentile and BCa intervals of the unbiased cosine (``n_boot`` 200 on 100 data sets per cell,
ties-excluded U-statistic)
and the percentile interval of the raw cosine (the issue's 0% coverage). A K sweep at
coherence 0.1 and 12 pairs records the variance floor of the MAE (K = 200 … 2000).

Part 2, preconditioner convergence → bench/results/stats_precondition.json. The numpy tiny model
of tests/test_precondition.py (tanh MLP, 32 → 48 → 16, 2,352 parameters in 3 blocks), 8 tasks ×
24 pairs, a separate reference set of 512 pairs. Reference: the unbiased task space of exact
per-example differentials whitened by (Σ_b + δ_b I)^(−1/2), δ_b = 0.1·tr Σ_b / (parameters in
b), float64. Sketches: a seeded Gaussian projection per block (entries N(0, 1/k_b), k_b ∝ block
size), preconditioner fitted on the sketched reference set with the same damping in parameter
units (``n_params``) and, for contrast, with LoGra's sketch-width convention. Per K: max |Δ|
and relative Frobenius error of the off-diagonal task space vs the reference, over 3 seeds.

Each run rewrites its JSON file (commit, date, command, settings, one record per cell).

What the default run printed (seeded, so it reproduces; the JSON files hold every number):

    jackknife 95% coverage (undefined entries count as misses) | MAE unbiased / raw, K=500
    coh \ pairs    4      8      12     24     48
    0.02         0.22   0.81   0.98   0.99   0.98   | 12 pairs: 0.198 / 0.400
    0.05         0.81   0.98   0.98   0.98   0.97   | 12 pairs: 0.086 / 0.305
    0.1          0.97   0.97   0.97   0.97   0.96   | 12 pairs: 0.049 / 0.213
    0.2          0.96   0.96   0.96   0.96   0.96   | 12 pairs: 0.029 / 0.124
    0.4          0.94   0.94   0.95   0.95   0.95   | 12 pairs: 0.016 / 0.055

Coverage breaks down through undefined tasks (‖μ‖² ≤ 0: 15% of tasks at 0.02 × 4 pairs), not
through wrong intervals (over defined entries it stays 0.94–0.99); the point estimate's MAE is
large below coherence 0.1 at 12 pairs. Bootstrap at 0.1 × 12: percentile 0.977, BCa 0.976; raw
cosine percentile 0.000 everywhere. MAE at 0.1 × 12 by K: 0.078 (200), 0.049 (500), 0.034 (1000),
0.024 (2000), raw ≈ 0.21 throughout. Preconditioner: max |Δ| of the task space vs the
full-gradient reference 0.43 (K=33), 0.12 (511), 0.037 (2,352), 0.019 (9,408).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import time

import numpy as np

import _common
from lmgrad.analysis import estimators as E
from lmgrad.analysis import precondition as P
from lmgrad.analysis.uncertainty import offdiag

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
RESULTS = str(_common.RESULTS_DIR)
COHERENCES = (0.02, 0.05, 0.1, 0.2, 0.4)
PAIRS = (4, 8, 12, 24, 48)
T, K, TRUE_COS = 8, 500, 0.5


INPUTS = ("lmgrad/analysis/estimators.py", "lmgrad/analysis/precondition.py",
          "lmgrad/analysis/space.py", "bench/bench_stats.py", "tests/test_precondition.py")


def _meta(args) -> dict:
    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()
        except OSError:
            return None
    status = git("status", "--porcelain", "--", *INPUTS)
    # Not _common.run_meta: that imports jax for the device, and this bench is numpy only.
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": git("rev-parse", "HEAD"),
            "inputs_modified_since_commit": status.splitlines() if status else [],
            "command": _common.command(), "numpy": np.__version__, "cpu": _common.cpu_model(),
            "cores": _common.usable_cores(), "loadavg": _common.loadavg(), "args": vars(args)}


def _sim(coh, n, k, seed):
    return E.simulate_task_space(T, n, k, coherence=coh, within=TRUE_COS, seed=seed)


def coverage_cell(coh: float, n: int, reps: int, k: int = K, boot: bool = False,
                  n_boot: int = 200, boot_reps: int = 100) -> dict:
    t0 = time.time()
    cov, cov_def, mae_u, mae_r, undef, width, nan_iv = [], [], [], [], [], [], []
    boot_cov = {"percentile": [], "bca": [], "raw_percentile": []}
    for r in range(reps):
        s = _sim(coh, n, k, seed=10_000 * n + r)
        tr = offdiag(s.true_cos)
        iv = E.jackknife(s.x_nk, s.tasks)
        c = offdiag(iv.covers(s.true_cos))
        ok = np.isfinite(offdiag(iv.low))
        cov.append(c.mean())
        if ok.any():
            cov_def.append(c[ok].mean())
            width.append(np.mean(offdiag(iv.high - iv.low)[ok]))
        nan_iv.append(1 - ok.mean())
        e = offdiag(iv.estimate)
        if np.isfinite(e).any():
            mae_u.append(np.nanmean(np.abs(e - tr)))
        mae_r.append(np.mean(np.abs(offdiag(E.task_similarity(s.x_nk, s.tasks, "raw").sim) - tr)))
        undef.append(np.mean(~iv.defined))
        if boot and r < boot_reps:  # a bootstrap costs ~30 jackknifes: fewer data sets
            for name, kind, method in (("percentile", "unbiased", "percentile"),
                                       ("bca", "unbiased", "bca"),
                                       ("raw_percentile", "raw", "percentile")):
                b = E.bootstrap(s.x_nk, s.tasks, n_boot=n_boot, seed=r, kind=kind, method=method)
                boot_cov[name].append(offdiag(b.covers(s.true_cos)).mean())
    rec = {"coherence": coh, "pairs": n, "k": k, "tasks": T, "true_cos": TRUE_COS, "reps": reps,
           "coverage": float(np.mean(cov)), "coverage_se": float(np.std(cov) / np.sqrt(reps)),
           "coverage_defined": float(np.mean(cov_def)) if cov_def else None,
           "interval_nan": float(np.mean(nan_iv)),
           "mean_width": float(np.mean(width)) if width else None,
           "mae_unbiased": float(np.mean(mae_u)) if mae_u else None,
           "mae_raw": float(np.mean(mae_r)), "undefined_tasks": float(np.mean(undef)),
           "in_validated_regime": bool(n >= E.VALIDATED_MIN_PAIRS
                                       and coh >= E.VALIDATED_MIN_COHERENCE),
           "seconds": round(time.time() - t0, 1)}
    if boot:
        rec["bootstrap"] = {m: {"coverage": float(np.mean(v)),
                                "coverage_se": float(np.std(v) / np.sqrt(len(v)))}
                            for m, v in boot_cov.items()}
        rec["n_boot"], rec["boot_reps"] = n_boot, len(boot_cov["bca"])
    return rec


def run_coverage(args) -> None:
    cells = []
    print(f"{'coh':>5} {'pairs':>5} {'cover':>6} {'±se':>5} {'cov|def':>7} {'MAE unb':>7} "
          f"{'MAE raw':>7} {'undef':>6} {'boot pct/bca/raw':>18}")
    for coh in COHERENCES:
        for n in PAIRS:
            boot = (n == 12 or coh == 0.1) and not args.no_boot
            rec = coverage_cell(coh, n, args.reps, boot=boot, n_boot=args.n_boot,
                                boot_reps=args.boot_reps)
            cells.append(rec)
            b = rec.get("bootstrap")
            bs = (f"{b['percentile']['coverage']:.3f}/{b['bca']['coverage']:.3f}/"
                  f"{b['raw_percentile']['coverage']:.3f}") if b else ""
            f = lambda v: f"{v:.3f}" if v is not None else "  n/a"  # noqa: E731
            print(f"{coh:>5} {n:>5} {rec['coverage']:6.3f} {rec['coverage_se']:5.3f} "
                  f"{f(rec['coverage_defined']):>7} {f(rec['mae_unbiased']):>7} "
                  f"{rec['mae_raw']:7.3f} {rec['undefined_tasks']:6.3f} {bs:>18}", flush=True)
    k_sweep = []
    print("\nK sweep at coherence 0.1, 12 pairs:")
    for k in (200, 500, 1000, 2000):
        rec = coverage_cell(0.1, 12, args.reps, k=k)
        k_sweep.append(rec)
        print(f"  K={k:5d}: coverage {rec['coverage']:.3f}, MAE unbiased "
              f"{rec['mae_unbiased']:.3f}, raw {rec['mae_raw']:.3f}", flush=True)
    out = {"meta": _meta(args), "interval": "jackknife (delete-one-pair, normal)",
           "alpha": 0.05, "validated": {"min_pairs": E.VALIDATED_MIN_PAIRS,
                                        "min_coherence": E.VALIDATED_MIN_COHERENCE},
           "cells": cells, "k_sweep": k_sweep}
    path = os.path.join(RESULTS, "stats_coverage.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


def _sketch_layout(sizes, ks):
    return [{"name": f"block{i}", "offset": int(sum(ks[:i])), "size": int(k)}
            for i, k in enumerate(ks)]


def _tiny_model():
    """The numpy tiny model of tests/test_precondition.py, loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "tiny_model", os.path.join(ROOT, "tests", "test_precondition.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tiny_differentials, mod.tiny_params


def run_precondition(args) -> None:
    tiny_differentials, tiny_params = _tiny_model()
    d_in, hidden, classes = 32, 48, 16
    params = tiny_params(0, d_in, hidden, classes)
    g, tasks = tiny_differentials(params, 8, 24, seed=0, d_in=d_in, n_groups=3)
    ref, _ = tiny_differentials(params, 32, 16, seed=1, d_in=d_in, n_groups=3)
    sizes = [hidden * d_in, hidden, classes * hidden]
    layout = _sketch_layout(sizes, sizes)
    npar = {b["name"]: b["size"] for b in layout}
    p_total = sum(sizes)
    exact_pre = E.task_similarity(P.fit_preconditioner(ref, layout, damping=args.damping,
                                                       n_params=npar).whiten(g), tasks).sim
    exact_raw = E.task_similarity(g, tasks).sim
    iu = np.triu_indices(len(exact_pre), 1)
    spread = float(np.std(exact_pre[iu]))
    print(f"reference: {p_total} parameters, {len(g)} pairs, {len(ref)} reference rows; "
          f"off-diagonal SD of the preconditioned task space {spread:.3f}; "
          f"max |precond − plain| {np.abs(exact_pre - exact_raw)[iu].max():.3f}")
    curve = []
    print(f"{'K':>6} {'maxΔ pre':>9} {'relF pre':>9} {'maxΔ pre(width)':>15} {'maxΔ plain':>10}")
    for k_total in (32, 64, 128, 256, 512, 1024, 2352, 4704, 9408):
        ks = [max(2, round(k_total * s / p_total)) for s in sizes]
        lay_k = _sketch_layout(sizes, ks)
        errs = {"pre": [], "pre_rel": [], "pre_width": [], "plain": []}
        for seed in range(3):
            rng = np.random.default_rng(seed)
            proj = [rng.standard_normal((s, k)) / np.sqrt(k) for s, k in zip(sizes, ks)]

            def sketch(x):
                return np.hstack([x[:, b["offset"]:b["offset"] + b["size"]] @ pm
                                  for b, pm in zip(layout, proj)])
            sg, sr = sketch(g), sketch(ref)
            pre = E.task_similarity(P.fit_preconditioner(sr, lay_k, damping=args.damping,
                                                         n_params=npar).whiten(sg), tasks).sim
            pre_w = E.task_similarity(P.fit_preconditioner(sr, lay_k, damping=args.damping)
                                      .whiten(sg), tasks).sim
            plain = E.task_similarity(sg, tasks).sim
            errs["pre"].append(np.abs(pre - exact_pre)[iu].max())
            errs["pre_rel"].append(np.linalg.norm((pre - exact_pre)[iu])
                                   / np.linalg.norm(exact_pre[iu]))
            errs["pre_width"].append(np.abs(pre_w - exact_pre)[iu].max())
            errs["plain"].append(np.abs(plain - exact_raw)[iu].max())
        rec = {"k": int(sum(ks)), "k_blocks": ks, "seeds": 3,
               "max_abs_err_preconditioned": float(np.mean(errs["pre"])),
               "rel_frobenius_err_preconditioned": float(np.mean(errs["pre_rel"])),
               "max_abs_err_preconditioned_sketch_width_damping": float(np.mean(errs["pre_width"])),
               "max_abs_err_plain_vs_plain_exact": float(np.mean(errs["plain"]))}
        curve.append(rec)
        print(f"{rec['k']:>6} {rec['max_abs_err_preconditioned']:9.4f} "
              f"{rec['rel_frobenius_err_preconditioned']:9.4f} "
              f"{rec['max_abs_err_preconditioned_sketch_width_damping']:15.4f} "
              f"{rec['max_abs_err_plain_vs_plain_exact']:10.4f}", flush=True)
    out = {"meta": _meta(args), "model": {"d_in": d_in, "hidden": hidden, "classes": classes,
                                          "parameters": p_total, "blocks": sizes},
           "pairs": len(g), "tasks": 8, "reference_rows": len(ref), "damping": args.damping,
           "damping_convention": "delta_b = damping * tr(Sigma_b) / n_params_b "
                                 "(sketch_width_damping: / k_b)",
           "projection": "Gaussian N(0, 1/k_b) per block, numpy default_rng(seed)",
           "reference_offdiag_sd": spread, "curve": curve}
    path = os.path.join(RESULTS, "stats_precondition.json")
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("coverage", "precondition", "all"), default="all")
    ap.add_argument("--reps", type=int, default=200, help="simulated data sets per cell")
    ap.add_argument("--n_boot", type=int, default=200)
    ap.add_argument("--boot_reps", type=int, default=100, help="data sets per bootstrap cell")
    ap.add_argument("--no_boot", action="store_true", help="skip the bootstrap comparison")
    ap.add_argument("--damping", type=float, default=P.DAMPING)
    args = ap.parse_args()
    if args.part in ("coverage", "all"):
        run_coverage(args)
    if args.part in ("precondition", "all"):
        run_precondition(args)


if __name__ == "__main__":
    main()
