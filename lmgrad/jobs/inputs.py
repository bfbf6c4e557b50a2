"""What every model-running stage reads: which model, which minimal pairs, how sentences start."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmgrad.jobs.schema import check_choices, option


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """The model and the pair sample, shared by the evaluate, sketch (and later) stages."""

    model: str = option("smollm2", "Model spec: HF dir, hub id[@revision], .gguf file, or 'smollm2'.")
    dtype: str = option("float32", "Parameter and compute dtype.", choices=("float32", "bfloat16"))
    tasks: str = option("blimp", "Task selector (lmgrad.tasks.select_tasks), e.g. blimp, term:island_effects, "
                        "file:pairs.jsonl, joined with +.")
    max_pairs_per_task: int | None = option(None, "Seeded sample of at most N pairs per task (None: all).")
    pair_seed: int = option(0, "Seed of the pair sample.")
    bos: str = option("auto", "Token prepended to each sentence: auto (BOS, else EOS), none, or a token.")
    blimp_dir: str = option("", "Directory of BLiMP's <UID>.jsonl files ('': $LMGRAD_BLIMP_DIR, else the "
                            "cache, filled from BLiMP's GitHub release on first use; DATA.md).")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_pairs_per_task is not None and self.max_pairs_per_task < 1:
            raise ValueError(f"max_pairs_per_task must be >= 1 or None, got {self.max_pairs_per_task}")

    def select_tasks(self) -> list[Any]:
        """The selected tasks with their seeded pair sample."""
        from lmgrad.tasks import select_tasks

        return select_tasks(self.tasks, max_pairs_per_task=self.max_pairs_per_task, seed=self.pair_seed,
                            blimp_dir=self.blimp_dir or None)

    def load_model(self) -> Any:
        """The model (`lmgrad.models.LoadedModel`) named by `model`, in `dtype`."""
        from lmgrad.models import load_model

        return load_model(self.model, dtype=self.dtype)
