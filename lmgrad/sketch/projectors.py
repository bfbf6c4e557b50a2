"""Random projections of per-example gradient pytrees: ``{name: [B, *shape]} -> [B, K]``.

A projection is a pure function of (seed, parameter name, shape, k) and ``kind``: each parameter's
block of the matrix is regenerated from a counter-based hash (``hashing.py``) block of columns by
block inside the contraction and never stored. Results do not depend on batch size, device count,
the order of the dict, or ``block_size`` (a speed knob, kept out of ``spec``). Sketches are linear and
accumulate in float32 whatever the gradient dtype.

Kinds (E⟨Px, Py⟩ = ⟨x, y⟩ for all):

* ``identity`` – concatenation of the flattened gradients in sorted-name order (K = #parameters).
* ``gaussian`` – entries N(0, 1/k).
* ``rademacher`` – entries ±1/√k.
* ``sjlt`` – sparse JL / CountSketch: ``s`` nonzeros ±1/√s per column, one in each of s row bands.

Where the dense kinds stop being practical. They cost k·n generated entries per batch; the
contraction itself (2·B·k·n flops) is cheaper than generation for B ≲ 16. Measured with
``bench/bench_projectors.py`` on the 2-core dev CPU (``bench/results/projectors.jsonl``; the machine was
shared, so ranges): hashed Rademacher projection 1–3 G entries/s, hashed Gaussian (Box–Muller)
0.3–0.7 G/s, blocked ``jax.random.normal`` threefry 0.07–0.16 G/s (``rbg``/``unsafe_rbg`` generate only
0.03–0.06 G/s here), and a pre-materialised ``g @ W.T`` is memory-bound at 0.2–1.5 G/s, and W does
not fit beyond toy sizes (124M × 4096 float32 is 2 TB). A 124M-parameter model at k = 4096 means
5·10¹¹ entries per batch: ~4 min (Rademacher) to ~15 min (Gaussian) per batch on this CPU, whatever
the batch size up to ~16; an accelerator is faster by a constant, not by the scaling. Use the dense
kinds per module or where k·n ≲ 10¹⁰ per batch. **For the global projection of a large model use
``sjlt``**: O(B·s·n) work independent of k — [8, 10⁷] → k = 4096 in ~0.03 s (s = 1) / ~0.14 s (s = 4),
so ~0.4 s / ~2 s per batch of 8 for 124M parameters.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lmgrad.params import block_fields
from lmgrad.sketch import hashing

Array = jax.Array
Shapes = Mapping[str, tuple[int, ...]]

KINDS = ("identity", "gaussian", "rademacher", "sjlt")


def _check_2d(name: str, g: Array) -> None:
    if g.ndim != 2:
        raise ValueError(f"project_leaf({name!r}): expected a flattened gradient [B, n], got shape {tuple(g.shape)}")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise ValueError(f"gradient {name!r}: expected a floating dtype, got {g.dtype}")
    if g.shape[1] >= hashing.MAX_COLUMNS:
        raise ValueError(f"gradient {name!r}: {g.shape[1]} entries exceed the 2**31 columns one parameter may have")


def _check_grads(grads: Mapping[str, Array], shapes: Shapes | None) -> int:
    """Validate a gradient dict (and against declared shapes if given); return the batch size."""
    if not isinstance(grads, Mapping) or not grads:
        raise ValueError("project: expected a non-empty mapping {param_name: Array[B, *shape]}")
    if shapes is not None:
        missing = sorted(set(shapes) - set(grads))
        extra = sorted(set(grads) - set(shapes))
        if missing or extra:
            raise ValueError(f"project: gradient names differ from declared shapes; missing={missing} unexpected={extra}")
    batch = None
    for name in sorted(grads):
        g = grads[name]
        if g.ndim < 1:
            raise ValueError(f"gradient {name!r}: expected [B, *shape], got a scalar")
        if not jnp.issubdtype(g.dtype, jnp.floating):
            raise ValueError(f"gradient {name!r}: expected a floating dtype, got {g.dtype}")
        if shapes is not None and tuple(g.shape[1:]) != tuple(shapes[name]):
            raise ValueError(
                f"gradient {name!r} has shape {tuple(g.shape)} = [B, *{tuple(g.shape[1:])}] "
                f"but its declared shape is {tuple(shapes[name])}"
            )
        if batch is None:
            batch = g.shape[0]
        elif g.shape[0] != batch:
            raise ValueError(f"gradient {name!r} has batch size {g.shape[0]}, others have {batch}")
    return int(batch)


def _flat(g: Array) -> Array:
    return g.reshape(g.shape[0], -1)


# ---------------------------------------------------------------------- block-wise contractions
def _blocked(n: int, block: int, fn, acc0: Array) -> Array:
    """acc = fn(acc, c0, width) over full column blocks (fori_loop) then the ragged tail.

    The generator is column-counter based, so the tail's narrower block has the same entries as the
    corresponding part of a full block: results do not depend on ``block``.
    """
    if n == 0:  # a zero-size parameter contributes nothing
        return acc0
    n_full = n // block
    acc = acc0
    if n_full == 1:
        acc = fn(acc, jnp.uint32(0), block)
    elif n_full > 1:
        acc = jax.lax.fori_loop(0, n_full, lambda i, a: fn(a, i.astype(jnp.uint32) * jnp.uint32(block), block), acc)
    tail = n - n_full * block
    if tail:
        acc = fn(acc, jnp.uint32(n_full * block), tail)
    return acc


@functools.partial(jax.jit, static_argnames=("k", "block", "gaussian"))
def _dense_leaf(g: Array, keys: Array, *, k: int, block: int, gaussian: bool) -> Array:
    """[B, n] -> [B, k] unscaled: g @ M.T with M regenerated block by block (M entries N(0,1) or ±1)."""
    b, n = g.shape
    gen = hashing.gaussian_block if gaussian else hashing.rademacher_block

    def step(acc, c0, width):
        g_blk = jax.lax.dynamic_slice_in_dim(g, c0.astype(jnp.int32), width, axis=1).astype(jnp.float32)
        m_blk = gen(keys, c0, k, width)
        return acc + jnp.einsum("bn,kn->bk", g_blk, m_blk, precision="highest", preferred_element_type=jnp.float32)

    # zeros_like keeps g's device-variance, so the loop carry type-checks inside shard_map.
    return _blocked(n, min(block, n), step, jnp.zeros_like(g, shape=(b, k), dtype=jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "s", "block"))
def _sjlt_leaf(g: Array, keys: Array, *, k: int, s: int, block: int) -> Array:
    """[B, n] -> [B, k] unscaled (entries ±1): scatter-add of each column into its s target rows."""
    b, n = g.shape

    def step(acc_kb, c0, width):
        g_nb = jax.lax.dynamic_slice_in_dim(g, c0.astype(jnp.int32), width, axis=1).astype(jnp.float32).T
        rows, signs = hashing.sjlt_targets(keys, c0, k, s, width)
        upd = signs[:, :, None] * g_nb[None, :, :]  # [s, width, B]
        return acc_kb.at[rows.reshape(-1)].add(upd.reshape(-1, b), indices_are_sorted=False, unique_indices=False)

    return _blocked(n, min(block, n), step, jnp.zeros_like(g, shape=(k, b), dtype=jnp.float32)).T


# ------------------------------------------------------------------------------------ projectors
@dataclasses.dataclass(frozen=True)
class Projector(abc.ABC):
    """A linear map from a per-example gradient pytree to float32[B, K]; see the module docstring.

    Subclasses define ``kind``, ``project_leaf`` and ``dense_matrix``; ``project`` sums (or, for
    identity, concatenates) per-parameter contributions in sorted-name order.
    """

    k: int | None
    seed: int = 0
    block_size: int | None = None  # columns per generated block; speed only, never changes results

    kind: ClassVar[str]

    def __post_init__(self) -> None:
        if self.k is None and self.kind != "identity":
            raise ValueError(f"projector {self.kind!r}: k must be a positive integer, got None")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k <= 0):
            raise ValueError(f"projector {self.kind!r}: k must be a positive integer, got {self.k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"projector {self.kind!r}: seed must be an integer, got {self.seed!r}")
        if self.block_size is not None and (not isinstance(self.block_size, (int, np.integer)) or self.block_size <= 0):
            raise ValueError(f"projector {self.kind!r}: block_size must be a positive integer, got {self.block_size!r}")

    # -- description
    def options(self) -> dict[str, Any]:
        """Kind-specific options that change the projection (stored in ``spec``)."""
        return {}

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description for a run manifest; ``Projector.from_spec`` rebuilds the projector."""
        return {
            "kind": self.kind,
            "k": None if self.k is None else int(self.k),
            "seed": int(self.seed),
            "options": self.options(),
            "generator": hashing.GENERATOR_VERSION,
        }

    @staticmethod
    def from_spec(spec: Mapping[str, Any], **overrides: Any) -> "Projector":
        """Rebuild from ``spec`` (as stored in a manifest); ``overrides`` e.g. ``block_size=``."""
        gen = spec.get("generator")
        if gen != hashing.GENERATOR_VERSION:
            raise ValueError(
                f"projector spec was made by generator {gen!r}; this lmgrad has {hashing.GENERATOR_VERSION!r} "
                "and would produce a different projection"
            )
        for field in ("kind", "k", "seed"):
            if field not in spec:
                raise ValueError(f"projector spec lacks field {field!r}: {dict(spec)}")
        return make_projector(spec["kind"], spec["k"], spec["seed"], **dict(spec.get("options") or {}), **overrides)

    def output_dim(self, shapes: Shapes) -> int:
        """Length K of one example's sketch."""
        return int(self.k)

    def layout(self, shapes: Shapes) -> list[dict[str, Any]]:
        """How the K columns of a sketch map back to parameters (one global block for random kinds).

        Every block also carries ``module``, ``layer`` and ``type`` (`lmgrad.params.block_fields`).
        """
        return [{"name": "global", "offset": 0, "size": int(self.k), **block_fields("global")}]

    # -- computation
    def project(self, grads: Mapping[str, Array], shapes: Shapes | None = None) -> Array:
        """float32[B, K] sketch of each example's gradient (all leaves, sorted names).

        jit- and ``shard_map``-compatible; rows are independent, so the batch may be sharded freely.
        ``shapes`` (optional) are the declared parameter shapes to check the gradients against.
        """
        _check_grads(grads, shapes)
        out = None
        for name in sorted(grads):
            part = self.project_leaf(name, _flat(grads[name]))
            out = part if out is None else out + part
        return out

    @abc.abstractmethod
    def project_leaf(self, name: str, g: Array) -> Array:
        """float32[B, k] contribution of one flattened parameter gradient g: [B, n]."""

    @abc.abstractmethod
    def dense_matrix(self, name: str, n: int) -> np.ndarray:
        """Slow reference: the float64[k, n] block for parameter ``name``, built by numpy (small n only)."""

    def _block(self, default: int) -> int:
        return int(self.block_size or default)


