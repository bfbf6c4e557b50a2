"""report.md for a task space, generated from the numbers and cautious by construction.

It leads with the hypothesis test controlled for surface similarity (or says why there is none),
then the warnings a reader must see before any number (undefined tasks, the regime where
intervals are not calibrated, low reliability), the robustness of the headline statistics across
geometries, the stability of each block, and only then the details. A block is called robust
only next to its co-clustering number; a permutation p-value at its floor prints as "p ≤ …".
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmgrad.analysis.result import RobustnessRow, TaskSpaceResult
from lmgrad.analysis.stability import DISSOLVED, STABLE
from lmgrad.analysis.stats import ALPHA, StatResult, format_p, min_attainable_p, p_text
from lmgrad.analysis.uncertainty import offdiag

_PROVENANCE_KEYS = ("model", "model_id", "revision", "projector", "projection", "k", "seed",
                    "dtype", "tasks", "grads", "mode", "lmgrad_version", "git_commit")
_KIND_TEXT = {"unbiased": "unbiased disattenuated cosine of task means (U-statistics, no "
                          "self-pair terms)",
              "raw": "cosine of sample means (shrinks toward 0 with fewer or noisier pairs)",
              "pair": "mean cosine over pairs of pairs (mixes alignment with coherence)"}


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


def _cell_text(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|")


def _np(st: StatResult | None) -> int | None:
    return (st.extra or {}).get("n_perm") if st is not None else None


def _sig(p: float | None) -> bool:
    return p is not None and np.isfinite(p) and p < ALPHA


# ---------------------------------------------------------------------------------- headline

def _headline(r: TaskSpaceResult) -> list[str]:
    hyp = r.hypothesis.name
    out = [f"## Headline: `{hyp}` controlled for surface similarity", ""]
    m = r.stats.get("mantel")
    c = r.controlled
    if c is not None:
        verdict = ("**the hypothesis explains gradient similarity beyond the surface controls**"
                   if _sig(c.p_value) else
                   "**no evidence that the hypothesis explains gradient similarity beyond the "
                   "surface controls**")
        ctrl = ", ".join(f"`{s}`" for s in (r.surface.spaces if r.surface else {}))
        method = {"freedman_lane": "MRQAP, Freedman–Lane permutation of residuals",
                  "dsp": "MRQAP, double semi-partialling",
                  "partial_mantel": "partial Mantel test"}[c.method]
        out.append(f"- {verdict}: {method}, t = {c.statistic:.2f} (coefficient {c.coef:.3f}), "
                   f"{c.p_text()} ({c.n_perm} permutations of tasks, {c.n} task pairs), "
                   f"controlling for {ctrl}. Reference: {c.reference}.")
        if c.dropped:
            out.append(f"- Left out (undefined rows): {', '.join(c.dropped)}.")
    else:
        out.append(f"- **{r.surface_note or 'no controlled test'}.** The result below is "
                   "*not* controlled for surface similarity: tasks that share a category also "
                   "share templates and words, which can produce the same agreement.")
    if m is not None and np.isfinite(m.statistic):
        lead = "Uncontrolled" if c is not None else "Uncontrolled (the only test available)"
        out.append(f"- {lead}: Mantel r = {m.statistic:.3f}, {p_text(m.p_value, _np(m))} "
                   f"({m.n} task pairs)"
                   + (f"; within {m_wb(r)}" if "within_between" in r.stats else "") + ".")
    if c is not None and m is not None and _sig(m.p_value) and not _sig(c.p_value):
        out.append("- The uncontrolled agreement does not survive the surface controls: read it "
                   "as surface similarity (shared words, templates, lengths), not as evidence "
                   "for the hypothesis.")
    if r.surface_fits:
        out += ["", "Each surface space's own fit to the hypothesis (Mantel, one-sided):", "",
                "| surface space | what it measures | r | p |", "|---|---|---|---|"]
        for name, st in r.surface_fits.items():
            out.append(f"| `{name}` | {_cell_text(r.surface.description.get(name, ''))} | "
                       f"{_fmt(st.statistic)} | {format_p(st.p_value, _np(st))} |")
    if r.surface_note and c is not None:
        out += ["", f"Note: {r.surface_note}."]
    return out + [""]


def m_wb(r: TaskSpaceResult) -> str:
    wb = r.stats["within_between"]
    if not np.isfinite(wb.statistic):
        return "/between undefined"
    e = wb.extra
    return (f"{e['within']:.3f} vs between {e['between']:.3f}, difference {wb.statistic:.3f}, "
            f"{p_text(wb.p_value, _np(wb))}")


# ---------------------------------------------------------------------------------- warnings

def _warnings(r: TaskSpaceResult) -> list[str]:
    lines = []
    for w in r.warnings:
        lines.append(f"- {w}")
    rel = r.reliability
    if not np.isfinite(rel.spearman_brown):
        lines.append(f"- Reliability could not be estimated ({rel.interpretation}); read every "
                     "number as provisional.")
    elif rel.spearman_brown < 0.7:
        lines.append(f"- **The task space is not reliable at this sample size** (split-half "
                     f"reliability {rel.spearman_brown:.2f} < 0.7, min {int(r.counts.min())} "
                     "pairs per task): differences between entries mostly reflect which pairs "
                     "were sampled.")
    if r.hypothesis.categories is not None:
        pmin = min_attainable_p(r.hypothesis.categories)
        if pmin > ALPHA:
            lines.append(f"- With {len(r.names)} tasks in this grouping no permutation test can "
                         f"reach p < {ALPHA}: the smallest attainable p is {pmin:.3g}.")
    if not lines:
        return []
    return ["## Warnings", ""] + lines + [""]


# ---------------------------------------------------------------------------------- robustness

def _cell(st: StatResult | None, value: str = "statistic") -> str:
    if st is None or not np.isfinite(st.statistic):
        return "n/a"
    return f"{st.statistic:.3f} ({p_text(st.p_value, _np(st))})"


def _robustness(r: TaskSpaceResult) -> list[str]:
    if not r.robustness:
        return []
    out = [f"## Robustness across geometries ({r.kind} estimator)", "",
           "| geometry | within − between | Mantel r | controlled t | ARI | undefined | "
           "r with headline | what was done |", "|---|---|---|---|---|---|---|---|"]
    for row in r.robustness:
        if not row.available:
            out.append(f"| {row.label} | n/a | n/a | n/a | n/a | | | {_cell_text(row.note)} |")
            continue
        c = row.controlled
        ctrl = f"{c.statistic:.2f} ({c.p_text()})" if c is not None else "n/a"
        out.append(f"| {row.label} | {_cell(row.tests.get('within_between'))} | "
                   f"{_cell(row.tests.get('mantel'))} | {ctrl} | "
                   f"{_cell(row.tests.get('cluster_ari'))} | {len(row.undefined)} | "
                   f"{_fmt(row.agreement)} | {_cell_text(row.note)} |")
    out += [""] + _survivors(r.robustness) + [""]
    return out


def _survivors(rows: Sequence[RobustnessRow]) -> list[str]:
    avail = [row for row in rows if row.available]
    lines = []
    for key, label in (("controlled", "controlled test"), ("mantel", "Mantel test"),
                       ("within_between", "within − between"), ("cluster_ari", "ARI")):
        ps = {}
        for row in avail:
            st = row.controlled if key == "controlled" else row.tests.get(key)
            if st is not None:
                ps[row.label] = st.p_value
        if not ps:
            continue
        sig = [g for g, p in ps.items() if _sig(p)]
        if len(sig) == len(ps):
            lines.append(f"- {label}: significant at {ALPHA} under all {len(ps)} geometries.")
        elif not sig:
            lines.append(f"- {label}: not significant under any geometry.")
        else:
            lines.append(f"- {label}: significant under {', '.join(sig)}; **not** under "
                         f"{', '.join(g for g in ps if g not in sig)}: this conclusion depends "
                         "on the geometry.")
    return lines


# ---------------------------------------------------------------------------------- stability

def _stability(r: TaskSpaceResult) -> list[str]:
    out = ["## Stability of structure", ""]
    if r.stability is None:
        return out + [f"- {r.stability_note}.", ""]
    cc = r.stability.coclustering
    out.append(f"Bootstrap co-clustering: {cc.n_boot} resamples of pairs within tasks, each "
               f"clustered (average linkage) into {r.stability.how_k}. A block is called "
               f"**robust** only when its Jaccard stability (Hennig 2007: mean best match over "
               f"resamples) is ≥ {STABLE}; ≤ {DISSOLVED} reads as dissolved. Matrix: "
               "`coclustering` in task_space.npz, figure coclustering.png. Stability says a "
               "block is reproducible under resampling of pairs, not what makes it: read it with "
               "the controlled test above.")
    out.append("")

    def table(blocks: list[dict], what: str) -> list[str]:
        rows = [f"| {what} | tasks | co-clustering within | with others | Jaccard | reading |",
                "|---|---|---|---|---|---|"]
        for b in blocks:
            reading = {"stable": "**robust**", "dissolved": "dissolves under resampling",
                       "unclear": "not robust (unclear)"}[b["verdict"]]
            tasks = ", ".join(b["tasks"]) if len(b["tasks"]) <= 6 else \
                f"{', '.join(b['tasks'][:5])}, … ({len(b['tasks'])})"
            rows.append(f"| {b['block']} | {tasks} | {_fmt(b['within'], 2)} | "
                        f"{_fmt(b['outside'], 2)} | {_fmt(b['jaccard'], 2)} | {reading} |")
        return rows + [""]

    if r.stability.categories is not None:
        out += [f"Per `{r.hypothesis.name}` category (does each hypothesised block hold together "
                "in the gradient space?):", ""] + table(r.stability.categories, "category")
    out += ["Per cluster of the full-data task space:", ""] + table(r.stability.clusters,
                                                                    "cluster")
    return out


# ---------------------------------------------------------------------------------- details

def _summary(r: TaskSpaceResult, summary: Mapping[str, Any]) -> list[str]:
    hyp = r.hypothesis.name
    lines = []
    rel = r.reliability
    if np.isfinite(rel.spearman_brown):
        lines.append(f"- Split-half reliability {rel.spearman_brown:.2f} (Spearman–Brown, "
                     f"{rel.n_splits} random splits, same estimator): {rel.interpretation}.")
    ari = r.stats.get("cluster_ari")
    if ari is not None:
        e = ari.extra
        good = _sig(ari.p_value)
        lines.append(f"- Clustering the tasks into {e['n_clusters']} groups "
                     f"{'recovers' if good else 'does not recover'} the `{hyp}` categories "
                     f"beyond chance (ARI {ari.statistic:.2f}; chance 95th percentile "
                     f"{e['null_q95']:.2f}, {p_text(ari.p_value, _np(ari))}).")
    coh = np.diag(r.pair_cosine)
    lines.append(f"- Within-task coherence (mean cosine between a task's pairs) has median "
                 f"{np.nanmedian(coh):.3f} (range {np.nanmin(coh):.3f} to {np.nanmax(coh):.3f}).")
    off = offdiag(r.similarity)
    iv = summary["interval"]
    if np.isfinite(off).any():
        lines.append(f"- Off-diagonal similarities range from {np.nanmin(off):.3f} to "
                     f"{np.nanmax(off):.3f} (mean {np.nanmean(off):.3f}); median "
                     f"{1 - r.interval.alpha:.0%} {iv['method']} interval width "
                     f"{_fmt(iv['width_median'])}.")
    raw = offdiag(r.alternatives["raw"])
    if r.kind != "raw" and np.isfinite(raw).any():
        lines.append(f"- For comparison the raw cosine of means averages {np.nanmean(raw):.3f} "
                     "off the diagonal; it is pulled toward 0 by noise, by an amount that depends "
                     "on each task's pair count and coherence.")
    if r.sketch_check is not None:
        lines.append(f"- Sketch-error check against a second store: "
                     f"{r.sketch_check.interpretation}.")
    lines.append("- The tests address one question several ways and are not corrected for "
                 "multiple comparisons; permutation p-values respect the dependence between "
                 "matrix entries, the parametric Spearman/Pearson p-values do not.")
    return lines


def _top_pairs(r: TaskSpaceResult, n: int = 5) -> list[str]:
    iu = np.triu_indices(len(r.names), 1)
    vals = r.similarity[iu]
    ok = np.flatnonzero(np.isfinite(vals))
    if ok.size == 0:
        return []
    order = ok[np.argsort(vals[ok])]
    lvl = f"{1 - r.interval.alpha:.0%}"
    rows = [f"| | task a | task b | similarity | {lvl} CI ({r.interval.method}) |",
            "|---|---|---|---|---|"]
    lo, hi = r.interval.low, r.interval.high
    for label, picks in (("most similar", order[::-1][:n]), ("least similar", order[:n])):
        for j in picks:
            a, b = iu[0][j], iu[1][j]
            rows.append(f"| {label} | {r.names[a]} | {r.names[b]} | {vals[j]:.3f} | "
                        f"[{_fmt(lo[a, b])}, {_fmt(hi[a, b])}] |")
    return rows


def _group_table(r: TaskSpaceResult) -> list[str]:
    if r.global_only:
        return ["The sketch is a single global block, so it mixes all parameters: there is no "
                "per-layer or per-module view for this store."]
    h = offdiag(r.hypothesis.matrix)
    rows = [f"| {r.group_by} | mean off-diag similarity | Pearson r with hypothesis |",
            "|---|---|---|"]
    for g, s in r.groups.items():
        x = offdiag(s)
        ok = np.isfinite(x)
        rr = (np.corrcoef(x[ok], h[ok])[0, 1] if ok.sum() > 2 and x[ok].std() > 0
              and h[ok].std() > 0 else float("nan"))
        rows.append(f"| {g} | {_fmt(float(np.nanmean(x)) if ok.any() else None)} | {_fmt(rr)} |")
    rows += ["", "Per-group correlations are descriptive (no permutation test per group)."]
    return rows


def render(result: TaskSpaceResult, summary: Mapping[str, Any],
           provenance: Mapping[str, Any]) -> str:
    """Markdown report; figures are referenced by their file names next to report.md."""
    r = result
    s = r.settings
    out = ["# Task space report", "",
           f"Task similarity: {_KIND_TEXT[r.kind]}; raw cosine and mean pair cosine are saved "
           "as alternatives (`similarity_raw`, `similarity_pair` in task_space.npz).", ""]
    out += _headline(r)
    out += _warnings(r)
    out += _robustness(r)
    out += _stability(r)
    out += ["## Summary", ""] + _summary(r, summary) + [""]
    out += ["## Provenance", "", "| key | value |", "|---|---|"]
    prov = dict(provenance)
    for key in sorted(prov, key=lambda k: (not any(k.endswith(p) for p in _PROVENANCE_KEYS), k)):
        out.append(f"| {key} | {prov[key]} |")
    out += [f"| similarity | {s['kind']} |", f"| interval | {s['interval']} |",
            f"| sketch width k | {s['k']} |", f"| pairs | {s['n_pairs']} |",
            f"| tasks | {s['n_tasks']} |",
            f"| pairs per task (min / median / max) | {int(r.counts.min())} / "
            f"{float(np.median(r.counts)):g} / {int(r.counts.max())} |",
            f"| hypothesis | {r.hypothesis.name} ({r.hypothesis.n_categories or 'matrix'}"
            f"{' categories' if r.hypothesis.n_categories else ''}) |",
            f"| preconditioner reference | {s['preconditioner_reference']}, damping "
            f"{s['damping']:g} |",
            f"| analysis seed | {s['seed']} |", ""]
    out += ["## Statistics (uncontrolled, over the defined tasks)", "",
            "| test | statistic | p | n | reading |", "|---|---|---|---|---|"]
    for st in r.stats.values():
        out.append(f"| {st.name} | {_fmt(st.statistic)} | {format_p(st.p_value, _np(st))} | "
                   f"{st.n} | {_cell_text(st.interpretation)} |")
    rel = r.reliability
    out.append(f"| split-half reliability | {_fmt(rel.spearman_brown)} (half r "
               f"{_fmt(rel.r_half)} ± {_fmt(rel.r_half_sd)}) | | {rel.n_tasks} tasks | "
               f"{rel.interpretation} |")
    if r.sketch_check is not None:
        c = r.sketch_check
        out.append(f"| sketch check | {_fmt(c.statistic)} | | {c.n} | {c.interpretation} |")
    out += [""]
    out += ["## Figures", "", "![Clustered task similarity](heatmap.png)", "",
            f"![Per-{r.group_by} task similarity](layers.png)", "",
            "![Similarity by hypothesis](hypothesis.png)", ""]
    if r.stability is not None:
        out += ["![Bootstrap co-clustering](coclustering.png)", ""]
    out += [f"## Where in the network ({'per ' + r.group_by if not r.global_only else 'global'})",
            ""] + _group_table(r) + [""]
    out += ["## Extremes", ""] + _top_pairs(r) + [""]
    out += ["## Per task", "", "| task | pairs | coherence | ‖μ‖² estimate | status |",
            "|---|---|---|---|---|"]
    for name, cnt, coh, nm2, ok in zip(r.names, r.counts, np.diag(r.pair_cosine), r.norm2,
                                       r.defined):
        status = "defined" if ok else f"undefined: {r.undefined_notes.get(str(name), '')}"
        out.append(f"| {name} | {cnt} | {_fmt(float(coh))} | {float(nm2):.3g} | {status} |")
    out.append("")
    return "\n".join(out)
