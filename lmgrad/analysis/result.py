"""The result of one task-space analysis: what `analyze` returns and `save`/`report` read."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lmgrad.analysis.estimators import Interval
from lmgrad.analysis.hypothesis import Hypothesis
from lmgrad.analysis.stability import CoClustering
from lmgrad.analysis.stats import StatResult
from lmgrad.analysis.surface import PermutationTest, SurfaceSpaces
from lmgrad.analysis.uncertainty import Reliability


@dataclasses.dataclass
class RobustnessRow:
    """Headline statistics of the task space under one geometry (``available`` False: n/a)."""
    name: str
    label: str
    note: str
    available: bool
    undefined: list[str] = dataclasses.field(default_factory=list)
    tests: dict[str, StatResult] = dataclasses.field(default_factory=dict)
    controlled: PermutationTest | None = None
    agreement: float | None = None     # Pearson r of off-diagonal entries with the headline space

    def as_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "note": self.note,
                "available": self.available, "undefined": list(self.undefined),
                "tests": {k: v.as_dict() for k, v in self.tests.items()},
                "controlled": self.controlled.as_dict() if self.controlled else None,
                "agreement_with_headline": self.agreement}


@dataclasses.dataclass
class Stability:
    """Bootstrap co-clustering and the stability of each reported block."""
    coclustering: CoClustering
    categories: list[dict] | None   # per hypothesis category (block_stability)
    clusters: list[dict]            # per cluster of the full-data task space
    how_k: str                      # how the number of clusters was chosen


@dataclasses.dataclass
class TaskSpaceResult:
    """Everything one analysis produced; ``save`` turns it into files."""
    names: np.ndarray                       # [T] task names (sorted)
    counts: np.ndarray                      # [T] pairs per task
    kind: str                               # unbiased | raw | pair (the headline estimator)
    similarity: np.ndarray                  # [T, T] headline; NaN rows for undefined tasks
    alternatives: dict[str, np.ndarray]     # {kind: [T, T]} every estimator, headline included
    norm2: np.ndarray                       # [T] unbiased ‖μ‖² estimate per task
    defined: np.ndarray                     # [T] bool: headline row defined
    undefined_notes: dict[str, str]         # task → why its row is undefined
    pair_cosine: np.ndarray                 # [T, T] mean per-pair cosine; diagonal = coherence
    interval: Interval
    group_by: str
    groups: dict[str, np.ndarray]           # {group: [T, T]} headline estimator per group
    global_only: bool                       # one undivided sketch block: no per-layer view
    reliability: Reliability
    hypothesis: Hypothesis
    stats: dict[str, StatResult]            # uncontrolled tests over the defined tasks
    controlled: PermutationTest | None      # the hypothesis controlled for surface similarity
    surface: SurfaceSpaces | None
    surface_fits: dict[str, StatResult]     # each surface space's own fit to the hypothesis
    surface_note: str | None                # why surface controls are missing or partial
    robustness: list[RobustnessRow]
    stability: Stability | None
    stability_note: str | None
    preconditioner: dict[str, Any] | None
    sketch_check: StatResult | None
    warnings: list[str]
    settings: dict[str, Any]
    timings: dict[str, float]

    @property
    def coherence(self) -> dict[str, float]:
        return {str(n): float(v) for n, v in zip(self.names, np.diag(self.pair_cosine))}

    @property
    def undefined(self) -> list[str]:
        return [str(n) for n, d in zip(self.names, self.defined) if not d]
