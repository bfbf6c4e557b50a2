"""The geometry of a task space, in Gram form: one pass over the sketch columns gives every view.

Every estimator in :mod:`lmgrad.analysis.estimators` (unbiased, raw and pair cosines, their
jackknife and bootstrap, split halves, co-clustering) depends on the rows x_a only through inner
products ⟨x_a, x_b⟩. So an [N, K] store with K ~ 10⁵ and N ~ 10³ reduces, in one pass over its
columns, to N × N Gram matrices, one per geometry:

* ``euclidean``: the plain inner product of the sketches (the headline);
* ``equal_blocks``: each layout block scaled to equal mean squared norm over the pairs
  (:func:`lmgrad.analysis.precondition.equalize_blocks`, ``mode="expected"``);
* ``no_norms`` / ``no_embed_head``: norm blocks, or the embedding and head blocks (an embedding that
  is also the head is the tied block, ``embed+head (tied)``), left out;
* ``preconditioned``: Σ_b x_bᵀ (Σ_b + δ_b I)⁻¹ y_b with Σ_b the second moment of a named reference
  set of sketch rows and δ_b = damping · tr Σ_b / d_b (d_b the block's sketch width; the layout
  does not record parameter counts), as :mod:`lmgrad.analysis.precondition`, computed here
  without materialising whitened rows.

A root Z [N, r] with Z Zᵀ = G then stands in for the rows: running an estimator on Z gives what it
gives on the rows under that geometry (up to round-off), at O(N²) cost instead of O(N·K).
The per-group view (per layer, module type or block) accumulates, per group, the task-level Gram
of sums [T, T] and squared norms, which is all the task-space estimators need.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import linalg as sla

from lmgrad.analysis.estimators import TaskMoments
from lmgrad.analysis.precondition import DAMPING
from lmgrad.analysis.space import (TIED_GROUP, group_columns, group_key, module_group,
                                   normalize_layout)

GEOMETRIES = ("euclidean", "equal_blocks", "no_norms", "no_embed_head", "preconditioned")
EXCLUDED_TYPES = {"no_norms": ("norm",), "no_embed_head": ("embed", "head")}
CHUNK_COLS = 8192  # float64 [N, 8192] per chunk: 52 MB at N = 800


@dataclasses.dataclass
class Geometry:
    """Row inner products [N, N] under one geometry (``gram`` None: not applicable, see ``note``)."""
    name: str
    label: str
    gram: np.ndarray | None
    note: str
    dropped: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GramPass:
    """What one pass over the sketch columns produced."""
    geometries: dict[str, Geometry]
    groups: dict[str, TaskMoments]          # per-group task moments (euclidean), network order
    preconditioner: dict[str, Any] | None   # reference, damping, per-block δ


def task_onehot(idx: np.ndarray, t: int) -> np.ndarray:
    """[T, N] float64 indicator of each row's task."""
    oh = np.zeros((t, len(idx)))
    oh[idx, np.arange(len(idx))] = 1.0
    return oh


def psd_root(g: np.ndarray) -> np.ndarray:
    """A root R with R Rᵀ = g for a symmetric PSD matrix (eigenvalues below round-off dropped)."""
    g = (np.asarray(g, np.float64) + np.asarray(g, np.float64).T) / 2
    e, v = np.linalg.eigh(g)
    keep = e > max(e.max(initial=0.0), 0.0) * 1e-13 * len(e)
    return v[:, keep] * np.sqrt(e[keep])


def moments_from_gram(gram_nn: np.ndarray, names: np.ndarray, idx: np.ndarray, *,
                      unit: bool = False) -> TaskMoments:
    """Task moments (:class:`lmgrad.analysis.estimators.TaskMoments`) from row inner products.

    ``sums_tk`` (and ``unit_sums_tk``) are [T, T] roots of the Gram of task sums, which is all
    :func:`lmgrad.analysis.estimators.similarity_from_moments` reads of them.
    """
    t = len(names)
    oh = task_onehot(idx, t)
    g = np.asarray(gram_nn, np.float64)
    sq = np.diag(g)
    usums = None
    if unit:
        if (sq <= 0).any():
            raise ValueError(f"sketches: all-zero row(s) {np.flatnonzero(sq <= 0)[:10]} "
                             "(cosine undefined for kind='pair')")
        d = 1.0 / np.sqrt(sq)
        usums = psd_root(oh @ (g * np.outer(d, d)) @ oh.T)
    return TaskMoments(names, np.bincount(idx, minlength=t), psd_root(oh @ g @ oh.T),
                       oh @ sq, usums)


def rows_from_gram(gram_nn: np.ndarray) -> np.ndarray:
    """Stand-in rows Z [N, r], Z Zᵀ = G, for running row-based estimators under a geometry."""
    return psd_root(gram_nn)


def _whitener(r_md: np.ndarray, delta: float) -> np.ndarray:
    """Lower Cholesky factor L of RᵀR/M + δI: L⁻¹xᵀ whitens a block (d ≤ M)."""
    m, d = r_md.shape
    a = r_md.T @ r_md / m
    a[np.diag_indices(d)] += delta
    return np.linalg.cholesky(a)