@dataclasses.dataclass(frozen=True)
class IdentityProjector(Projector):
    """No compression: the flattened gradients concatenated in sorted-name order (``k`` is ignored)."""

    kind: ClassVar[str] = "identity"

    def output_dim(self, shapes: Shapes) -> int:
        return int(sum(math.prod(s) for s in shapes.values()))

    def layout(self, shapes: Shapes) -> list[dict[str, Any]]:
        out, offset = [], 0
        for name in sorted(shapes):
            size = math.prod(shapes[name])
            out.append({"name": name, "shape": tuple(int(d) for d in shapes[name]), "offset": offset, "size": size,
                        **block_fields(name)})
            offset += size
        return out

    def project(self, grads: Mapping[str, Array], shapes: Shapes | None = None) -> Array:
        _check_grads(grads, shapes)
        return jnp.concatenate([self.project_leaf(n, _flat(grads[n])) for n in sorted(grads)], axis=1)

    def project_leaf(self, name: str, g: Array) -> Array:
        _check_2d(name, g)
        return g.astype(jnp.float32)

    def dense_matrix(self, name: str, n: int) -> np.ndarray:
        return np.eye(n)


def unflatten(row: np.ndarray | Array, layout: list[dict[str, Any]]) -> dict[str, np.ndarray | Array]:
    """Split identity sketches [..., K] back into ``{name: [..., *shape]}`` using ``layout``."""
    total = sum(e["size"] for e in layout)
    if row.shape[-1] != total:
        raise ValueError(f"unflatten: sketch has {row.shape[-1]} columns, layout describes {total}")
    lead = row.shape[:-1]
    return {e["name"]: row[..., e["offset"] : e["offset"] + e["size"]].reshape(*lead, *e["shape"]) for e in layout}


