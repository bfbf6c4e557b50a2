"""report.md for a task space: provenance, a statistics table, figures, and a plain-language
summary generated from the numbers (cautious by construction: it only states what a test shows
at the stated threshold, and flags unreliable spaces first)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lmgrad.analysis.result import TaskSpaceResult
from lmgrad.analysis.stats import ALPHA, format_p, min_attainable_p
from lmgrad.analysis.uncertainty import offdiag

_PROVENANCE_KEYS = ("model", "model_id", "revision", "projector", "projection", "k", "seed",
                    "dtype", "tasks", "grads", "mode", "lmgrad_version", "git_commit")


def provenance_from_manifest(manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flatten a store manifest to ``{dotted.key: scalar}``: its ``config`` block plus top-level
    scalars (counts, k, dtype). Long lists and arrays are summarised by length."""
    out: dict[str, Any] = {}

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (str, int, float, bool)) or x is None:
            out[prefix] = x
        elif isinstance(x, (list, tuple)):
            if len(x) <= 4 and all(isinstance(v, (str, int, float, bool)) for v in x):
                out[prefix] = list(x)
            else:
                out[prefix] = f"<{len(x)} items>"
    if manifest:
        walk("", manifest.get("config", {}))
        for k, v in manifest.items():
            if k != "config" and isinstance(v, (str, int, float, bool)):
                out.setdefault(k, v)
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (float, np.floating)):
        return "n/a" if not np.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def _summary(result: TaskSpaceResult, summary: Mapping[str, Any]) -> list[str]:
    hyp = result.hypothesis.name
    lines: list[str] = []
    rel = result.reliability
    t = len(result.names)
    if not np.isfinite(rel.spearman_brown):
        lines.append(f"- Reliability could not be estimated ({rel.interpretation}); read every "
                     "number below as provisional.")
    elif rel.spearman_brown < 0.7:
        lines.append(f"- **Caution: the task space is not reliable at this sample size** "
                     f"(split-half reliability {rel.spearman_brown:.2f} < 0.7, "
                     f"min {int(result.counts.min())} pairs per task). Differences between "
                     "entries mostly reflect which pairs were sampled; the tests below may be "
                     "underpowered and any structure they report should be confirmed with "
                     "more pairs.")
    else:
        lines.append(f"- The task space is {'highly' if rel.spearman_brown >= 0.9 else 'moderately'}"
                     f" reliable: split-half reliability {rel.spearman_brown:.2f} "
                     f"(Spearman–Brown, {rel.n_splits} random splits).")
    if result.hypothesis.categories is not None:
        pmin = min_attainable_p(result.hypothesis.categories)
        if pmin > ALPHA:
            lines.append(f"- With {t} tasks in this grouping no permutation test can reach "
                         f"p < {ALPHA}: the smallest attainable p is {pmin:.3g}. Read the "
                         "statistics below as effect sizes only.")
    wb = result.stats.get("within_between")
    m = result.stats.get("mantel")
    if wb is not None and np.isfinite(wb.statistic):
        e = wb.extra
        ratio = (f"ratio {e['ratio']:.2f}, " if e.get("ratio") is not None
                 and np.isfinite(e["ratio"]) else "")
        mtxt = (f", Mantel r={m.statistic:.2f}, p={format_p(m.p_value)}"
                if m is not None and np.isfinite(m.statistic) else "")
        if wb.p_value is not None and wb.p_value < ALPHA:
            lines.append(f"- Tasks sharing a `{hyp}` are more similar than others: mean "
                         f"similarity {e['within']:.3f} within vs {e['between']:.3f} between "
                         f"({ratio}difference {wb.statistic:.3f}, permutation p="
                         f"{format_p(wb.p_value)}{mtxt}).")
        else:
            lines.append(f"- No evidence that tasks sharing a `{hyp}` are more similar than "
                         f"others: {e['within']:.3f} within vs {e['between']:.3f} between "
                         f"(permutation p={format_p(wb.p_value)}{mtxt}). This is absence of "
                         "evidence at this sample size, not evidence of absence.")
    elif m is not None and np.isfinite(m.statistic):
        verdict = "agrees with" if m.p_value is not None and m.p_value < ALPHA else \
            "shows no detectable agreement with"
        lines.append(f"- The task space {verdict} the hypothesis `{hyp}`: Mantel r="
                     f"{m.statistic:.2f}, p={format_p(m.p_value)}.")
    ari = result.stats.get("cluster_ari")
    if ari is not None:
        e = ari.extra
        good = ari.p_value is not None and ari.p_value < ALPHA
        lines.append(f"- Clustering the tasks into {e['n_clusters']} groups "
                     f"{'recovers' if good else 'does not recover'} the `{hyp}` categories "
                     f"beyond chance (ARI {ari.statistic:.2f}; chance 95th percentile "
                     f"{e['null_q95']:.2f}, p={format_p(ari.p_value)}). ARI near 1 would mean the "
                     "categories are the dominant structure; values near 0 mean other structure "
                     "dominates even if the categories shift similarities on average.")
    if t < 3:
        lines.append("- With 2 tasks there is a single similarity value; no hypothesis test is "
                     "possible.")
    coh = np.diag(result.pair_cosine)
    lines.append(f"- Within-task coherence (mean cosine between a task's pairs) has median "
                 f"{np.nanmedian(coh):.3f} (range {np.nanmin(coh):.3f} to {np.nanmax(coh):.3f}). "
                 "Low coherence means a task's pairs pull in different directions, so its mean "
                 "is noisier and its row of the matrix less certain.")
    off = offdiag(result.similarity)
    lines.append(f"- Off-diagonal similarities range from {np.nanmin(off):.3f} to "
                 f"{np.nanmax(off):.3f} (mean {np.nanmean(off):.3f}); the median 95% bootstrap "
                 f"interval width is {_fmt(summary['bootstrap']['ci_width_median'])}.")
    outside = summary["bootstrap"].get("n_estimate_outside") or 0
    if outside:
        lines.append(f"- For {outside} of {len(off)} entries the estimate lies outside its "
                     "bootstrap interval: cosines of resampled means are biased toward 0, and "
                     "here the bias is large against the spread; treat those intervals as "
                     "approximate (`--ci_method=bc` reduces this).")
    if result.sketch_check is not None:
        lines.append(f"- Sketch-error check against a second store: {result.sketch_check.interpretation}.")
    if len(result.stats) > 1:
        lines.append("- The tests above address one question several ways and are not corrected "
                     "for multiple comparisons; the Mantel and permutation p-values respect the "
                     "dependence between matrix entries, the parametric Spearman/Pearson p-values "
                     "do not.")
    return lines


