"""Task gradients, the first-order prediction of transfer, mask overlap, and auxiliary-task ranking.

First-order link. Let d_j = mean over j's held-out pairs of ℓ(good) − ℓ(bad) (so j's mean margin is
−d_j) and h_j = ∇d_j. One SGD step of size η on task i's objective L_i, restricted to i's mask M_i,
moves θ by −η M_i ⊙ ∇L_i, so j's mean margin changes by

    Δm_j ≈ η ⟨h_j, M_i ⊙ ∇L_i⟩       (exact as η → 0; for the plain objective ∇L_i = g_i, i's mean
                                      differential on its training pairs)

`first_order_matrix` builds P[i, j] = ⟨h_j, M_i ⊙ ∇L_i⟩ (with M_i = 1: the unmasked gradient space).
With Adam the first step is ≈ η·sign(∇L_i) instead, so P predicts the *ranking*, not the size.
At scale the inner products are estimated from one sparse-JL sketch of every vector (the same
projector for all), ⟨P a, P b⟩ ≈ ⟨a, b⟩ (`vectorize`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

from lmgrad.params import param_info, split as split_params
from lmgrad.transfer.objective import per_pair_objective
from lmgrad.transfer.tune import (ApplyFn, EncodedPairs, PairPacking, TuneSpec, check_rows, margins_and_valid, on_rows,
                                  pair_packing)


class TaskGradFn:
    """A compiled fn(trainable, frozen, *batch) → (∇ Σ_valid f, valid pairs) and the batches it takes:
    `packed` (one `PairPacking` batch) or (good, bad) length buckets."""

    def __init__(self, fn: Callable[..., Any], packed: bool) -> None:
        self.fn, self.packed = fn, packed

    def __call__(self, *args: Any) -> tuple[dict, jax.Array]:
        return self.fn(*args)


def make_task_grad_fn(apply_fn: ApplyFn, spec: TuneSpec | None = None, *, packed: bool = True) -> TaskGradFn:
    """jit: (trainable, frozen, *batch) → (∇ Σ_valid f, number of valid pairs), where f is the pair's
    differential ℓ(good) − ℓ(bad) (`spec=None`) or its objective under `spec`; `packed` batches (one
    shape for a run) or bucketed (good, bad) ones."""

    def total(tr, frozen, *batch):
        m, valid = margins_and_valid(apply_fn, tr, frozen, *batch)
        per = -m if spec is None else per_pair_objective(m, spec.objective, scale=spec.logistic_scale,
                                                         hinge_margin=spec.hinge_margin)
        return jnp.sum(jnp.where(valid, per, 0.0))

    @jax.jit
    def fn(tr, frozen, *batch):
        return jax.grad(total)(tr, frozen, *batch), jnp.sum(batch[0]["valid"].astype(jnp.int32))

    return TaskGradFn(fn, packed)


def task_gradient(fn: TaskGradFn, params: Any, selected: Sequence[str], task: EncodedPairs, *,
                  batch_size: int = 16, max_len: int | None = None,
                  packing: PairPacking | None = None, mesh: Any = None) -> dict[str, np.ndarray]:
    """Mean over `task`'s pairs of the per-pair quantity `fn` differentiates (float32 numpy).

    A packed `fn` takes batches of `packing` (default: `pair_packing([task], batch_size)`; pass one
    shape made for all of a run's tasks so that it compiles once). `mesh`: each batch's rows split
    over its data axis (`lmgrad.transfer.tune`'s module docstring)."""
    from lmgrad.tasks import iter_pair_batches

    if len(task) == 0:
        raise ValueError(f"task {task.uid!r}: no pairs for a task gradient")
    tr, fr = split_params(params, list(selected))
    if getattr(fn, "packed", False):
        packing = (packing or pair_packing([task], batch_size)).for_mesh(mesh)
        batches = ((on_rows(b, mesh),) for b in packing.batches(task))
    else:
        check_rows("batch_size", batch_size, mesh)
        batches = ((on_rows(_arrays(g), mesh), on_rows(_arrays(b), mesh)) for g, b in iter_pair_batches(
            task.good, task.bad, batch_size=batch_size, score_from_good=task.score_from_good,
            score_from_bad=task.score_from_bad, max_len=max_len))
    acc, count = None, 0
    for batch in batches:
        grads, n = fn(tr, fr, *batch)
        acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
        count += int(n)
    return {k: np.asarray(v, np.float32) / count for k, v in acc.items()}


def _arrays(batch: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(getattr(batch, k)) for k in ("input_ids", "attention_mask", "target_mask", "valid")}


def vectorize(tree: Mapping[str, Any], projector: Any = None, mask: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """A gradient {name: array} (times `mask` where given) as one vector: the concatenation in
    sorted-name order (`projector=None`, exact) or its sketch [k] under `projector`."""
    names = sorted(tree)
    parts = {n: (np.where(mask[n], tree[n], 0.0) if mask is not None else np.asarray(tree[n])) for n in names}
    if projector is None:
        return np.concatenate([parts[n].ravel() for n in names]).astype(np.float64)
    row = projector.project({n: jnp.asarray(parts[n], jnp.float32)[None] for n in names})
    return np.asarray(row[0], np.float64)


def first_order_matrix(update_vecs: Sequence[np.ndarray], target_vecs: Sequence[np.ndarray]) -> np.ndarray:
    """P[i, j] = ⟨target_j, update_i⟩: the predicted change of j's mean margin per unit step on i."""
    u = np.stack(update_vecs)
    h = np.stack(target_vecs)
    return u @ h.T


def cosine_matrix(vecs: Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarity [T, T] of the vectors (the plain gradient space)."""
    x = np.stack(vecs)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(n > 0, n, 1.0)
    return x @ x.T


# ----------------------------------------------------------------------------------- statistics
def qap_correlation(pred: np.ndarray, meas: np.ndarray, *, n_perm: int = 999, seed: int = 0,
                    diagonal: bool = False, method: str = "pearson") -> dict[str, Any]:
    """Correlation of two (possibly asymmetric) [T, T] matrices over their entries (off-diagonal
    unless `diagonal`), with a one-sided QAP permutation p-value: the tasks of `pred` are permuted
    jointly on rows and columns (the dependence among entries that share a task is kept).
    Non-finite entries (failed tasks) are left out."""
    pred, meas = np.asarray(pred, np.float64), np.asarray(meas, np.float64)
    t = pred.shape[0]
    sel = np.ones((t, t), bool) if diagonal else ~np.eye(t, dtype=bool)

    def corr(p: np.ndarray) -> float:
        ok = sel & np.isfinite(p) & np.isfinite(meas)
        a, b = p[ok], meas[ok]
        if len(a) < 3 or a.std() == 0 or b.std() == 0:
            return float("nan")
        if method == "spearman":
            return float(sps.spearmanr(a, b)[0])
        return float(np.corrcoef(a, b)[0, 1])

    r = corr(pred)
    if not np.isfinite(r):
        return {"r": None, "p": None, "n": int(sel.sum()), "n_perm": n_perm, "method": method, "diagonal": diagonal}
    rng = np.random.default_rng(seed)
    null = np.array([corr(pred[np.ix_(p, p)]) for p in (rng.permutation(t) for _ in range(n_perm))])
    null = null[np.isfinite(null)]
    p = float((1 + np.sum(null >= r - 1e-12)) / (1 + len(null)))
    return {"r": r, "p": p, "n": int((sel & np.isfinite(pred) & np.isfinite(meas)).sum()), "n_perm": n_perm,
            "method": method, "diagonal": diagonal}


# ----------------------------------------------------------------------------------- mask overlap
def mask_groups(names: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Parameter names grouped by layer ('layer N', or the module type outside the stack) and by
    module type (`lmgrad.params.param_info`)."""
    by_layer: dict[str, list[str]] = {}
    by_type: dict[str, list[str]] = {}
    for n in names:
        info = param_info(n)
        by_layer.setdefault(f"layer {info.layer}" if info.layer is not None else info.type, []).append(n)
        by_type.setdefault(info.type, []).append(n)
    return {"layer": by_layer, "type": by_type}


def mask_overlap(packed: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> dict[str, Any]:
    """Jaccard overlap |M_i ∩ M_j| / |M_i ∪ M_j| of packed top-p masks (`objective.pack_mask`):
    overall [T, T], and per layer and per module type ({group: [T, T]}; NaN where both are empty)."""
    t = len(packed)
    inter = {n: np.zeros((t, t)) for n in names}
    count = {n: np.array([float(np.bitwise_count(m[n]).sum()) for m in packed]) for n in names}
    for n in names:
        for i in range(t):
            for j in range(i, t):
                c = float(np.bitwise_count(packed[i][n] & packed[j][n]).sum())
                inter[n][i, j] = inter[n][j, i] = c

    def jac(group: Sequence[str]) -> np.ndarray:
        it = sum(inter[n] for n in group)
        c = sum(count[n] for n in group)
        union = c[:, None] + c[None, :] - it
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, it / np.where(union > 0, union, 1), np.nan)

    groups = mask_groups(names)
    return {"overall": jac(list(names)),
            "layer": {g: jac(ns) for g, ns in groups["layer"].items()},
            "type": {g: jac(ns) for g, ns in groups["type"].items()},
            "kept": {g: sum(count[n] for n in ns) for g, ns in groups["type"].items()}}


# ----------------------------------------------------------------------------------- ranking
def rank_candidates(predictor: np.ndarray, target: int) -> list[int]:
    """Candidate tasks i ≠ target ordered by predicted benefit predictor[i, target], best first."""
    col = np.asarray(predictor, np.float64)[:, target]
    cand = [i for i in range(len(col)) if i != target and np.isfinite(col[i])]
    return sorted(cand, key=lambda i: (-col[i], i))


def ranking_quality(measured: np.ndarray, predictors: Mapping[str, np.ndarray], *, k: int = 3) -> dict[str, Any]:
    """How well each predictor ranks the candidate auxiliary tasks of every target.

    For target j the candidates are i ≠ j, the measured benefit is measured[i, j] (the change of
    j's held-out metric after tuning on i). Per predictor: the mean over targets of the Spearman
    correlation between predicted and measured benefit, and of precision at k (|top-k predicted ∩
    top-k measured| / k); the chance level of precision at k is k / (T − 1).
    """
    measured = np.asarray(measured, np.float64)
    t = measured.shape[0]
    out: dict[str, Any] = {"k": k, "chance_precision": k / max(t - 1, 1), "predictors": {}}
    for name, pred in predictors.items():
        rhos, precs = [], []
        for j in range(t):
            cand = [i for i in range(t) if i != j and np.isfinite(measured[i, j]) and np.isfinite(pred[i, j])]
            if len(cand) < max(k + 1, 3):
                continue
            a, b = np.asarray(pred)[cand, j], measured[cand, j]
            if a.std() > 0 and b.std() > 0:
                rhos.append(float(sps.spearmanr(a, b)[0]))
            top_p = set(np.asarray(cand)[np.argsort(-a, kind="stable")[:k]].tolist())
            top_m = set(np.asarray(cand)[np.argsort(-b, kind="stable")[:k]].tolist())
            precs.append(len(top_p & top_m) / k)
        out["predictors"][name] = {"spearman_mean": float(np.mean(rhos)) if rhos else None,
                                   "spearman_per_target": rhos,
                                   "precision_at_k": float(np.mean(precs)) if precs else None,
                                   "n_targets": len(precs)}
    return out