@dataclasses.dataclass(frozen=True)
class _DenseProjector(Projector):
    _gaussian: ClassVar[bool]
    _np_block: ClassVar[Any]

    def _keys(self, name: str) -> tuple[int, int, int]:
        return hashing.param_keys(self.seed, name, self.kind)

    def project_leaf(self, name: str, g: Array) -> Array:
        _check_2d(name, g)
        # ~4 MB generated block: large enough to amortise the loop, small enough for cache.
        block = self._block(max(64, 2**20 // self.k))
        keys = jnp.asarray(hashing.keys_array(self._keys(name)))
        out = _dense_leaf(g, keys, k=self.k, block=block, gaussian=self._gaussian)
        return out * np.float32(1 / math.sqrt(self.k))

    def dense_matrix(self, name: str, n: int) -> np.ndarray:
        return type(self)._np_block(self._keys(name), 0, self.k, n) / math.sqrt(self.k)


@dataclasses.dataclass(frozen=True)
class GaussianProjector(_DenseProjector):
    """Dense projection with i.i.d. N(0, 1/k) entries (Box–Muller on hashed uniforms)."""

    kind: ClassVar[str] = "gaussian"
    _gaussian: ClassVar[bool] = True
    _np_block: ClassVar[Any] = staticmethod(hashing.np_gaussian_block)


@dataclasses.dataclass(frozen=True)
class RademacherProjector(_DenseProjector):
    """Dense projection with i.i.d. ±1/√k entries; ~5× faster to generate than Gaussian."""

    kind: ClassVar[str] = "rademacher"
    _gaussian: ClassVar[bool] = False
    _np_block: ClassVar[Any] = staticmethod(hashing.np_rademacher_block)


@dataclasses.dataclass(frozen=True)
class SJLTProjector(Projector):
    """Sparse JL (CountSketch for s=1): each column has s nonzeros ±1/√s, one per band of k/s rows."""

    s: int = 1
    kind: ClassVar[str] = "sjlt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.s, bool) or not isinstance(self.s, (int, np.integer)) or self.s <= 0:
            raise ValueError(f"projector 'sjlt': s must be a positive integer, got {self.s!r}")
        if self.k % self.s:
            raise ValueError(f"projector 'sjlt': s={self.s} must divide k={self.k} (one nonzero per band of k/s rows)")

    def options(self) -> dict[str, Any]:
        return {"s": int(self.s)}

    def _keys(self, name: str) -> tuple[int, int, int]:
        return hashing.param_keys(self.seed, name, self.kind)

    def project_leaf(self, name: str, g: Array) -> Array:
        _check_2d(name, g)
        keys = jnp.asarray(hashing.keys_array(self._keys(name)))
        out = _sjlt_leaf(g, keys, k=self.k, s=self.s, block=self._block(2**15))
        return out * np.float32(1 / math.sqrt(self.s))

    def dense_matrix(self, name: str, n: int) -> np.ndarray:
        return hashing.np_sjlt_matrix(self._keys(name), self.k, self.s, n)


_CLASSES: dict[str, type[Projector]] = {
    "identity": IdentityProjector,
    "gaussian": GaussianProjector,
    "rademacher": RademacherProjector,
    "sjlt": SJLTProjector,
}


def make_projector(kind: str, k: int | None, seed: int = 0, **opts: Any) -> Projector:
    """Build a projector. ``kind`` in ``KINDS``; ``k`` > 0 (may be None for identity); options:
    ``block_size`` (all; speed only) and ``s`` (sjlt, default 1)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown projector kind {kind!r}; valid kinds are {list(KINDS)}")
    if k is None and kind != "identity":
        raise ValueError(f"projector {kind!r}: k must be a positive integer, got None")
    cls = _CLASSES[kind]
    allowed = {f.name for f in dataclasses.fields(cls)} - {"k", "seed"}
    bad = sorted(set(opts) - allowed)
    if bad:
        raise ValueError(f"projector {kind!r}: unknown option(s) {bad}; valid options are {sorted(allowed)}")
    return cls(k=k, seed=seed, **opts)


def gaussian_matrix(seed: int, name: str, rows: int, cols: int, dtype: Any = jnp.float32) -> Array:
    """Unscaled N(0, 1) matrix [rows, cols] for (seed, name): same generator as the gaussian projector,
    so ``gaussian_matrix(seed, name, k, n) / √k`` equals ``make_projector("gaussian", k, seed)``'s block
    for ``name``. For small per-module factors (Kronecker-factored sketches)."""
    if rows <= 0 or cols <= 0:
        raise ValueError(f"gaussian_matrix({name!r}): rows and cols must be positive, got {rows}x{cols}")
    keys = jnp.asarray(hashing.keys_array(hashing.param_keys(seed, name, "gaussian")))
    return _gaussian_matrix(keys, rows=int(rows), cols=int(cols)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("rows", "cols"))
def _gaussian_matrix(keys: Array, *, rows: int, cols: int) -> Array:
    return hashing.gaussian_block(keys, jnp.uint32(0), rows, cols)
