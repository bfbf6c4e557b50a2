"""Gradient differentials of minimal pairs: ∇ℓ(good) − ∇ℓ(bad), per example or averaged.

ℓ is the sentence NLL, −Σ_t target_mask[t]·log p(token t | < t); which tokens count (whole
sentence, or from the first differing token) is fixed by the caller's target masks
(`lmgrad.tasks.batching.encode_pairs`). A pair's good and bad rows go through the model as one
[2, T] batch, so the differential costs one forward and one backward, not two.

Batches are `lmgrad.tasks.batching.Batch` objects or mappings with `input_ids`,
`attention_mask`, `target_mask` ([B, T]) and optionally `valid` ([B] bool). Without `valid`, a
row is valid iff its attention mask has a real token. Invalid (padding) rows are run with a
harmless dummy mask and their outputs are set to exactly zero, so they can never leak NaNs.

Gradients are taken only with respect to the selected parameters (patterns over HF names: `lmgrad.params.select`); the
others are passed as non-differentiated inputs and cost no weight-gradient computation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmgrad.params import split as split_params, unflatten
from lmgrad.scoring import sequence_logprob

Array = jax.Array
ApplyFn = Callable[[Any, Array, Array], Array]
Grads = dict[str, Array]
Project = Callable[[Mapping[str, Array]], Array]

_FIELDS = ("input_ids", "attention_mask", "target_mask")


def _read_fields(batch: Any, fields: Mapping[str, Any], what: str, dims: str,
                 optional: str) -> tuple[dict[str, Array], Callable[[str], Any]]:
    """`fields` ({name: dtype}) of a dataclass or mapping as JAX arrays of one 2-D shape, and a reader
    of further optional fields (None where absent); messages say `what` it is and its `dims`."""
    get = (lambda k: batch[k]) if isinstance(batch, Mapping) else (lambda k: getattr(batch, k))
    has = (lambda k: k in batch) if isinstance(batch, Mapping) else (lambda k: hasattr(batch, k))
    out = {}
    for k in fields:
        if not has(k):
            raise ValueError(f"{what} lacks field {k!r} (needs {list(fields)}, {optional})")
        out[k] = get(k)
    shape = tuple(out["input_ids"].shape)
    if len(shape) != 2:
        raise ValueError(f"{what} field 'input_ids' must be {dims}, got shape {shape}")
    for k in fields:
        if tuple(out[k].shape) != shape:
            raise ValueError(f"{what} field {k!r} has shape {tuple(out[k].shape)}, input_ids has {shape}")
    return {k: jnp.asarray(v, fields[k]) for k, v in out.items()}, (lambda k: get(k) if has(k) else None)


def as_arrays(batch: Any) -> dict[str, Array]:
    """A Batch or mapping → {input_ids, attention_mask, target_mask, valid} as numpy/JAX arrays.

    Raises:
      ValueError: a field is missing or the [B, T] shapes disagree (the message names the field).
    """
    out, optional = _read_fields(batch, dict(zip(_FIELDS, (jnp.int32, jnp.int32, jnp.float32))), "batch", "[B, T]",
                                 "optionally 'valid'")
    shape = tuple(out["input_ids"].shape)
    valid = optional("valid")
    if valid is None:
        valid = np.asarray(out["attention_mask"]).any(axis=1)
    if tuple(valid.shape) != shape[:1]:
        raise ValueError(f"batch field 'valid' has shape {tuple(valid.shape)}, expected {shape[:1]}")
    out["valid"] = jnp.asarray(valid, bool)
    return out


def packed_arrays(batch: Any) -> dict[str, Array]:
    """A `lmgrad.tasks.PackedPairBatch` (or mapping with its fields) → {input_ids, attention_mask,
    target_mask, slot: [R, L]; valid: [R, Q]} as JAX arrays.

    Raises:
      ValueError: a field is missing or the shapes disagree (the message names the field).
    """
    fields = {"input_ids": jnp.int32, "attention_mask": jnp.int32, "target_mask": jnp.float32, "slot": jnp.int32}
    out, optional = _read_fields(batch, fields, "packed batch", "[R, L]", "and 'index' or 'valid'")
    shape = tuple(out["input_ids"].shape)
    valid, index = optional("valid"), optional("index")
    if valid is None and index is None:
        raise ValueError("packed batch lacks both 'valid' and 'index' (the slots holding a pair)")
    valid = np.asarray(index) >= 0 if valid is None else np.asarray(valid)
    if valid.ndim != 2 or valid.shape[0] != shape[0]:
        raise ValueError(f"packed batch field 'valid' must be [R, Q] with R = {shape[0]}, got {valid.shape}")
    out["valid"] = jnp.asarray(valid, bool)
    return out


def check_pair(good: Mapping[str, Array], bad: Mapping[str, Array]) -> None:
    if good["input_ids"].shape != bad["input_ids"].shape:
        raise ValueError(
            f"good batch is {tuple(good['input_ids'].shape)} but bad batch is {tuple(bad['input_ids'].shape)}; "
            "pairs must share [B, T] (use lmgrad.tasks.batching.iter_pair_batches)"
        )


def sanitize(b: Mapping[str, Array]) -> dict[str, Array]:
    """Padding rows get a full attention mask and no targets: finite forward, zero loss."""
    v = b["valid"][:, None]
    return {
        "input_ids": jnp.where(v, b["input_ids"], 0),
        "attention_mask": jnp.where(v, b["attention_mask"], 1),
        "target_mask": jnp.where(v, b["target_mask"], 0.0),
        "valid": b["valid"],
    }


def _zero_invalid(tree: Any, valid: Array) -> Any:
    def f(x: Array) -> Array:
        return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))

    return jax.tree.map(f, tree)


def _rows_loss_diff(apply_fn: ApplyFn, params: Any, good: Mapping[str, Array], bad: Mapping[str, Array]) -> Array:
    """ℓ(good) − ℓ(bad) per row [B], good and bad stacked into one [2B, T] forward."""
    b = good["input_ids"].shape[0]
    cat = {k: jnp.concatenate([good[k], bad[k]], axis=0) for k in _FIELDS}
    logits = apply_fn(params, cat["input_ids"], cat["attention_mask"])
    nll = -sequence_logprob(logits, cat["input_ids"], cat["target_mask"])
    return nll[:b] - nll[b:]


def pair_loss_diff(apply_fn: ApplyFn, params: Any, good: Any, bad: Any) -> Array:
    """float32 [B]: ℓ(good) − ℓ(bad) per pair (0 on padding rows). Differentiable in `params`."""
    g, b = sanitize(as_arrays(good)), sanitize(as_arrays(bad))
    check_pair(g, b)
    return jnp.where(g["valid"], _rows_loss_diff(apply_fn, params, g, b), 0.0)


def _merged(trainable: Mapping[str, Array], frozen: Mapping[str, Array]) -> Any:
    return unflatten({**frozen, **trainable})


def _example_grad(apply_fn: ApplyFn) -> Callable[..., Grads]:
    """(trainable, frozen, good_row, bad_row) → differential of one example (rows are [T])."""

    def loss(trainable, frozen, good, bad):
        one = lambda d: {k: d[k][None] for k in _FIELDS}  # noqa: E731
        return _rows_loss_diff(apply_fn, _merged(trainable, frozen), one(good), one(bad))[0]

    return jax.grad(loss)


def pad_rows(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad the leading axis of every leaf to a multiple of `multiple` with invalid zero rows."""
    n = jax.tree.leaves(tree)[0].shape[0]
    extra = (-n) % multiple
    if extra == 0:
        return tree, n
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)]), tree), n


