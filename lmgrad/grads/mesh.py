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

FSDP: with `fsdp > 1` the parameters are placed by `lmgrad.sharding.param_shardings` (each large
tensor split over `fsdp` along its largest divisible dimension) and the `shard_map` is manual over
`data` only (`axis_names={"data"}`): inside it, `fsdp` is an automatic axis, so XLA's SPMD
partitioner runs the row-wise body on sharded weights (gathering a weight where one layer needs it,
or computing on its shard and reducing over `fsdp`). Those reductions are over parameter
dimensions, never over rows: a row's result comes only from its own row, so the psum trap is the
`data` one above and the same cast guards it. `fsdp = 1` is exactly the all-data path.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmgrad.grads.differential import (
    ApplyFn,
    Project,
    check_chunk,
    check_pair,
    packed_arrays,
    pad_rows,
    per_example_core,
    as_arrays,
)
from lmgrad.params import split
from lmgrad.sharding import param_shardings as _rule_shardings

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
    """NamedSharding per leaf from `lmgrad.sharding`'s rules table: large tensors split over `fsdp`
    along their largest divisible dimension, small ones replicated."""
    return _rule_shardings(params, mesh)


def fsdp_size(mesh: Mesh) -> int:
    """The mesh's `fsdp` size (1 for a mesh without that axis)."""
    return int(dict(mesh.shape).get(FSDP, 1))


class ReplicaCache:
    """Places a pytree on a mesh (replicated, or by `shardings(tree)`), reusing the last placement
    while the caller passes the same (immutable) leaf arrays: copying the model to every device on
    each batch would dominate small batches. Holds the source leaves, so identity checks cannot be
    fooled by reused ids. Leaves already placed as asked (a model loaded into its shards) move not."""

    def __init__(self, mesh: Mesh, shardings: Callable[[Any], Any] | None = None):
        self.mesh = mesh
        self._shardings = shardings
        self._placed: tuple[tuple[Any, ...], Any] | None = None

    def __call__(self, tree: Any) -> Any:
        leaves = tuple(jax.tree.leaves(tree))
        if self._placed is None or len(self._placed[0]) != len(leaves) or any(
                a is not b for a, b in zip(self._placed[0], leaves)):
            placed = (replicate(tree, self.mesh) if self._shardings is None
                      else jax.device_put(tree, self._shardings(tree)))
            self._placed = (leaves, placed)
        return self._placed[1]


