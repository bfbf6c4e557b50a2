"""Geometry of the sketch space: curvature preconditioning, per-block weighting, excluded groups.

A plain inner product of gradients lets the directions with the largest per-example variance (often
embeddings, norms, the head) dominate a task space. The training-data-attribution literature
preconditions instead: TRAK uses (ΦᵀΦ)⁻¹ over projected per-example gradients Φ (Park et al. 2023),
LoGra a damped, projected K-FAC per layer (Choe et al. 2024). Here, per layout block b with sketch
columns x_b, from a reference set of sketch rows R [M, K] (name it: ``reference=``):

    Σ_b = R_bᵀ R_b / M                                  (uncentred second moment, as TRAK's ΦᵀΦ)
    δ_b = λ · tr(Σ_b) / D_b                             (relative damping, λ = ``damping``)
    ⟨x, y⟩_F = Σ_b x_bᵀ (Σ_b + δ_b I)⁻¹ y_b

D_b is the block's parameter count when ``n_params`` is given, else its sketch width (then δ_b is
λ times the mean eigenvalue of Σ_b, LoGra's convention). With the parameter count, δ_b is the same
absolute damping in parameter space whatever the sketch width, because a norm-preserving
projection keeps tr(Σ_b): that is what lets sketch-space preconditioning converge to the
full-gradient one as K grows (``bench/bench_stats.py``, ``bench/results/stats_precondition.json``).

The preconditioner is applied as a linear transform ``whiten(x)`` = x_b (Σ_b + δ_b I)^(−1/2), so
every estimator in :mod:`lmgrad.analysis.estimators` runs unchanged on whitened rows (the
unbiased U-statistics stay unbiased: the transform is linear and fixed by the reference set,
which must therefore not be the rows being analysed if that matters for the question).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmgrad.analysis.space import normalize_layout
from lmgrad.params import TYPES, param_info

DAMPING = 0.1
CHUNK_ROWS = 4096


@dataclasses.dataclass
class BlockFactor:
    """(Σ_b + δ_b I)^(−1/2) for one block, dense or as a low-rank update of δ_b^(−1/2)·I."""
    name: str
    offset: int
    size: int
    delta: float
    dense: np.ndarray | None = None       # [d, d] symmetric inverse square root
    basis: np.ndarray | None = None       # [d, r] eigenvectors of Σ_b with non-zero eigenvalues
    coef: np.ndarray | None = None        # [r] (λ_i + δ)^(−1/2) − δ^(−1/2)

    def apply(self, x_nd: np.ndarray) -> np.ndarray:
        if self.dense is not None:
            return x_nd @ self.dense
        return x_nd / np.sqrt(self.delta) + ((x_nd @ self.basis) * self.coef) @ self.basis.T


@dataclasses.dataclass
class Preconditioner:
    """A damped per-block inverse second moment, fitted on a named reference set."""
    factors: list[BlockFactor]
    k: int
    damping: float
    reference: str
    n_reference: int
    damping_dims: dict[str, int]  # D_b used for δ_b

    def whiten(self, x_nk: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x ↦ x (Σ + δI)^(−1/2) per block, in row chunks (x may be memory-mapped).

        Returns float64 unless ``out`` (e.g. a float32 memmap of the same shape, for inputs too
        large to hold twice) is given; computation is float64 either way.
        """
        if x_nk.ndim != 2 or x_nk.shape[1] != self.k:
            raise ValueError(f"whiten: expected [N, {self.k}] rows, got shape {x_nk.shape}")
        if out is None:
            out = np.empty(x_nk.shape, np.float64)
        elif out.shape != x_nk.shape:
            raise ValueError(f"whiten: out has shape {out.shape}, expected {x_nk.shape}")
        for s in range(0, x_nk.shape[0], CHUNK_ROWS):
            xc = np.asarray(x_nk[s:s + CHUNK_ROWS], np.float64)
            for f in self.factors:
                out[s:s + CHUNK_ROWS, f.offset:f.offset + f.size] = \
                    f.apply(xc[:, f.offset:f.offset + f.size])
        return out

    def inner(self, x_ak: np.ndarray, y_bk: np.ndarray) -> np.ndarray:
        """Preconditioned inner products [A, B]: Σ_b x_bᵀ (Σ_b + δ_b I)⁻¹ y_b."""
        return self.whiten(x_ak) @ self.whiten(y_bk).T

    def describe(self) -> dict:
        return {"damping": self.damping, "convention": "delta_b = damping * tr(Sigma_b) / D_b",
                "reference": self.reference, "n_reference": self.n_reference,
                "blocks": [{"name": f.name, "size": f.size, "delta": f.delta,
                            "D_b": self.damping_dims[f.name],
                            "form": "dense" if f.dense is not None else "low-rank"}
                           for f in self.factors]}