def precondition_gram(x_nd: np.ndarray, ref_md: np.ndarray | None, delta: float) -> np.ndarray:
    """[N, N] X (RᵀR/M + δI)⁻¹ Xᵀ for one block (R = X when ``ref_md`` is None).

    d ≤ M: a Cholesky factor of the d × d moment. d > M: the push-through (Woodbury) form with an
    M × M solve, (1/δ)(XXᵀ − XRᵀ(MδI + RRᵀ)⁻¹RXᵀ), which for R = X is M·G(G + MδI)⁻¹.
    """
    x = np.asarray(x_nd, np.float64)
    r = x if ref_md is None else np.asarray(ref_md, np.float64)
    m, d = r.shape
    if d <= m:
        y = sla.solve_triangular(_whitener(r, delta), x.T, lower=True)  # [d, N]
        return y.T @ y
    c = r @ r.T
    c[np.diag_indices(m)] += m * delta
    cf = sla.cho_factor(c)
    if ref_md is None:
        out = m * sla.cho_solve(cf, c - m * delta * np.eye(m))  # (G + cI)⁻¹ G, G = XXᵀ
    else:
        p = x @ r.T
        out = (x @ x.T - p @ sla.cho_solve(cf, p.T)) / delta
    return (out + out.T) / 2


def _dropped_label(blocks: Sequence[Mapping[str, Any]]) -> str:
    groups = list(dict.fromkeys(module_group(b) for b in blocks))
    return ", ".join(groups)


def _chunks(blocks: list[dict], width: int) -> list[list[dict]]:
    """Consecutive blocks packed into column chunks of at most ``width`` (a wider block alone)."""
    out: list[list[dict]] = [[]]
    size = 0
    for b in blocks:
        if out[-1] and size + b["size"] > width:
            out.append([])
            size = 0
        out[-1].append(b)
        size += b["size"]
    return out


def _type_class(block: Mapping[str, Any]) -> str:
    for cls, types in (("norm", EXCLUDED_TYPES["no_norms"]),
                       ("embed_head", EXCLUDED_TYPES["no_embed_head"])):
        if block["type"] in types:
            return cls
    return "other"


