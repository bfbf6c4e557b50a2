"""Task spaces from per-pair sketches: task means, similarity matrices, per-block views, coherence.

Every function here is pure numpy. Rows of ``sketch_nk`` are sketches of per-pair gradient
differentials; because sketching is linear, a task's mean differential is the mean of its rows,
so none of this needs a second pass over the model. Accumulations are float64 whatever the
storage dtype, since similarity matrices are later compared entry by entry.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmgrad.params import block_fields, local_module
from lmgrad.store.format import normalize_layout as _normalize_layout

SIMILARITY_KINDS = ("cosine", "pearson")
GROUP_BYS = ("block", "layer", "module_type")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def as_task_labels(tasks: Sequence[Any] | np.ndarray, n: int) -> np.ndarray:
    """Task labels as a 1-D string array of length ``n`` (one per sketch row)."""
    labels = np.asarray(tasks).astype(str)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"tasks: expected {n} labels (one per sketch row), got shape {labels.shape}")
    return labels


def check_sketches(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *,
                   nonfinite: str = "raise") -> tuple[np.ndarray, np.ndarray]:
    """Validate a [N, K] sketch matrix and its labels; returns ``(sketch_nk, labels)``.

    ``nonfinite="raise"`` (default) raises a ValueError naming the offending rows and their tasks;
    ``"drop"`` removes those rows with a warning. A silent NaN would poison every task mean it
    touches, so it is never passed through.
    """
    sketch_nk = np.asarray(sketch_nk)
    if sketch_nk.ndim != 2:
        raise ValueError(f"sketches: expected a 2-D [N, K] array, got shape {sketch_nk.shape}")
    labels = as_task_labels(tasks, sketch_nk.shape[0])
    bad = ~np.isfinite(sketch_nk).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(f"row {r} (task {labels[r]})" for r in rows[:10])
        more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
        msg = f"sketches: {len(rows)} row(s) contain NaN/inf: {shown}{more}"
        if nonfinite == "raise":
            raise ValueError(msg)
        if nonfinite != "drop":
            raise ValueError(f"nonfinite: expected 'raise' or 'drop', got {nonfinite!r}")
        warnings.warn(msg + "; dropped", stacklevel=2)
        sketch_nk, labels = sketch_nk[~bad], labels[~bad]
    return sketch_nk, labels


def task_index(tasks: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique task names and, per row, the index of its task."""
    names, inverse = np.unique(np.asarray(tasks).astype(str), return_inverse=True)
    return names, inverse.reshape(-1)


def require_tasks(names: np.ndarray, minimum: int = 2) -> None:
    if len(names) < minimum:
        raise ValueError(
            f"task space needs >= {minimum} tasks, got {len(names)}: {list(map(str, names))}")


def require_pairs(names: np.ndarray, counts: np.ndarray, minimum: int, what: str) -> None:
    """Raise naming every task with fewer than ``minimum`` pairs."""
    few = [f"{n} ({c})" for n, c in zip(names, counts) if c < minimum]
    if few:
        raise ValueError(f"{what} needs >= {minimum} pairs per task; too few in: {', '.join(few)}")


# ---------------------------------------------------------------------------------------------
# Task means and similarity
# ---------------------------------------------------------------------------------------------