def fit_preconditioner(ref_mk: np.ndarray, layout: Sequence[Mapping[str, Any]] | None = None, *,
                       damping: float = DAMPING, n_params: Mapping[str, int] | None = None,
                       reference: str = "unnamed") -> Preconditioner:
    """Fit the per-block damped inverse second moment on reference rows ``ref_mk`` [M, K].

    ``layout`` as in the store manifest (``None``: one global block). ``n_params`` maps block
    names to parameter counts D_b for the damping (see the module docstring). A block is inverted
    densely (eigh of its d×d moment) when d ≤ M, else through the thin SVD of R_b, whose
    (Σ + δI)^(−1/2) is δ^(−1/2)·I plus a rank-M correction: memory O(M·d), not O(d²).
    """
    if damping <= 0:
        raise ValueError(f"damping must be > 0 (it keeps rank-deficient blocks invertible), "
                         f"got {damping}")
    ref = np.asarray(ref_mk, np.float64)
    if ref.ndim != 2 or not np.isfinite(ref).all():
        raise ValueError(f"reference rows: expected a finite [M, K] array, got shape {ref.shape}")
    m, k = ref.shape
    blocks = normalize_layout(layout, k)
    factors, dims = [], {}
    for b in blocks:
        rb = ref[:, b["offset"]:b["offset"] + b["size"]]
        d = b["size"]
        dims[b["name"]] = int(n_params[b["name"]]) if n_params and b["name"] in n_params else d
        tr = float(np.einsum("md,md->", rb, rb)) / m
        if tr <= 0:
            raise ValueError(f"precondition: block {b['name']!r} is zero on all {m} reference rows")
        delta = damping * tr / dims[b["name"]]
        if d <= m:
            e, v = np.linalg.eigh(rb.T @ rb / m)
            dense = (v * (np.clip(e, 0, None) + delta) ** -0.5) @ v.T
            factors.append(BlockFactor(b["name"], b["offset"], d, delta, dense=dense))
        else:
            _, s, vt = np.linalg.svd(rb / np.sqrt(m), full_matrices=False)
            coef = (s ** 2 + delta) ** -0.5 - delta ** -0.5
            factors.append(BlockFactor(b["name"], b["offset"], d, delta, basis=vt.T, coef=coef))
    return Preconditioner(factors, k, damping, reference, m, dims)


def reference_inner(x_ak: np.ndarray, y_bk: np.ndarray, ref_mk: np.ndarray,
                    layout: Sequence[Mapping[str, Any]] | None = None, *,
                    damping: float = DAMPING, n_params: Mapping[str, int] | None = None
                    ) -> np.ndarray:
    """Slow float64 reference for :meth:`Preconditioner.inner`: a dense solve per block."""
    ref = np.asarray(ref_mk, np.float64)
    x, y = np.asarray(x_ak, np.float64), np.asarray(y_bk, np.float64)
    out = np.zeros((x.shape[0], y.shape[0]))
    for b in normalize_layout(layout, ref.shape[1]):
        sl = slice(b["offset"], b["offset"] + b["size"])
        sig = ref[:, sl].T @ ref[:, sl] / ref.shape[0]
        dim = n_params[b["name"]] if n_params and b["name"] in n_params else b["size"]
        a = sig + damping * np.trace(sig) / dim * np.eye(b["size"])
        out += x[:, sl] @ np.linalg.solve(a, y[:, sl].T)
    return out