def gram_pass(x_nk: np.ndarray, names: np.ndarray, idx: np.ndarray,
              layout: Sequence[Mapping[str, Any]] | None, *, group_by: str = "layer",
              geometries: Sequence[str] = GEOMETRIES, damping: float = DAMPING,
              reference: np.ndarray | None = None, reference_name: str = "the analysed pairs",
              unit_groups: bool = False) -> GramPass:
    """Gram matrices of every geometry in ``geometries`` and per-group task moments, reading
    ``x_nk`` (possibly memory-mapped) a chunk of whole layout blocks at a time, in float64.

    Cost: one N × N product over all columns per family (the Euclidean family shares one, split
    by block type; equal weighting and preconditioning add one each) plus, for preconditioning,
    a d × d Cholesky per block (an M × M one where d exceeds the M reference rows).
    ``reference`` [M, K] (same layout) is the preconditioner's reference set; None uses the rows
    themselves (then the preconditioned estimate is not exactly unbiased: the transform depends
    on the data it is applied to, a small effect when N ≫ the block widths). ``unit_groups``
    also gives the per-group moments of unit rows (for the pair-cosine kind).
    """
    unknown = sorted(set(geometries) - set(GEOMETRIES))
    if unknown:
        raise ValueError(f"geometries: unknown {unknown}; known: {GEOMETRIES}")
    n, k = x_nk.shape
    t = len(names)
    blocks = normalize_layout(layout, k)
    single = len(blocks) == 1
    if reference is not None and (reference.ndim != 2 or reference.shape[1] != k):
        raise ValueError(f"preconditioner reference: shape {reference.shape}, sketches have "
                         f"{k} columns")
    oh = task_onehot(idx, t)
    gb_by = "block" if single else group_by
    cols = group_columns(layout, k, gb_by)  # network order of the groups
    block_group = {b["name"]: group_key(b, gb_by) for b in blocks}
    # Pre-pass: per-block squared row norms (equal weighting, unit rows per group).
    row_sq = np.zeros((len(blocks), n))
    for i, b in enumerate(blocks):
        xb = np.asarray(x_nk[:, b["offset"]:b["offset"] + b["size"]], np.float64)
        row_sq[i] = np.einsum("nd,nd->n", xb, xb)
    group_sq = {g: np.zeros(n) for g in cols}
    for i, b in enumerate(blocks):
        group_sq[block_group[b["name"]]] += row_sq[i]
    want = set(geometries)
    euclid_family = want & {"euclidean", "no_norms", "no_embed_head"}
    cls_acc = {c: np.zeros((n, n)) for c in ("norm", "embed_head", "other")} \
        if euclid_family else {}
    eq_acc = np.zeros((n, n)) if "equal_blocks" in want else None
    pre_acc = np.zeros((n, n)) if "preconditioned" in want else None
    sums_tt = {g: np.zeros((t, t)) for g in cols}
    unit_tt = {g: np.zeros((t, t)) for g in cols}
    deltas: dict[str, float | None] = {}
    b_index = {b["name"]: i for i, b in enumerate(blocks)}
    for chunk in _chunks(blocks, CHUNK_COLS):
        lo, hi = chunk[0]["offset"], chunk[-1]["offset"] + chunk[-1]["size"]
        xc = np.asarray(x_nk[:, lo:hi], np.float64)
        local = {b["name"]: slice(b["offset"] - lo, b["offset"] - lo + b["size"]) for b in chunk}
        sc = oh @ xc
        for g in dict.fromkeys(block_group[b["name"]] for b in chunk):
            c = np.concatenate([np.arange(hi - lo)[local[b["name"]]] for b in chunk
                                if block_group[b["name"]] == g])
            sums_tt[g] += sc[:, c] @ sc[:, c].T
            if unit_groups:
                nrm = np.sqrt(group_sq[g])
                u = (oh / np.where(nrm > 0, nrm, 1.0)[None, :]) @ xc[:, c]
                unit_tt[g] += u @ u.T
        if cls_acc:
            for cls in cls_acc:
                c = [np.arange(hi - lo)[local[b["name"]]] for b in chunk if _type_class(b) == cls]
                if c:
                    xs = xc[:, np.concatenate(c)]
                    cls_acc[cls] += xs @ xs.T
        if eq_acc is not None:
            scale = np.ones(hi - lo)
            for b in chunk:
                tr = row_sq[b_index[b["name"]]].sum()
                scale[local[b["name"]]] = np.sqrt(n / tr) if tr > 0 else 0.0
            xe = xc * scale[None, :]
            eq_acc += xe @ xe.T
        if pre_acc is not None:
            white = []
            for b in chunk:
                xb = xc[:, local[b["name"]]]
                rb = xb if reference is None else \
                    np.asarray(reference[:, b["offset"]:b["offset"] + b["size"]], np.float64)
                rtr = float(np.einsum("md,md->", rb, rb)) / rb.shape[0]
                if rtr <= 0:  # zero on the reference: nothing to precondition, block left out
                    deltas[b["name"]] = None
                    continue
                delta = damping * rtr / b["size"]
                deltas[b["name"]] = delta
                if b["size"] <= rb.shape[0]:
                    white.append(sla.solve_triangular(_whitener(rb, delta), xb.T, lower=True).T)
                else:
                    pre_acc += precondition_gram(xb, None if reference is None else rb, delta)
            if white:
                w = np.hstack(white)
                pre_acc += w @ w.T
    grams: dict[str, np.ndarray] = {}
    if cls_acc:
        grams["euclidean"] = cls_acc["norm"] + cls_acc["embed_head"] + cls_acc["other"]
        grams["no_norms"] = cls_acc["embed_head"] + cls_acc["other"]
        grams["no_embed_head"] = cls_acc["norm"] + cls_acc["other"]
    out: dict[str, Geometry] = {}
    for name in geometries:
        if name == "euclidean":
            out[name] = Geometry(name, "Euclidean (raw sketch)", grams[name],
                                 "plain inner product of the sketches")
        elif name == "equal_blocks":
            note = ("one global block: identical to Euclidean up to scale" if single else
                    f"each of {len(blocks)} blocks scaled to equal mean squared norm over the pairs")
            out[name] = Geometry(name, "equal block weighting", eq_acc, note)
        elif name in EXCLUDED_TYPES:
            what = "norms" if name == "no_norms" else _embed_head_label(blocks)
            label = f"without {what}"
            gone = [b for b in blocks if b["type"] in EXCLUDED_TYPES[name]]
            if not gone:
                out[name] = Geometry(name, label, None,
                                     "not applicable: no such block in the layout"
                                     + (" (one global block)" if single else ""))
            elif len(gone) == len(blocks):
                out[name] = Geometry(name, label, None, "not applicable: it would leave no block",
                                     [b["name"] for b in gone])
            else:
                out[name] = Geometry(name, label, grams[name],
                                     f"left out {len(gone)} block(s): {_dropped_label(gone)}",
                                     [b["name"] for b in gone])
        else:
            out[name] = Geometry(name, f"preconditioned (damping {damping:g})", pre_acc,
                                 f"per-block (Σ_b + δ_b I)⁻¹, Σ_b the second moment of "
                                 f"{reference_name}, δ_b = {damping:g}·tr(Σ_b)/d_b")
    counts = np.bincount(idx, minlength=t)
    groups = {g: TaskMoments(names, counts, psd_root(sums_tt[g]), oh @ group_sq[g],
                             psd_root(unit_tt[g]) if unit_groups else None) for g in cols}
    pre = None
    if pre_acc is not None:
        pre = {"reference": reference_name,
               "n_reference": int(n if reference is None else reference.shape[0]),
               "damping": damping,
               "convention": "delta_b = damping * tr(Sigma_b) / d_b (d_b: the block's sketch width)",
               "delta": deltas}
    return GramPass(out, groups, pre)


def _embed_head_label(blocks: Sequence[Mapping[str, Any]]) -> str:
    if any(b.get("tied") for b in blocks):
        return TIED_GROUP
    return "embedding and head"
