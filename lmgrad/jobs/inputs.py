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
    mesh: str = option("", "Device mesh of this process's local devices, AXIS:SIZE entries over data (pairs) and "
                       "fsdp (parameters), e.g. data:2,fsdp:4; a missing axis takes the remaining devices "
                       "('': all on data). fsdp > 1 loads each parameter straight into its shards "
                       "(lmgrad.sharding).")
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

    def make_mesh(self, num_devices: int | None = None) -> Any:
        """The (data, fsdp) `jax.sharding.Mesh` that `mesh` names over this process's devices."""
        from lmgrad.sharding import mesh_from_spec

        return mesh_from_spec(self.mesh, num_devices)

    def load_model(self, mesh: Any = None) -> Any:
        """The model (`lmgrad.models.LoadedModel`) named by `model`, in `dtype`. With a `mesh` whose
        fsdp axis is > 1, a safetensors checkpoint is read straight into its shards; other formats
        (GGUF) are loaded whole and then placed."""
        from lmgrad.models import load_model

        if mesh is None or dict(mesh.shape).get("fsdp", 1) == 1:
            return load_model(self.model, dtype=self.dtype)
        from lmgrad import sharding

        if self.model.endswith(".gguf") or self.model in ("smollm2", "default"):
            import dataclasses

            model = load_model(self.model, dtype=self.dtype)
            return dataclasses.replace(model, params=sharding.place(model.params, mesh))
        return sharding.load_sharded(self.model, mesh, dtype=self.dtype)
