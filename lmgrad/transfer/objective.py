"""Margin objectives for fine-tuning on minimal pairs, and the top-p parameter mask of FTGD.

A pair's *margin* is m = log p(good) − log p(bad) = ℓ(bad) − ℓ(good) (positive: the model
prefers the acceptable sentence). Fine-tuning via gradient differentials (FTGD, Weber et al.
2024) follows the differential ∇ℓ(good) − ∇ℓ(bad), i.e. it lowers the mean of ℓ(good) − ℓ(bad)
= −m over a task's training pairs (`plain`). That objective is unbounded below: it can be driven
down without limit by making the bad sentence ever less likely (ruining the model), so two
bounded variants are offered (the paper does not say which it used; lmgrad makes it a flag):

* ``plain``:    L = −mean(m)                         (the differential itself; unbounded)
* ``logistic``: L = τ · mean(softplus(−m / τ))        (gradient fades once m ≫ τ)
* ``hinge``:    L = mean(max(0, γ − m))               (no gradient once m ≥ γ)

All three have gradient −mean(w·∇m) with w = 1 (plain), σ(−m/τ) (logistic), [m < γ] (hinge), so
at m ≪ 0 the bounded variants follow the plain differential.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("plain", "logistic", "hinge")


def per_pair_objective(margin_b: jax.Array, objective: str = "logistic", *, scale: float = 1.0,
                       hinge_margin: float = 1.0) -> jax.Array:
    """The objective of each pair [B] from its margin m = log p(good) − log p(bad)."""
    m = margin_b.astype(jnp.float32)
    if objective == "plain":
        return -m
    if objective == "logistic":
        return scale * jax.nn.softplus(-m / scale)
    if objective == "hinge":
        return jnp.maximum(0.0, hinge_margin - m)
    raise ValueError(f"objective {objective!r}; valid: {', '.join(OBJECTIVES)}")


def margin_loss(margin_b: jax.Array, valid_b: jax.Array, objective: str = "logistic", *,
                scale: float = 1.0, hinge_margin: float = 1.0) -> jax.Array:
    """Mean objective over the valid rows of a batch of margins m = log p(good) − log p(bad).

    `scale` is the logistic temperature τ, `hinge_margin` the hinge's γ (see the module docstring).
    Padding rows (valid False) contribute nothing; an all-padding batch gives 0.
    """
    per = per_pair_objective(margin_b, objective, scale=scale, hinge_margin=hinge_margin)
    w = valid_b.astype(jnp.float32)
    return jnp.sum(jnp.where(valid_b, per, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def check_top_p(top_p: float) -> None:
    """Raises ValueError unless 0 < top_p <= 1."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (the fraction of parameters FTGD updates; 1 = no mask), "
                         f"got {top_p!r}")


def n_kept(n: int, top_p: float) -> int:
    """⌈top_p · n⌉ (at least 1): how many of n parameters a top-p mask keeps."""
    check_top_p(top_p)
    # The small slack keeps e.g. 0.3 · 10 = 3.0000000000000004 from rounding up to 4.
    return max(1, min(n, int(math.ceil(float(top_p) * n - 1e-9))))


def top_p_mask(score: Mapping[str, Any], top_p: float) -> dict[str, np.ndarray]:
    """Global top-p mask {name: bool array}: the ⌈p·N⌉ entries of largest |score| over all tensors.

    `score` is a task's mean differential {hf_name: array} (only the selected parameters). The
    ranking is global (one threshold across tensors, not per tensor). Ties at the threshold are
    broken by position in the concatenation of the tensors in sorted-name order, row-major, so
    exactly ⌈p·N⌉ entries are kept and the mask is a deterministic function of the scores.
    Non-finite scores rank last. ``top_p=1`` keeps everything (no mask).
    """
    names = sorted(score)
    flat = [np.abs(np.asarray(score[n], dtype=np.float32)).ravel() for n in names]
    sizes = [a.size for a in flat]
    a = np.concatenate(flat) if flat else np.zeros(0, np.float32)
    n = a.size
    if n == 0:
        raise ValueError("top_p_mask: no parameters")
    k = n_kept(n, top_p)
    if k == n:
        keep = np.ones(n, bool)
    else:
        a = np.where(np.isfinite(a), a, -1.0)
        thr = np.partition(a, n - k)[n - k]   # the k-th largest value
        keep = a > thr
        need = k - int(keep.sum())
        if need > 0:
            tie = np.flatnonzero(a == thr)[:need]
            keep[tie] = True
    out, off = {}, 0
    for name, size in zip(names, sizes):
        out[name] = keep[off: off + size].reshape(np.shape(score[name]))
        off += size
    return out


def pack_mask(mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: bool array} → {name: packed uint8 bits} (8× smaller; `unpack_mask` inverts it)."""
    return {n: np.packbits(np.asarray(v, bool).ravel()) for n, v in mask.items()}


def unpack_mask(packed: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of `pack_mask` given each tensor's shape."""
    return {n: np.unpackbits(packed[n], count=int(np.prod(shapes[n]))).astype(bool).reshape(shapes[n])
            for n in shapes}