# ---------------------------------------------------------------------------------------------
# Per-block weighting and excluded groups
# ---------------------------------------------------------------------------------------------

def block_scales(ref_mk: np.ndarray, layout: Sequence[Mapping[str, Any]] | None
                 ) -> dict[str, float]:
    """Per-block scale 1/√(mean ‖x_b‖²) over reference rows: scaled blocks have equal expected
    squared norm, so no block dominates inner products by size alone."""
    ref = np.asarray(ref_mk, np.float64)
    out = {}
    for b in normalize_layout(layout, ref.shape[1]):
        rb = ref[:, b["offset"]:b["offset"] + b["size"]]
        ms = float(np.einsum("md,md->", rb, rb)) / ref.shape[0]
        if ms <= 0:
            raise ValueError(f"block_scales: block {b['name']!r} is zero on all reference rows")
        out[b["name"]] = 1.0 / np.sqrt(ms)
    return out


def equalize_blocks(x_nk: np.ndarray, layout: Sequence[Mapping[str, Any]] | None, *,
                    mode: str = "expected", reference: np.ndarray | None = None) -> np.ndarray:
    """Equal weight per block (float64 copy).

    ``"expected"`` (default): multiply each block by :func:`block_scales` of ``reference`` (or of
    ``x`` itself). Linear, so task means and the unbiased estimators keep their meaning.
    ``"unit"``: scale each row's block to unit norm (all-zero blocks stay zero). Per row and
    non-linear: the task mean then averages directions, a different estimand.
    """
    x = np.array(x_nk, np.float64)
    blocks = normalize_layout(layout, x.shape[1])
    if mode == "expected":
        scales = block_scales(x if reference is None else reference, layout)
        for b in blocks:
            x[:, b["offset"]:b["offset"] + b["size"]] *= scales[b["name"]]
    elif mode == "unit":
        for b in blocks:
            xb = x[:, b["offset"]:b["offset"] + b["size"]]
            nrm = np.linalg.norm(xb, axis=1, keepdims=True)
            xb /= np.where(nrm > 0, nrm, 1.0)
    else:
        raise ValueError(f"mode: expected 'expected' or 'unit', got {mode!r}")
    return x


def exclude_blocks(x_nk: np.ndarray, layout: Sequence[Mapping[str, Any]] | None,
                   exclude: Sequence[str] = ("norm", "embed", "head")
                   ) -> tuple[np.ndarray, list[dict], list[str]]:
    """Drop the columns of excluded blocks: ``(x_kept, layout_kept, dropped_names)``.

    Entries of ``exclude`` are module types from :data:`lmgrad.params.TYPES` (``embed``,
    ``head``, ``norm``, ``attn``, ``mlp``, ``other``: the block's ``type`` field where the layout
    has one, else :func:`lmgrad.params.param_info` of its name) or regexes searched in block
    names. The kept layout is re-offset to tile the kept columns. Excluding everything raises.
    """
    blocks = normalize_layout(layout, x_nk.shape[1])
    want = {e for e in exclude if e in TYPES}
    patterns = [re.compile(e) for e in exclude if e not in TYPES]
    kept, dropped, cols, off = [], [], [], 0
    for b in blocks:
        mtype = b.get("type") or param_info(b["name"]).type
        if mtype in want or any(p.search(b["name"]) for p in patterns):
            dropped.append(b["name"])
            continue
        cols.append(np.arange(b["offset"], b["offset"] + b["size"]))
        kept.append({**b, "offset": off})  # other fields (layer, type, shape) stay true
        off += b["size"]
    if not kept:
        raise ValueError(f"exclude_blocks: {list(exclude)} removes every block")
    return np.asarray(x_nk)[:, np.concatenate(cols)], kept, dropped
