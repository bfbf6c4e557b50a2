"""Small shared pieces of a task space's uncertainty: the off-diagonal entries and the
reading of a split-half reliability (the estimators live in `lmgrad.analysis.estimators`)."""
from __future__ import annotations

import dataclasses

import numpy as np


def offdiag(mat_tt: np.ndarray) -> np.ndarray:
    """Upper-triangle entries above the diagonal, row-major: the T(T−1)/2 distinct pairs."""
    mat_tt = np.asarray(mat_tt)
    return mat_tt[np.triu_indices(mat_tt.shape[0], 1)]


@dataclasses.dataclass
class Reliability:
    """Split-half reliability of a whole task similarity matrix."""
    r_half: float            # mean over splits of corr(offdiag(half A), offdiag(half B))
    r_half_sd: float         # spread over splits
    spearman_brown: float    # 2 r / (1 + r): reliability at the full sample size
    n_splits: int
    n_tasks: int
    interpretation: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reliability_label(sb: float) -> str:
    """Plain-language reading of a Spearman–Brown reliability."""
    if not np.isfinite(sb):
        return "reliability could not be estimated"
    if sb < 0.7:
        return "the task space is not reliable at this sample size"
    if sb < 0.9:
        return "the task space is moderately reliable"
    return "the task space is highly reliable"