def _chunked(fn: Callable[[Any], Any], xs: Any, chunk: int) -> Any:
    """fn over the leading axis of xs in micro-batches of `chunk` rows, one at a time (lax.map),
    so only one chunk's per-example gradients are alive at once. Rows beyond B are padding."""
    xs, n = pad_rows(xs, chunk)
    b = jax.tree.leaves(xs)[0].shape[0]
    if b == chunk:
        out = fn(xs)
    else:
        split = jax.tree.map(lambda x: x.reshape((b // chunk, chunk) + x.shape[1:]), xs)
        out = jax.lax.map(fn, split)
        out = jax.tree.map(lambda x: x.reshape((b,) + x.shape[2:]), out)
    return jax.tree.map(lambda x: x[:n], out)


def per_example_core(
    apply_fn: ApplyFn, chunk_size: int | None, reduce: Project | None = None
) -> Callable[[Grads, Grads, dict, dict], Any]:
    """Un-jitted (trainable, frozen, good, bad) → {name: [B, ...]} (or reduce(...) → [B, K]).

    Pure and shape-polymorphic in B, so it can be jitted directly or wrapped in shard_map.
    """
    grad_one = _example_grad(apply_fn)

    def core(trainable, frozen, good, bad):
        b = good["input_ids"].shape[0]
        chunk = b if chunk_size is None else min(int(chunk_size), b)

        def on_chunk(xs):
            g, bd = sanitize(xs[0]), sanitize(xs[1])
            grads = jax.vmap(grad_one, in_axes=(None, None, 0, 0))(trainable, frozen, g, bd)
            grads = _zero_invalid(grads, g["valid"])
            if reduce is None:
                return grads
            return _zero_invalid(reduce(grads).astype(jnp.float32), g["valid"])

        return _chunked(on_chunk, (good, bad), chunk)

    return core


class _Compiled:
    """A jitted per-example function with a trace counter (`traces`), for recompilation checks."""

    def __init__(self, selected: Sequence[str], core: Callable[..., Any], jit: Callable[[Callable], Callable]):
        self.selected = list(selected)
        self.traces = 0

        def counted(*args):
            self.traces += 1
            return core(*args)

        self._fn = jit(counted)

    def __call__(self, params: Any, good: Any, bad: Any) -> Any:
        trainable, frozen = split_params(params, self.selected)
        g, b = as_arrays(good), as_arrays(bad)
        check_pair(g, b)
        return self._fn(trainable, frozen, g, b)


def check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def make_per_example_fn(
    apply_fn: ApplyFn, selected_names: Sequence[str], *, chunk_size: int | None = None
) -> Callable[[Any, Any, Any], Grads]:
    """jit(vmap(grad)) per-example differentials: fn(params, good, bad) → {hf_name: [B, *shape]}.

    `params` are nested Flax (or flat HF-named) params; only `selected_names` are differentiated.
    Examples run `chunk_size` at a time under `lax.map`, so peak memory is about chunk_size
    copies of the selected parameters (None: the whole batch at once). Padding rows are zero.
    The returned callable has `.traces` (how many times it was traced).
    """
    check_chunk(chunk_size)
    return _Compiled(selected_names, per_example_core(apply_fn, chunk_size), jax.jit)


def make_sketch_fn(
    apply_fn: ApplyFn,
    selected_names: Sequence[str],
    project: Project,
    chunk_size: int | None = None,
) -> Callable[[Any, Any, Any], Array]:
    """Fused differentials + projection: fn(params, good, bad) → float32 [B, K].

    `project` ({name: [c, *shape]} → [c, K], e.g. `lmgrad.sketch.Projector.project`) runs inside
    the jit on each chunk, so only one chunk's full per-example gradients exist at a time.
    """
    check_chunk(chunk_size)
    return _Compiled(selected_names, per_example_core(apply_fn, chunk_size, project), jax.jit)


@functools.lru_cache(maxsize=16)
def _reference_grad(apply_fn: ApplyFn) -> Callable[..., Grads]:
    # jit only to skip op-by-op dispatch; each call is still one pair, shapes [1, T]. Cached per
    # apply_fn so repeated reference calls do not recompile.
    @jax.jit
    def grad_row(tr, fr, g_row, b_row):
        return jax.grad(lambda t: _rows_loss_diff(apply_fn, _merged(t, fr), g_row, b_row)[0])(tr)

    return grad_row


def per_example_reference(
    apply_fn: ApplyFn, params: Any, selected_names: Sequence[str], good: Any, bad: Any
) -> dict[str, np.ndarray]:
    """Slow reference: a Python loop of `jax.grad` on one pair at a time (no vmap, no chunking).

    Returns numpy {name: [B, *shape]}; padding rows are zero and never run.
    """
    trainable, frozen = split_params(params, selected_names)
    g, b = as_arrays(good), as_arrays(bad)
    check_pair(g, b)

    grad_row = _reference_grad(apply_fn)
    out = {n: np.zeros((g["input_ids"].shape[0],) + tuple(v.shape), np.asarray(v).dtype) for n, v in trainable.items()}
    for i in np.flatnonzero(np.asarray(g["valid"])):
        row = lambda d: {k: d[k][i: i + 1] for k in _FIELDS}  # noqa: E731
        grads = grad_row(trainable, frozen, row(g), row(b))
        for n, v in grads.items():
            out[n][i] = np.asarray(v)
    return out


def make_batch_grad_fn(apply_fn: ApplyFn, selected_names: Sequence[str]) -> Callable[[Any, Any, Any], tuple[Grads, Array]]:
    """jitted fn(params, good, bad) → (∇ Σ_valid (ℓ(good) − ℓ(bad)), number of valid rows):
    one batched forward/backward over the [2B, T] stack of good and bad rows."""

    def core(trainable, frozen, good, bad):
        good, bad = sanitize(good), sanitize(bad)

        def total(tr):
            d = _rows_loss_diff(apply_fn, _merged(tr, frozen), good, bad)
            return jnp.sum(jnp.where(good["valid"], d, 0.0))

        return jax.grad(total)(trainable), jnp.sum(good["valid"].astype(jnp.int32))

    return _Compiled(selected_names, core, jax.jit)


def task_mean_differential(
    apply_fn: ApplyFn,
    params: Any,
    selected_names: Sequence[str],
    batches: Iterable[tuple[Any, Any]],
    *,
    grad_fn: Callable[[Any, Any, Any], tuple[Grads, Array]] | None = None,
) -> dict[str, Array]:
    """Mean over valid pairs of ∇(ℓ(good) − ℓ(bad)), by one batched backward per batch.

    Sums are accumulated in float32 across `batches` ((good, bad) pairs, e.g. from
    `iter_pair_batches`) and divided by the total number of valid rows, so a ragged last batch
    weighs each pair once; it equals the mean of the per-example differentials. Pass `grad_fn`
    (from `make_batch_grad_fn`) to reuse a compiled function across tasks.

    Raises:
      ValueError: the batches hold no valid pair.
    """
    fn = grad_fn or make_batch_grad_fn(apply_fn, selected_names)
    acc: dict[str, Array] | None = None
    count = 0
    for good, bad in batches:
        grads, n = fn(params, good, bad)
        grads = {k: v.astype(jnp.float32) for k, v in grads.items()}
        acc = grads if acc is None else jax.tree.map(jnp.add, acc, grads)
        count += int(n)
    if acc is None or count == 0:
        raise ValueError("task_mean_differential: no valid pairs in the batches")
    return {k: v / count for k, v in acc.items()}