class ShardedRowsFn:
    """fn(replicated, good, bad) → rows, with the pairs split over the mesh's `data` axis.

    The one sharded wrapper of both differential paths. `body(replicated, good, bad)` is a pure,
    row-wise function (the exact path's chunked vmap(grad), the factored path's batched backward);
    `replicated` (parameters, projection factors) enters every device whole on a `data`-only mesh;
    with `fsdp > 1`, `shardings(replicated)` places it (parameters split over `fsdp`) and the body
    runs manual over `data`, automatic over `fsdp` (module docstring). Either way it is placed once
    and reused while the caller passes the same leaves. A ragged batch is padded with invalid zero rows
    to a multiple of `multiple` (devices × chunk) and trimmed after, so every device sees the same
    shapes and a run compiles once per length bucket. `traces` counts traces of `body`.

    `packed=True`: the body is `body(replicated, batch)` on one packed batch
    (`lmgrad.tasks.PackedPairBatch`, as `packed_arrays` gives it), split over `data` by rows: a pair
    lies within one row, so no device needs another's tokens.
    """

    def __init__(self, body: Callable[..., Any], mesh: Mesh, *, multiple: int = 1,
                 check_vma: bool = True, shardings: Callable[[Any], Any] | None = None, packed: bool = False):
        self.mesh = mesh
        self.traces = 0
        self.packed = packed
        self._multiple = mesh.shape[DATA] * multiple

        def counted(replicated, *batch):
            self.traces += 1
            return body(replicated, *batch)

        sharded = fsdp_size(mesh) > 1
        manual = {"axis_names": {DATA}} if sharded else {}
        specs = (P(), P(DATA)) if packed else (P(), P(DATA), P(DATA))
        self._fn = jax.jit(jax.shard_map(counted, mesh=mesh, in_specs=specs,
                                         out_specs=P(DATA), check_vma=check_vma, **manual))
        self._shardings = shardings if sharded else None
        self._replicated = ReplicaCache(mesh, self._shardings)

    def place(self, replicated: Any) -> Any:
        """`replicated` placed on the mesh as the compiled function takes it (cached)."""
        return self._replicated(replicated)

    def inputs(self, replicated: Any, *batch: Any) -> tuple[tuple[Any, ...], int]:
        """The placed (replicated, good, bad) (or (replicated, packed batch)) the compiled function
        takes, and the real row count."""
        if self.packed:
            (arrays,) = batch
            arrays = (packed_arrays(arrays),)
        else:
            good, bad = batch
            arrays = (as_arrays(good), as_arrays(bad))
            check_pair(*arrays)
        arrays, n = pad_rows(arrays, self._multiple)
        arrays = jax.device_put(arrays, NamedSharding(self.mesh, P(DATA)))
        return (self._replicated(replicated), *arrays), n

    def lower(self, replicated: Any, *batch: Any) -> Any:
        """`jax.jit(...).lower` on these inputs (for `compile().memory_analysis()`)."""
        return self._fn.lower(*self.inputs(replicated, *batch)[0])

    def lower_shapes(self, replicated: Any, rows: int, seq_len: int, slots: int = 1) -> Any:
        """`jax.jit(...).lower` for abstract inputs, allocating nothing: `replicated` is a tree of
        `jax.ShapeDtypeStruct` (placed as `__call__` would place arrays), the batch `rows` pairs of
        `seq_len` tokens (padded as `__call__` pads), or for a packed function `rows` rows of
        `seq_len` tokens with `slots` pairs each. For `lmgrad.plan`'s memory analysis."""
        rows = -(-int(rows) // self._multiple) * self._multiple
        full = NamedSharding(self.mesh, P())
        shard = full if self._shardings is None else self._shardings(replicated)
        # A sharding given for a subtree (the factored path's factors) applies to all its leaves.
        shard = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shard, replicated,
                             is_leaf=lambda x: isinstance(x, NamedSharding))
        rep = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), replicated, shard)
        data = NamedSharding(self.mesh, P(DATA))
        one = {k: jax.ShapeDtypeStruct((rows, seq_len), dt, sharding=data)
               for k, dt in (("input_ids", np.int32), ("attention_mask", np.int32), ("target_mask", np.float32))}
        if self.packed:
            one["slot"] = jax.ShapeDtypeStruct((rows, seq_len), np.int32, sharding=data)
            one["valid"] = jax.ShapeDtypeStruct((rows, int(slots)), np.bool_, sharding=data)
            return self._fn.lower(rep, one)
        one["valid"] = jax.ShapeDtypeStruct((rows,), np.bool_, sharding=data)
        return self._fn.lower(rep, one, dict(one))

    def __call__(self, replicated: Any, *batch: Any) -> Any:
        args, n = self.inputs(replicated, *batch)
        out = self._fn(*args)
        return jax.tree.map(lambda x: x[:n], out)


class _ParamsFn:
    """fn(params, good, bad) over a `ShardedRowsFn`: `prepare(params)` gives its replicated input."""

    def __init__(self, rows_fn: ShardedRowsFn, prepare: Callable[[Any], Any]):
        self._rows_fn = rows_fn
        self._prepare = prepare

    @property
    def traces(self) -> int:
        return self._rows_fn.traces

    @property
    def mesh(self) -> Mesh:
        return self._rows_fn.mesh

    def placed(self, params: Any) -> Any:
        """The compiled function's first input as placed on the mesh (for checks of what each
        device holds)."""
        return self._rows_fn.place(self._prepare(params))

    def lower(self, params: Any, *batch: Any) -> Any:
        return self._rows_fn.lower(self._prepare(params), *batch)

    def lower_shapes(self, params: Any, rows: int, seq_len: int, prepare: Callable[[Any], Any] | None = None,
                     slots: int = 1) -> Any:
        """Lowered for abstract `params` (ShapeDtypeStructs) and a [rows, seq_len] batch (`slots` pairs
        per row when packed); `prepare` replaces the params → replicated-input step where that would
        compute (the factors)."""
        return self._rows_fn.lower_shapes((prepare or self._prepare)(params), rows, seq_len, slots)

    def __call__(self, params: Any, *batch: Any) -> Any:
        return self._rows_fn(self._prepare(params), *batch)

    def with_prepare(self, prepare: Callable[[Any], Any]) -> "_ParamsFn":
        """The same compiled rows function with another params → input step (e.g. another seed's
        factor matrices, which are inputs of the same shapes)."""
        return _ParamsFn(self._rows_fn, prepare)