def _top_pairs(result: TaskSpaceResult, n: int = 5) -> list[str]:
    iu = np.triu_indices(len(result.names), 1)
    vals = result.similarity[iu]
    ok = np.flatnonzero(np.isfinite(vals))
    if ok.size == 0:
        return []
    order = ok[np.argsort(vals[ok])]
    rows = ["| | task a | task b | similarity | 95% CI |", "|---|---|---|---|---|"]
    lo, hi = result.bootstrap.low, result.bootstrap.high
    for label, picks in (("most similar", order[::-1][:n]), ("least similar", order[:n])):
        for j in picks:
            a, b = iu[0][j], iu[1][j]
            rows.append(f"| {label} | {result.names[a]} | {result.names[b]} | {vals[j]:.3f} | "
                        f"[{_fmt(lo[a, b])}, {_fmt(hi[a, b])}] |")
    return rows


def _group_table(result: TaskSpaceResult) -> list[str]:
    if result.global_only:
        return ["The sketch is a single global block, so it mixes all parameters: there is no "
                "per-layer or per-module view for this store."]
    h = offdiag(result.hypothesis.matrix)
    rows = [f"| {result.group_by} | mean off-diag similarity | Pearson r with hypothesis |",
            "|---|---|---|"]
    for g, s in result.groups.items():
        x = offdiag(s)
        ok = np.isfinite(x)
        r = (np.corrcoef(x[ok], h[ok])[0, 1] if ok.sum() > 2 and x[ok].std() > 0
             and h[ok].std() > 0 else float("nan"))
        rows.append(f"| {g} | {_fmt(float(np.nanmean(x)) if ok.any() else None)} | {_fmt(r)} |")
    rows.append("")
    rows.append("Per-group correlations are descriptive (no permutation test per group); "
                "a group with a higher r is where the hypothesis structure is most visible.")
    return rows


