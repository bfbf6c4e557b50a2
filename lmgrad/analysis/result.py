"""The result of one task-space analysis: what `analyze` returns and `save`/`report` read."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lmgrad.analysis.hypothesis import Hypothesis
from lmgrad.analysis.stats import StatResult
from lmgrad.analysis.uncertainty import BootstrapResult, Reliability


@dataclasses.dataclass
class TaskSpaceResult:
    """Everything one analysis produced; ``save`` turns it into files."""
    names: np.ndarray                       # [T] task names (sorted)
    counts: np.ndarray                      # [T] pairs per task
    kind: str                               # cosine | pearson
    similarity: np.ndarray                  # [T, T]
    pair_cosine: np.ndarray                 # [T, T] mean per-pair cosine; diagonal = coherence
    group_by: str
    groups: dict[str, np.ndarray]           # {group: [T, T]}
    global_only: bool                       # one undivided sketch block: no per-layer view
    bootstrap: BootstrapResult
    reliability: Reliability
    hypothesis: Hypothesis
    stats: dict[str, StatResult]
    sketch_check: StatResult | None
    settings: dict[str, Any]

    @property
    def coherence(self) -> dict[str, float]:
        return {str(n): float(v) for n, v in zip(self.names, np.diag(self.pair_cosine))}