def _exact(apply_fn: ApplyFn, selected: Sequence[str], mesh: Mesh, chunk_size: int | None,
           reduce: Project | None) -> _ParamsFn:
    check_chunk(chunk_size)
    core = per_example_core(apply_fn, chunk_size, reduce)

    def body(replicated, good, bad):
        trainable, frozen = replicated
        # See the module docstring: without the cast, grad psums every device's rows.
        trainable = jax.lax.pcast(trainable, DATA, to="varying")
        return core(trainable, frozen, good, bad)

    selected = list(selected)
    shardings = lambda rep: tuple(param_shardings(t, mesh) for t in rep)  # noqa: E731
    return _ParamsFn(ShardedRowsFn(body, mesh, multiple=chunk_size or 1, shardings=shardings),
                     lambda params: split(params, selected))


def sharded_per_example_fn(
    apply_fn: ApplyFn, selected_names: Sequence[str], mesh: Mesh, *, chunk_size: int | None = None
) -> Callable[[Any, Any, Any], dict[str, jax.Array]]:
    """Like `make_per_example_fn`, with the batch sharded over the mesh's `data` axis.

    fn(params, good, bad) → {hf_name: [B, *shape]} for any B (padded internally, trimmed after).
    """
    return _exact(apply_fn, selected_names, mesh, chunk_size, None)


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
    return _exact(apply_fn, selected_names, mesh, chunk_size, project)


def sharded_factored_fn(factored: Any, mesh: Mesh) -> Callable[[Any, Any, Any], jax.Array]:
    """A `FactoredSketchFn` with the batch split over `data`: fn(params, good, bad) → [B, K].

    Nothing in the factored path needs a collective: each device differentiates its own rows'
    perturbations. `check_vma=False` keeps the zero perturbations (created inside the body, so
    device-invariant) from being psum-ed across devices in the transpose.
    """
    shardings = lambda rep: (param_shardings(rep[0], mesh), NamedSharding(mesh, P()))  # noqa: E731
    rows_fn = ShardedRowsFn(lambda rep, g, b: factored.core(rep[0], g, b, rep[1]), mesh, check_vma=False,
                            shardings=shardings)
    packed_fn = ShardedRowsFn(lambda rep, batch: factored.packed_core(rep[0], batch, rep[1]), mesh,
                              check_vma=False, shardings=shardings, packed=True)
    # The factors are independent of the params: generated on first use (a dry run never calls
    # this), then cached here and placed once by the replica cache.
    prepare = lambda params: (params, factored.factors())  # noqa: E731
    fn = _ParamsFn(rows_fn, prepare)
    fn.factored = factored
    # fn.packed(params, packed_batch) → [R, Q, K] (`FactoredSketchFn.packed`), split over `data` by rows.
    fn.packed = _ParamsFn(packed_fn, prepare)
    return fn


def reseeded_factored_fn(fn: Any, seed: int) -> Any:
    """A `sharded_factored_fn` result for another projection seed, sharing its compiled functions
    (`FactoredSketchFn.with_seed`): a second seed costs no trace or compile."""
    factored = fn.factored.with_seed(seed)
    prepare = lambda params: (params, factored.factors())  # noqa: E731
    out = fn.with_prepare(prepare)
    out.factored = factored
    out.packed = fn.packed.with_prepare(prepare)
    return out
