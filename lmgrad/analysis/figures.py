"""Figures for a task space (matplotlib): clustered heatmap, per-group panels, hypothesis view.

Sized for up to ~70 tasks: labels shrink with T so every task name stays legible at 150 dpi.

matplotlib is imported inside the plotting functions and only its object API is used (a
`matplotlib.figure.Figure` rendered to PNG bytes, no pyplot), which needs no backend: importing
`lmgrad.analysis` does not load matplotlib, and plotting keeps whatever backend the caller chose.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.cluster import hierarchy

from lmgrad import io as lio
from lmgrad.analysis.stats import cluster_linkage
from lmgrad.analysis.uncertainty import offdiag

DPI = 150


def _save(fig: Any, path: str) -> None:
    # Render to memory, then replace the file atomically: no half-written PNG next to report.md.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    lio.atomic_write(path, buf.getvalue())


def _label_size(t: int) -> float:
    return float(np.clip(360.0 / max(t, 1), 4.0, 9.0))


def _vlim(sim: np.ndarray) -> float:
    off = offdiag(sim)
    off = off[np.isfinite(off)]
    # Scale to off-diagonal entries: the unit diagonal would otherwise wash out the colours.
    return float(max(np.max(np.abs(off)) if off.size else 1.0, 1e-6))


def _category_colours(categories: np.ndarray) -> tuple[np.ndarray, dict[str, tuple]]:
    import matplotlib

    uniq = list(dict.fromkeys(categories.tolist()))
    cmap = matplotlib.colormaps["tab20" if len(uniq) > 10 else "tab10"]
    lut = {c: cmap(i % cmap.N) for i, c in enumerate(uniq)}
    return np.array([lut[c] for c in categories]), lut


def cluster_order(sim: np.ndarray) -> np.ndarray:
    """Task order of the average-linkage dendrogram leaves (identity if clustering fails)."""
    try:
        return np.asarray(hierarchy.leaves_list(cluster_linkage(sim)))
    except ValueError:
        return np.arange(sim.shape[0])


def plot_heatmap(sim: np.ndarray, names: Sequence[str], path: str, *,
                 categories: Sequence[str] | None = None, title: str = "Task similarity") -> np.ndarray:
    """Clustered heatmap with a dendrogram and a category colour bar; returns the task order."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    sim = np.asarray(sim, np.float64)
    names = np.asarray(names).astype(str)
    t = len(names)
    fs = _label_size(t)
    size = float(np.clip(0.16 * t + 4, 6, 16))
    fig = Figure(figsize=(size + 1.5, size))
    # The spacer column leaves room for the task labels on the right before the colour scale.
    gs = fig.add_gridspec(1, 5, width_ratios=[1.6, 0.25, size, 1.8, 0.3], wspace=0.02)
    ax_d = fig.add_subplot(gs[0])
    try:
        z = cluster_linkage(sim)
        dn = hierarchy.dendrogram(z, orientation="left", ax=ax_d, no_labels=True,
                                  color_threshold=0, above_threshold_color="0.3")
        order = np.asarray(dn["leaves"])[::-1]  # dendrogram draws bottom-up; heatmap top-down
    except ValueError:
        order = np.arange(t)
    ax_d.axis("off")
    ax_c = fig.add_subplot(gs[1])
    ax_h = fig.add_subplot(gs[2])
    v = _vlim(sim)
    im = ax_h.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-v, vmax=v,
                     interpolation="nearest", aspect="auto")
    ax_h.set_xticks(range(t), names[order], rotation=90, fontsize=fs)
    ax_h.set_yticks(range(t), names[order], fontsize=fs)
    ax_h.yaxis.tick_right()
    ax_h.set_title(title, fontsize=10)
    if categories is not None:
        cats = np.asarray(categories).astype(str)
        rgba, lut = _category_colours(cats)
        ax_c.imshow(rgba[order][:, None, :], aspect="auto", interpolation="nearest")
        handles = [Patch(color=c, label=k) for k, c in lut.items()]
        fig.legend(handles=handles, loc="lower left", fontsize=max(fs, 5), frameon=False,
                   ncol=max(1, len(lut) // 12 + 1), title="category", title_fontsize=7)
    ax_c.axis("off")
    cax = fig.add_subplot(gs[4])
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    ax_d.set_ylim(ax_d.get_ylim())  # keep dendrogram leaves aligned with heatmap rows
    _save(fig, path)
    return order


def plot_groups(group_sims: Mapping[str, np.ndarray], names: Sequence[str], order: np.ndarray,
                path: str, *, note: str | None = None) -> None:
    """Small heatmaps per layer / module type, all in the same task order (one shared scale)."""
    from matplotlib.figure import Figure

    groups = list(group_sims)
    g = len(groups)
    ncol = int(np.ceil(np.sqrt(g)))
    nrow = int(np.ceil(g / ncol))
    t = len(names)
    panel = 2.6 if t <= 30 else 3.2
    fig = Figure(figsize=(panel * ncol, panel * nrow + 0.4))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    v = max(_vlim(s) for s in group_sims.values())
    im = None
    show_labels = g == 1 or t <= 12
    for ax, name in zip(axes.flat, groups):
        s = group_sims[name][np.ix_(order, order)]
        im = ax.imshow(s, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_title(name, fontsize=7)
        if show_labels:
            lab = np.asarray(names).astype(str)[order]
            ax.set_xticks(range(t), lab, rotation=90, fontsize=_label_size(t) * 0.8)
            ax.set_yticks(range(t), lab, fontsize=_label_size(t) * 0.8)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[g:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6).ax.tick_params(labelsize=7)
    fig.suptitle(note or "Task similarity per group (same task order as the heatmap)", fontsize=9)
    _save(fig, path)


def plot_hypothesis(sim: np.ndarray, hyp: np.ndarray, path: str, *, categorical: bool,
                    title: str = "") -> None:
    """Off-diagonal similarity by hypothesis value: box + jittered points for a grouping
    (same vs different category), a scatter for a free hypothesis matrix."""
    from matplotlib.figure import Figure

    x, h = offdiag(sim), offdiag(hyp)
    ok = np.isfinite(x)
    x, h = x[ok], h[ok]
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    if categorical:
        groups = [x[h == 0], x[h == 1]]
        labels = [f"different\n(n={len(groups[0])})", f"same\n(n={len(groups[1])})"]
        ax.boxplot([g if len(g) else [np.nan] for g in groups], showfliers=False)
        ax.set_xticks([1, 2], labels)
        for i, gv in enumerate(groups, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(gv)), gv, s=4, alpha=0.4, color="C0")
        ax.set_xlabel("category")
    else:
        ax.scatter(h, x, s=5, alpha=0.5)
        ax.set_xlabel("hypothesis value")
    ax.set_ylabel("task similarity")
    ax.set_title(title, fontsize=9)
    _save(fig, path)

