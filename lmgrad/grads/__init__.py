"""Gradient differentials ∇ℓ(good) − ∇ℓ(bad) of minimal pairs: per example, sketched, task means,
on one device or a mesh. See `differential.py` for conventions and `mesh.py` for sharding."""

from lmgrad.grads.checks import NonFiniteGradientError, check_finite
from lmgrad.grads.differential import (
    as_arrays,
    make_batch_grad_fn,
    make_per_example_fn,
    make_sketch_fn,
    pair_loss_diff,
    per_example_reference,
    task_mean_differential,
)
from lmgrad.grads.factored import (
    FactoredSketchFn,
    FactoredSpec,
    factored_reference,
    make_factored_sketch_fn,
)
from lmgrad.grads.mesh import (
    ShardedRowsFn,
    make_mesh,
    param_shardings,
    replicate,
    reseeded_factored_fn,
    sharded_factored_fn,
    sharded_per_example_fn,
    sharded_sketch_fn,
)

__all__ = [
    "FactoredSketchFn", "FactoredSpec", "factored_reference", "make_factored_sketch_fn",
    "NonFiniteGradientError", "as_arrays", "check_finite", "make_batch_grad_fn", "make_mesh",
    "make_per_example_fn", "make_sketch_fn", "pair_loss_diff", "param_shardings", "per_example_reference",
    "ShardedRowsFn", "replicate", "reseeded_factored_fn", "sharded_factored_fn", "sharded_per_example_fn", "sharded_sketch_fn",
    "task_mean_differential",
]
