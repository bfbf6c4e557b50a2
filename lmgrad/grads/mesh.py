"""Per-example differentials with the batch sharded over a device mesh.

The mesh has a `data` axis (pairs) and an `fsdp` axis (parameters, size 1 by default). The
batch is split over `data` with `jax.shard_map`; parameters enter replicated (`P()`), and each
device runs the same chunked vmap(grad) as the single-device path on its rows. A ragged batch
is padded with invalid rows to a multiple of (devices × chunk) and trimmed after, so every
device sees the same shapes and a run compiles once per bucket.

The trap this module guards against: inside `shard_map` a replicated input is *device-
invariant*, and the transpose of the implicit invariant→varying cast is a `psum`. So vmap(grad)
with respect to replicated parameters silently returns, for local row i, the sum over devices of
every device's row-i gradient. Casting the differentiated parameters to device-varying first
(`jax.lax.pcast(x, "data", to="varying")`, jax ≥ 0.8) keeps each device's gradients its own.
`tests/test_mesh.py` shows the uncast version is wrong and the cast one equals 1 device.

FSDP (not implemented for compute): with `fsdp > 1`, `param_shardings` gives each parameter a
`NamedSharding` that splits its largest divisible dimension over `fsdp`, for storing a model
that does not fit one device. The differential functions here take parameters as `P()`, so jit
all-gathers fsdp-sharded parameters on entry (correct, but each device then holds a full copy);
a memory-saving version would all-gather layer by layer inside the model's scan, and the batch
would be sharded over both axes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmgrad.grads.differential import (
    ApplyFn,
    Project,
    _check_chunk,
    _check_pair,
    _pad_rows,
    _per_example_core,
    as_arrays,
)
from lmgrad.grads.select import split_params

DATA = "data"
FSDP = "fsdp"


def make_mesh(num_devices: int | None = None, *, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over the first `num_devices` local devices (all if None).

    Raises:
      ValueError: more devices asked for than exist, or `fsdp` does not divide the count.
    """
    devices = jax.local_devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"make_mesh: asked for {n} devices, {len(devices)} local devices exist")
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"make_mesh: fsdp={fsdp} must divide the device count {n}")
    return Mesh(np.asarray(devices[:n]).reshape(n // fsdp, fsdp), (DATA, FSDP))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of `tree` fully replicated on `mesh` (do this once for the params)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding per leaf: the largest dimension divisible by the `fsdp` size is split over
    `fsdp`, everything else replicated (see the module docstring for how this would be used)."""
    k = mesh.shape[FSDP]

    def spec(x: Any) -> NamedSharding:
        dims = [d for d in np.argsort(x.shape)[::-1] if k > 1 and x.shape[d] % k == 0]
        axes = [None] * len(x.shape)
        if dims:
            axes[int(dims[0])] = FSDP
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(spec, params)


class ReplicaCache:
    """Places a pytree replicated on a mesh, reusing the last placement while the caller passes the
    same (immutable) leaf arrays: copying the model to every device on each batch would dominate
    small batches. Holds the source leaves, so identity checks cannot be fooled by reused ids."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._placed: tuple[tuple[Any, ...], Any] | None = None

    def __call__(self, tree: Any) -> Any:
        leaves = tuple(jax.tree.leaves(tree))
        if self._placed is None or len(self._placed[0]) != len(leaves) or any(
                a is not b for a, b in zip(self._placed[0], leaves)):
            self._placed = (leaves, replicate(tree, self.mesh))
        return self._placed[1]


class _ShardedFn:
    """shard_map over `data` of the chunked per-example core; `.traces` counts traces."""

    def __init__(self, apply_fn: ApplyFn, selected: Sequence[str], mesh: Mesh, chunk_size: int | None,
                 reduce: Project | None, vary: bool):
        _check_chunk(chunk_size)
        self.selected = list(selected)
        self.mesh = mesh
        self.traces = 0
        self._multiple = mesh.shape[DATA] * (chunk_size or 1)
        core = _per_example_core(apply_fn, chunk_size, reduce)

        def local(trainable, frozen, good, bad):
            self.traces += 1
            if vary:
                trainable = jax.lax.pcast(trainable, DATA, to="varying")
            return core(trainable, frozen, good, bad)

        self._fn = jax.jit(jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(), P(DATA), P(DATA)), out_specs=P(DATA)))
        self._replicated = ReplicaCache(mesh)

    def __call__(self, params: Any, good: Any, bad: Any) -> Any:
        trainable, frozen = split_params(params, self.selected)
        g, b = as_arrays(good), as_arrays(bad)
        _check_pair(g, b)
        (g, b), n = _pad_rows((g, b), self._multiple)
        rows = NamedSharding(self.mesh, P(DATA))
        g, b = jax.device_put((g, b), rows)
        trainable, frozen = self._replicated((trainable, frozen))
        out = self._fn(trainable, frozen, g, b)
        return jax.tree.map(lambda x: x[:n], out)


def sharded_per_example_fn(
    apply_fn: ApplyFn, selected_names: Sequence[str], mesh: Mesh, *, chunk_size: int | None = None
) -> Callable[[Any, Any, Any], dict[str, jax.Array]]:
    """Like `make_per_example_fn`, with the batch sharded over the mesh's `data` axis.

    fn(params, good, bad) → {hf_name: [B, *shape]} for any B (padded internally, trimmed after).
    """
    return _ShardedFn(apply_fn, selected_names, mesh, chunk_size, None, vary=True)


def sharded_sketch_fn(
    apply_fn: ApplyFn,
    selected_names: Sequence[str],
    project: Project,
    mesh: Mesh,
    *,
    chunk_size: int | None = None,
) -> Callable[[Any, Any, Any], jax.Array]:
    """Like `make_sketch_fn` (fn(params, good, bad) → float32 [B, K]), sharded over `data`.

    `project` must act row by row (true of `lmgrad.sketch` projectors), so sharding the batch
    does not change any row's sketch.
    """
    return _ShardedFn(apply_fn, selected_names, mesh, chunk_size, project, vary=True)