def render(result: TaskSpaceResult, summary: Mapping[str, Any],
           provenance: Mapping[str, Any]) -> str:
    """Markdown report; figures are referenced by their file names next to report.md."""
    s = result.settings
    out = ["# Task space report", ""]
    out += ["## Summary", ""] + _summary(result, summary) + [""]
    out += ["## Provenance", "", "| key | value |", "|---|---|"]
    prov = dict(provenance)
    for key in sorted(prov, key=lambda k: (not any(k.endswith(p) for p in _PROVENANCE_KEYS), k)):
        out.append(f"| {key} | {prov[key]} |")
    out += [f"| similarity | {s['kind']} |", f"| sketch width k | {s['k']} |",
            f"| pairs | {s['n_pairs']} |", f"| tasks | {s['n_tasks']} |",
            f"| pairs per task (min / median / max) | {int(result.counts.min())} / "
            f"{float(np.median(result.counts)):g} / {int(result.counts.max())} |",
            f"| hypothesis | {result.hypothesis.name} ({result.hypothesis.n_categories or 'matrix'}"
            f"{' categories' if result.hypothesis.n_categories else ''}) |",
            f"| analysis seed | {s['seed']} |", ""]
    out += ["## Statistics", "",
            "| test | statistic | p | n | reading |", "|---|---|---|---|---|"]
    for st in result.stats.values():
        out.append(f"| {st.name} | {_fmt(st.statistic)} | {format_p(st.p_value)} | {st.n} | "
                   f"{st.interpretation} |")
    rel = result.reliability
    out.append(f"| split-half reliability | {_fmt(rel.spearman_brown)} (half r {_fmt(rel.r_half)} "
               f"± {_fmt(rel.r_half_sd)}) | | {rel.n_tasks} tasks | {rel.interpretation} |")
    b = summary["bootstrap"]
    out.append(f"| bootstrap CI width (median / max) | {_fmt(b['ci_width_median'])} / "
               f"{_fmt(b['ci_width_max'])} | | {b['n_boot']} resamples | {b['method']} intervals, "
               f"level {1 - b['alpha']:.0%}, pairs resampled within tasks |")
    if result.sketch_check is not None:
        c = result.sketch_check
        out.append(f"| sketch check | {_fmt(c.statistic)} | | {c.n} | {c.interpretation} |")
    out += [""]
    out += ["## Figures", "",
            "![Clustered task similarity](heatmap.png)", "",
            f"![Per-{result.group_by} task similarity](layers.png)", "",
            "![Similarity by hypothesis](hypothesis.png)", ""]
    out += [f"## Where in the network ({'per ' + result.group_by if not result.global_only else 'global'})",
            ""] + _group_table(result) + [""]
    out += ["## Extremes", ""] + _top_pairs(result) + [""]
    out += ["## Per-task coherence", "", "| task | pairs | coherence |", "|---|---|---|"]
    for n, c, v in zip(result.names, result.counts, np.diag(result.pair_cosine)):
        out.append(f"| {n} | {c} | {_fmt(float(v))} |")
    out.append("")
    return "\n".join(out)