def task_means(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean sketch per task: returns ``(names [T], means_tk [T, K] float64)``, names sorted."""
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    names, idx = task_index(labels)
    sums_tk = group_sums(sketch_nk, idx, len(names))
    counts = np.bincount(idx, minlength=len(names))
    return names, sums_tk / counts[:, None]


def group_sums(x_nk: np.ndarray, idx: np.ndarray, t: int, chunk: int = 8192) -> np.ndarray:
    """Per-task row sums ``[t, K]`` float64 of ``x_nk``, row ``n`` belonging to task ``idx[n]``."""
    # A one-hot [T, chunk] matmul per chunk: BLAS speed (np.add.at is ~100x slower) and bounded
    # memory for the float64 upcast.
    out = np.zeros((t, x_nk.shape[1]), np.float64)
    for s in range(0, x_nk.shape[0], chunk):
        onehot = np.zeros((t, min(chunk, x_nk.shape[0] - s)), np.float64)
        onehot[idx[s:s + chunk], np.arange(onehot.shape[1])] = 1.0
        out += onehot @ x_nk[s:s + chunk].astype(np.float64, copy=False)
    return out


def normalize_rows(x_nk: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); all-zero rows become NaN (cosine is undefined)."""
    x = np.asarray(x_nk, np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, x / np.where(norms > 0, norms, 1.0), np.nan)


def similarity(means_tk: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """[T, T] similarity of task mean vectors.

    ``cosine``: u·v / (|u||v|). ``pearson``: cosine after centring each vector over its K
    coordinates (removes a shared offset, e.g. from a non-zero-mean projection). A task whose
    vector is all zero gets NaN rows, with a warning, rather than a fake 0.
    """
    if kind not in SIMILARITY_KINDS:
        raise ValueError(f"similarity kind: expected one of {SIMILARITY_KINDS}, got {kind!r}")
    x = np.asarray(means_tk, np.float64)
    if kind == "pearson":
        x = x - x.mean(axis=1, keepdims=True)
    u = normalize_rows(x)
    if np.isnan(u).any():
        warnings.warn(f"similarity: {int(np.isnan(u[:, 0]).sum())} zero vector(s); "
                      "their rows are NaN", stacklevel=2)
    sim = u @ u.T
    np.fill_diagonal(sim, np.where(np.isnan(u[:, 0]), np.nan, 1.0))
    return np.clip(sim, -1.0, 1.0)


def task_similarity(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray,
                    kind: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """``(names, sim_tt)`` straight from per-pair sketches."""
    names, means = task_means(sketch_nk, tasks)
    return names, similarity(means, kind)


# ---------------------------------------------------------------------------------------------
# Per-block views
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """The analysis' view of an HF parameter: layer index (None outside the stack) and module group."""
    name: str
    layer: int | None
    module_type: str


TIED_GROUP = "embed+head (tied)"
# Module groups outside the stack, by `lmgrad.params` type; other types keep their module path.
_TOP_GROUPS = {"embed": "embed", "head": "head", "norm": "final_norm"}


def module_group(block: Mapping[str, Any]) -> str:
    """Module group of a layout block (with ``module``, ``layer``, ``type``; see `normalize_layout`).

    Inside the stack, the module's path within its block (``mlp.down_proj``, ``attn.c_attn``), the
    same for every layer. Outside it: ``embed``, ``head``, ``final_norm``, ``embed+head (tied)``
    for an embedding that is also the output head (``tied`` block), else the module path.
    """
    if block.get("layer") is not None:
        return local_module(block["module"], int(block["layer"]))
    if block.get("tied"):
        return TIED_GROUP
    return _TOP_GROUPS.get(block["type"], block["module"])


def parse_param_name(name: str) -> ParamInfo:
    """Layer index and module group of an HF parameter name (`lmgrad.params.param_info`).

    ``model.layers.7.mlp.down_proj.weight`` → (7, ``mlp.down_proj``);
    ``transformer.h.7.attn.c_attn.weight`` → (7, ``attn.c_attn``);
    ``model.norm.weight`` → (None, ``final_norm``). Layout blocks carry these fields already;
    `group_columns` reads them there.
    """
    fields = block_fields(name)
    return ParamInfo(name, fields["layer"], module_group(fields))


def group_key(block: Mapping[str, Any], group_by: str) -> str:
    """The group of a layout block under ``group_by`` (``block|layer|module_type``)."""
    if group_by == "block":
        return block["name"]
    if group_by == "layer" and block.get("layer") is not None:
        return f"layers.{block['layer']}"
    return module_group(block)


def _group_order(key: str, first_seen: int) -> tuple:
    # Embeddings first, then the stack in layer order, then final norm and head: network order.
    m = re.fullmatch(r"layers\.(\d+)", key)
    rank = {"embed": 0, TIED_GROUP: 0, "final_norm": 2, "head": 3}.get(key, 1)
    return (rank, int(m.group(1)) if m else -1, first_seen)


def normalize_layout(layout: Sequence[Mapping[str, Any]] | None, k: int) -> list[dict]:
    """Blocks tiling ``[0, k)``, sorted, each with ``module``/``layer``/``type``; None → one ``global`` block.

    The store's `lmgrad.store.format.normalize_layout` with ``tile=True``: a gap or overlap would
    silently mis-attribute columns, and layouts written before blocks carried their layer and
    type get them from the names.
    """
    return _normalize_layout(layout, k, tile=True)


def is_global_layout(layout: Sequence[Mapping[str, Any]] | None) -> bool:
    """True when the sketch is one undivided block (no per-layer view is possible)."""
    return not layout or len(layout) == 1


def group_columns(layout: Sequence[Mapping[str, Any]] | None, k: int, group_by: str = "layer"
                  ) -> dict[str, np.ndarray]:
    """Ordered ``{group name: column indices}`` for ``group_by`` in ``block|layer|module_type``.

    Groups come from the blocks' ``layer`` and ``type`` fields (`module_group`), in network order.
    """
    if group_by not in GROUP_BYS:
        raise ValueError(f"group_by: expected one of {GROUP_BYS}, got {group_by!r}")
    blocks = normalize_layout(layout, k)
    cols: dict[str, list[np.ndarray]] = {}
    for b in blocks:
        cols.setdefault(group_key(b, group_by), []).append(np.arange(b["offset"], b["offset"] + b["size"]))
    order = sorted(cols, key=lambda g: _group_order(g, list(cols).index(g)))
    return {g: np.concatenate(cols[g]) for g in order}


def block_similarities(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray,
                       layout: Sequence[Mapping[str, Any]] | None, group_by: str = "layer",
                       kind: str = "cosine") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Task similarity within each group of blocks: ``(names, {group: sim_tt})``.

    A group's similarity uses the concatenation of its blocks' columns (the sketch of that part
    of the gradient). With a single ``global`` block the result has one group, ``global``: the
    sketch mixes all parameters, so there is no per-layer view (a warning says so).
    """
    names, means = task_means(sketch_nk, tasks)
    return names, block_similarities_from_means(means, layout, group_by, kind)


def block_similarities_from_means(means_tk: np.ndarray, layout, group_by: str = "layer",
                                  kind: str = "cosine") -> dict[str, np.ndarray]:
    """As :func:`block_similarities`, from precomputed task means."""
    if is_global_layout(layout) and group_by != "block":
        warnings.warn("layout is a single block: the sketch mixes all parameters, "
                      "so there is no per-layer view", stacklevel=2)
    cols = group_columns(layout, means_tk.shape[1], group_by)
    return {g: similarity(means_tk[:, c], kind) for g, c in cols.items()}


# ---------------------------------------------------------------------------------------------
# Pair-level cosines: within-task coherence and the between-task distribution
# ---------------------------------------------------------------------------------------------

def pair_cosine_matrix(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean per-pair cosine between tasks: ``(names, counts, pcos_tt)``.

    Off the diagonal, entry (a, b) is the mean of cos(x_i, x_j) over pairs i in a, j in b.
    On the diagonal it is the within-task coherence, the mean over i != j in a (self-pairs
    excluded; NaN for a task with one pair). Computed from sums of unit rows:
    Σ_i Σ_j u_i·u_j = |Σ u|², so it costs O(N K) rather than O(N² K).
    """
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    names, idx = task_index(labels)
    u = normalize_rows(sketch_nk)
    zero = np.isnan(u[:, 0])
    if zero.any():
        raise ValueError(f"sketches: {int(zero.sum())} all-zero row(s) (cosine undefined), "
                         f"first rows {np.flatnonzero(zero)[:10].tolist()}")
    counts = np.bincount(idx, minlength=len(names)).astype(np.float64)
    s_tk = group_sums(u, idx, len(names))
    gram = s_tk @ s_tk.T
    denom = np.outer(counts, counts)
    np.fill_diagonal(denom, counts * (counts - 1))
    np.fill_diagonal(gram, np.diag(gram) - counts)  # remove self-pairs: u_i·u_i = 1
    with np.errstate(invalid="ignore", divide="ignore"):
        pcos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1), np.nan)
    return names, counts.astype(int), pcos


def coherence(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """Within-task coherence: mean pairwise cosine among a task's pairs (self-pairs excluded)."""
    names, _, pcos = pair_cosine_matrix(sketch_nk, tasks)
    return {str(n): float(v) for n, v in zip(names, np.diag(pcos))}


def pair_cosine_samples(sketch_nk: np.ndarray, tasks: Sequence[Any] | np.ndarray, *,
                        max_rows: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-pair cosines split into ``within`` (same task, i != j) and ``between`` (different
    tasks), for plotting their distributions. Uses at most ``max_rows`` rows (seeded subsample)
    so the Gram matrix stays small; means are available exactly from :func:`pair_cosine_matrix`.
    """
    sketch_nk, labels = check_sketches(sketch_nk, tasks)
    if sketch_nk.shape[0] > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(sketch_nk.shape[0], max_rows,
                                                          replace=False))
        sketch_nk, labels = sketch_nk[keep], labels[keep]
    u = normalize_rows(sketch_nk)
    g = u @ u.T
    iu = np.triu_indices(len(labels), 1)
    same = labels[iu[0]] == labels[iu[1]]
    vals = g[iu]
    return {"within": vals[same], "between": vals[~same]}
