"""The table and plot of a local checkpoint series: validation perplexity and BLiMP accuracy per
saved step, for every size of the series (the workdirs of `lmgrad.jobs.pretrain` runs).

BLiMP accuracy comes with a 95% interval from the stratified standard error over paradigms,
SE² = Σ_u (n_u/N)² p_u(1−p_u)/(n_u−1): the pairs are sampled per paradigm, and a pooled binomial
interval would ignore that paradigms differ in difficulty. A checkpoint whose accuracy interval
covers 0.5 is indistinguishable from chance on the sampled pairs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmgrad import io as lio

Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True)
class SeriesPoint:
    """One saved step of one run."""

    run: str
    num_params: int
    step: int
    tokens_seen: int
    val_ppl: float
    blimp_accuracy: float | None
    blimp_se: float | None
    blimp_pairs: int | None


def stratified_se(per_uid: dict[str, dict[str, Any]]) -> float:
    """Standard error of the pooled accuracy when pairs are sampled within each paradigm."""
    ns = np.array([v["n"] for v in per_uid.values()], float)
    ps = np.array([v["accuracy"] for v in per_uid.values()], float)
    if ns.sum() == 0:
        return float("nan")
    var = np.sum((ns / ns.sum()) ** 2 * ps * (1 - ps) / np.maximum(ns - 1, 1))
    return float(math.sqrt(var))


def read_run(workdir: str | pathlib.Path) -> list[SeriesPoint]:
    """The saved steps of one pretraining workdir (its metrics.jsonl, options.json, blimp/)."""
    from lmgrad.jobs.pretrain import METRICS, OPTIONS, options_from_json

    work = pathlib.Path(workdir)
    metrics = work / METRICS
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics}: not found (is {work} a launch/pretrain.py workdir?)")
    n_params = options_from_json(work / OPTIONS).num_params()
    points = []
    for lineno, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{metrics}:{lineno}: not JSON ({e.msg})") from e
        se = None
        blimp = work / "blimp" / f"step_{row['step']:06d}.json"
        if blimp.exists():
            se = stratified_se(json.loads(blimp.read_text())["per_uid"])
        points.append(SeriesPoint(work.name, n_params, int(row["step"]), int(row["tokens_seen"]),
                                  float(row["val_ppl"]), row.get("blimp_accuracy"), se, row.get("blimp_pairs")))
    return points


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def markdown_table(points: Sequence[SeriesPoint]) -> str:
    """One row per (run, step): params, tokens, validation perplexity, BLiMP accuracy ± 95%."""
    lines = ["| run | params | step | tokens | val ppl | BLiMP acc. (95% CI) |", "|---|---:|---:|---:|---:|---|"]
    for p in points:
        acc = "—" if p.blimp_accuracy is None else (
            f"{p.blimp_accuracy:.3f} ({p.blimp_accuracy - Z95 * p.blimp_se:.3f}–"
            f"{p.blimp_accuracy + Z95 * p.blimp_se:.3f})" if p.blimp_se is not None else f"{p.blimp_accuracy:.3f}")
        lines.append(f"| {p.run} | {_fmt_params(p.num_params)} | {p.step} | {p.tokens_seen:,} | {p.val_ppl:,.1f} | {acc} |")
    return "\n".join(lines) + "\n"


def plot_series(points: Sequence[SeriesPoint], path: str | pathlib.Path) -> None:
    """Validation perplexity and BLiMP accuracy (95% band) over training tokens, one line per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    ax_ppl, ax_acc = fig.subplots(1, 2)
    for run in dict.fromkeys(p.run for p in points):
        pts = [p for p in points if p.run == run and p.tokens_seen > 0]
        label = f"{run} ({_fmt_params(pts[0].num_params)})" if pts else run
        x = np.array([p.tokens_seen for p in pts], float)
        ax_ppl.plot(x, [p.val_ppl for p in pts], marker="o", ms=3, label=label)
        acc = [(p.tokens_seen, p.blimp_accuracy, p.blimp_se or 0.0) for p in pts if p.blimp_accuracy is not None]
        if acc:
            xa, ya, se = (np.array(c, float) for c in zip(*acc))
            line, = ax_acc.plot(xa, ya, marker="o", ms=3, label=label)
            ax_acc.fill_between(xa, ya - Z95 * se, ya + Z95 * se, color=line.get_color(), alpha=0.2, lw=0)
    for ax in (ax_ppl, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (log)")
        ax.grid(alpha=0.3)
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("validation perplexity")
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_acc.set_ylabel("BLiMP accuracy (95% CI)")
    ax_ppl.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    lio.atomic_write(path, buf.getvalue())


def write_report(workdirs: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path, *,
                 command: str | None = None) -> dict[str, pathlib.Path]:
    """`series.json`, `series.md` (the table) and `series.png` for the runs in `workdirs`."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [p for w in workdirs for p in read_run(w)]
    paths = {"json": out / "series.json", "table": out / "series.md", "plot": out / "series.png"}
    lio.write_json(paths["json"], {"command": command, "runs": [str(w) for w in workdirs],
                                   "ci": "95%, stratified SE over paradigms",
                                   "points": [dataclasses.asdict(p) for p in points]})
    header = f"Command: `{command}`\n\n" if command else ""
    lio.write_text(paths["table"], header + markdown_table(points))
    plot_series(points, paths["plot"])
    return paths
