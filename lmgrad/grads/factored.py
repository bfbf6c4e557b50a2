"""Kronecker-factored sketches of per-example gradient differentials, without building the gradients.

For a linear map y = W x (W: in → out) the per-example gradient is G = Σ_t δ_t x_tᵀ with δ_t = ∂ℓ/∂y_t,
so its factored sketch

    S = P_out G P_inᵀ = Σ_t (P_out δ_t)(P_in x_t)ᵀ            [r_out, r_in] = (P_out ⊗ P_in)·vec(G)

needs only the layer inputs x and output gradients δ. The layers sow x and perturb y
(`lmgrad.models.layers`), so ONE batched backward of Σ_b [ℓ(good_b) − ℓ(bad_b)] with respect to
the (zero) perturbations yields δ for every example and token at once: no weight-gradient matmul
and no per-example copy of the parameters. Rows are independent in the forward pass, so row b's δ
is exactly the gradient of its own loss; bad rows carry the −1 sign, and the pair's differential
sketch is the sum of its good and bad rows' sketches (linearity).

Conventions (what each block of the [B, K] sketch is; one block per parameter, sorted HF names):

* Projections are pure functions of (seed, name, shape, r): ``P_in = gaussian_matrix(seed,
  f"{weight}/in", r_in, in) / √r_in`` and ``P_out = gaussian_matrix(seed, f"{weight}/out", r_out,
  out) / √r_out`` with ``weight`` the module's HF weight name. Entries N(0, 1/r), independent, so
  E[PᵀP] = I and E⟨S_a, S_b⟩ = ⟨G_a, G_b⟩ (Kronecker of independent isotropic maps).
* Every weight block is ``[r_out, r_in] = P_out G P_inᵀ`` with G in the layer's (out, in)
  orientation. `Linear` stores W as [out, in] (HF layout = G). GPT-2's `Conv1D` stores W as
  [in, out]; its block is P_out G_hfᵀ P_inᵀ, i.e. the same (out, in) orientation.
* Embedding tables E [num, dim] are treated as the weight of the output head logits = h Eᵀ
  (out = num rows, in = dim), so the block is P_out G_hf P_inᵀ with P_out over the vocabulary.
  The lookup's input is one-hot, so P_out x_t is the column P_out[:, id_t]; its δ lives in the
  `dim` space and is projected by P_in. With tied embeddings the head use (δ = ∂ℓ/∂logits,
  x = final hidden state) adds to the same block with the same matrices, so the block is the
  sketch of the total gradient of the shared parameter.
* ``handle_vectors`` (non-matrix parameters):
  - ``"project"`` (default): a Linear/Conv1D bias has gradient Σ_t δ_t; its block is
    P_out Σ_t δ_t [r_out] with the layer's own P_out (exact, and free: P_out δ_t is computed for
    the weight anyway). Norm weights γ (LayerNorm, RMSNorm) have the exact per-example gradient
    Σ_t δ_t ⊙ x̂_t (x̂ = the normalised input, recomputed with the module's formula) and
    LayerNorm biases Σ_t δ_t; both are projected with ``P = gaussian_matrix(seed,
    f"{norm weight}/out", r_out, d) / √r_out`` (the ``norm`` module type's r_out).
  - ``"exact"``: the same per-example vector gradients, unprojected (size n each).
  - ``"exclude"``: no vector parameters.
* ``global_k``: a second stage, ``make_projector("sjlt", global_k, seed)`` over the per-parameter
  blocks (each block a "leaf" named by its parameter), giving one ``global`` block of width k.

Fidelity: a per-example gradient Σ_t δ_t x_tᵀ has rank ≤ T, and for a rank-1 G the sketch's squared
norm is ‖P_out u‖²‖P_in v‖², whose relative variance is ≈ 2/r_out + 2/r_in: the effective
dimension per module grows like r, not r_out·r_in. Measured on SmolLM2-135M / BLiMP
(bench/results/factored.jsonl): cosine-similarity agreement with exact gradients improves like
1/√r for uniform ranks (Pearson 0.75 at r=8, 0.85 at r=16, 0.92 at r=32). Ranks are better spent
where the gradient norm is and on the output side: the defaults here (`DEFAULT_R_IN` 8,
`DEFAULT_R_OUT` 16, `DEFAULT_OVERRIDES`: v_proj/down_proj 8×128, embeddings 16×256, norms 256) reach 0.975 (0.967 with another seed) at
K = 100k in the same time as uniform 16×16 (bench/results/fidelity.jsonl).

Padding tokens and padding rows contribute exactly zero (projected factors are masked). The
returned function's `.core` is pure and shape-polymorphic in B, for jit or shard_map.

Packed batches (`FactoredSketchFn.packed`, `lmgrad.tasks.iter_packed_pairs`): several pairs share a
row, each pair's good and bad sentence side by side as segments (attention and positions per
segment), the sign in a signed target mask. The backward is the same; a pair's block sums x ⊗ δ over
its own tokens only (a one-hot of each token's pair slot), so a pair's sketch does not depend on what
shares its row, up to float32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmgrad.grads.differential import as_arrays, check_pair, packed_arrays, sanitize
from lmgrad.models.layers import Conv1D, Embedding, LayerNorm, Linear, RMSNorm, unrolled, unstack_recorded
from lmgrad.params import TYPES, block_fields, flatten, matches, param_info, select
from lmgrad.scoring import sequence_logprob, token_logprobs
from lmgrad.sketch import hashing
from lmgrad.sketch.projectors import gaussian_matrix, make_projector

Array = jax.Array
Layout = list[dict[str, Any]]

VECTOR_POLICIES = ("project", "exact", "exclude")
MODULE_TYPES = TYPES  # embed, head, attn, mlp, norm, other (`lmgrad.params.param_info`)

# The one definition of the factored sketch's default ranks (the sketch job's defaults import them).
DEFAULT_R_IN = 8
DEFAULT_R_OUT = 16
DEFAULT_OVERRIDES: tuple[tuple[str, int, int], ...] = (
    ("*.v_proj.weight", 8, 128), ("*.down_proj.weight", 8, 128), ("embed", 16, 256), ("norm", 8, 256),
)
_FIELDS = ("input_ids", "attention_mask", "target_mask")
_HIGHEST = jax.lax.Precision.HIGHEST
_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (Linear, "linear"), (Conv1D, "conv1d"), (Embedding, "embedding"), (LayerNorm, "layernorm"), (RMSNorm, "rmsnorm"),
)


# ----------------------------------------------------------------------------------------- spec
@dataclasses.dataclass(frozen=True)
class FactoredSpec:
    """What a factored sketch is; `spec` is its JSON form for a run manifest.

    Attributes:
      seed: projection seed.
      r_in, r_out: default factor ranks (a weight block is r_out × r_in); `DEFAULT_R_IN`, `DEFAULT_R_OUT`.
      overrides: ((key, r_in, r_out), ...), first match wins; `DEFAULT_OVERRIDES` unless given. ``key`` is a module type from
        `MODULE_TYPES` (embed, head, attn, mlp, norm, other) or a pattern over the module's HF
        weight name: a glob (`fnmatch`, ``*`` crosses dots) or ``re:<regex>`` (full match). A
        mapping {key: (r_in, r_out)} is accepted and kept in insertion order.
      include, exclude: patterns over HF parameter names (same syntax); None includes all.
      handle_vectors: "project" | "exact" | "exclude" (module docstring).
      global_k: optional width of a second, sparse-JL stage over the concatenated blocks.
      global_s: nonzeros per column of that stage.
    """

    seed: int = 0
    r_in: int = DEFAULT_R_IN
    r_out: int = DEFAULT_R_OUT
    overrides: Any = DEFAULT_OVERRIDES
    include: Any = None
    exclude: Any = ()
    handle_vectors: str = "project"
    global_k: int | None = None
    global_s: int = 1

    def __post_init__(self) -> None:
        ov = self.overrides
        if isinstance(ov, Mapping):
            ov = tuple((k, *v) for k, v in ov.items())
        ov = tuple(tuple(o) for o in ov)
        for o in ov:
            if len(o) != 3 or not isinstance(o[0], str) or not all(_pos_int(v) for v in o[1:]):
                raise ValueError(f"FactoredSpec.overrides: expected (key, r_in, r_out) with positive ints, got {o!r}")
        object.__setattr__(self, "overrides", tuple((o[0], int(o[1]), int(o[2])) for o in ov))
        for field in ("include", "exclude"):
            v = getattr(self, field)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, field, None if v is None else tuple(v))
        for field in ("r_in", "r_out", "global_s"):
            if not _pos_int(getattr(self, field)):
                raise ValueError(f"FactoredSpec.{field} must be a positive integer, got {getattr(self, field)!r}")
        if self.global_k is not None and not _pos_int(self.global_k):
            raise ValueError(f"FactoredSpec.global_k must be a positive integer or None, got {self.global_k!r}")
        if self.handle_vectors not in VECTOR_POLICIES:
            raise ValueError(f"FactoredSpec.handle_vectors must be one of {VECTOR_POLICIES}, got {self.handle_vectors!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"FactoredSpec.seed must be an integer, got {self.seed!r}")

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description; `FactoredSpec.from_spec(spec)` rebuilds it."""
        return {
            "kind": "factored", "seed": int(self.seed), "r_in": self.r_in, "r_out": self.r_out,
            "overrides": [list(o) for o in self.overrides],
            "include": None if self.include is None else list(self.include), "exclude": list(self.exclude),
            "handle_vectors": self.handle_vectors, "global_k": self.global_k, "global_s": self.global_s,
            "generator": hashing.GENERATOR_VERSION,
        }

    @staticmethod
    def from_spec(spec: Mapping[str, Any]) -> "FactoredSpec":
        if spec.get("kind") != "factored":
            raise ValueError(f"not a factored sketch spec (kind={spec.get('kind')!r})")
        if spec.get("generator") != hashing.GENERATOR_VERSION:
            raise ValueError(
                f"factored spec was made by generator {spec.get('generator')!r}; this lmgrad has "
                f"{hashing.GENERATOR_VERSION!r} and would produce a different projection"
            )
        fields = {f.name for f in dataclasses.fields(FactoredSpec)}
        return FactoredSpec(**{k: v for k, v in spec.items() if k in fields})

    def ranks(self, weight_name: str, module_type: str) -> tuple[int, int]:
        """(r_in, r_out) for the module whose HF weight is `weight_name`."""
        for key, r_in, r_out in self.overrides:
            if key == module_type or (key not in MODULE_TYPES and matches(weight_name, key)):
                return r_in, r_out
        return self.r_in, self.r_out


def _pos_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


# --------------------------------------------------------------------------- model description
@dataclasses.dataclass(frozen=True)
class _Module:
    prefix: str  # HF module path, e.g. "model.layers.0.mlp.down_proj"
    kind: str  # linear | conv1d | embedding | layernorm | rmsnorm
    weight: str  # HF name of the weight (the projection names derive from it)
    shape: tuple[int, ...]  # weight shape, HF layout
    bias: str | None
    type: str  # MODULE_TYPES entry (`lmgrad.params.param_info`)
    tied_head: bool = False  # embedding also used as the output head
    layer: int | None = None  # transformer block index, None outside the stack


def _flax_path_to_hf(path: Sequence[str]) -> str:
    node: dict[str, Any] = {}
    cur = node
    for p in path:
        cur = cur.setdefault(p, {})
    cur["__leaf__"] = 0
    (name,) = flatten(node)
    return name[: -len(".__leaf__")]


def describe_modules(module: nn.Module, params: Any) -> dict[str, _Module]:
    """HF module path → description of every Linear/Conv1D/Embedding/norm module (shape-only trace)."""
    module = unrolled(module)  # interception needs per-block module paths
    kinds: dict[str, str] = {}
    heads: set[str] = set()

    def record(next_fun, args, kwargs, ctx):
        for cls, kind in _KINDS:
            if isinstance(ctx.module, cls):
                prefix = _flax_path_to_hf(ctx.module.path)
                if ctx.method_name == "__call__":
                    kinds[prefix] = kind
                elif ctx.method_name == "attend":
                    heads.add(prefix)
        return next_fun(*args, **kwargs)

    ids = jnp.zeros((1, 4), jnp.int32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p: module.apply({"params": p}, ids, jnp.ones_like(ids)), params)
    flat = flatten(params)
    family = getattr(getattr(module, "config", None), "family", None)
    out = {}
    for prefix, kind in sorted(kinds.items()):
        w = f"{prefix}.weight"
        b = f"{prefix}.bias" if f"{prefix}.bias" in flat else None
        if w not in flat:
            raise ValueError(f"factored: module {prefix} ({kind}) has no parameter {w}")
        info = param_info(w, family)
        out[prefix] = _Module(prefix, kind, w, tuple(flat[w].shape), b, info.type, prefix in heads, info.layer)
    covered = {m.weight for m in out.values()} | {m.bias for m in out.values() if m.bias}
    stray = sorted(set(flat) - covered)
    if stray:
        raise ValueError(f"factored: parameters not owned by a known layer type: {stray[:10]}")
    return out


def _io_dims(m: _Module) -> tuple[int, int]:
    """(in, out) sizes of the module's factored orientation (see module docstring)."""
    if m.kind == "conv1d":
        return m.shape[0], m.shape[1]
    if m.kind in ("linear", "embedding"):
        return m.shape[1], m.shape[0]
    return m.shape[0], m.shape[0]  # norms: vectors live in out space


def _factor_keys(spec: FactoredSpec, m: _Module) -> tuple[np.ndarray, np.ndarray | None]:
    """The hashed generator keys of (P_out, P_in) (host-side, from the seed and the weight's name)."""
    key = lambda side: hashing.keys_array(hashing.param_keys(spec.seed, f"{m.weight}/{side}", "gaussian"))  # noqa: E731
    return key("out"), (None if m.kind in ("layernorm", "rmsnorm") else key("in"))


def _factors_from_keys(spec: FactoredSpec, m: _Module, keys: tuple[Any, Any], dtype: Any = jnp.float32):
    """(P_out, P_in) from `_factor_keys` (traceable: the keys may be arguments of a jit)."""
    n_in, n_out = _io_dims(m)
    r_in, r_out = spec.ranks(m.weight, m.type)
    block = lambda k, r, n: hashing.gaussian_block(jnp.asarray(k), jnp.uint32(0), r, n).astype(dtype)  # noqa: E731
    p_out = block(keys[0], r_out, n_out) * (1 / math.sqrt(r_out))
    if keys[1] is None:
        return p_out, None
    return p_out, block(keys[1], r_in, n_in) * (1 / math.sqrt(r_in))


def factor_matrices(spec: FactoredSpec, m: _Module, dtype: Any = jnp.float32) -> tuple[Array, Array | None]:
    """(P_out [r_out, out], P_in [r_in, in] or None for norms), scaled by 1/√r; pure in (seed, name, shape, r).
    The same matrices as `_factors_from_keys` (the generator `FactoredSketchFn.factors` compiles once
    for all seeds), through `gaussian_matrix`'s per-shape jit, which is fast outside a trace."""
    n_in, n_out = _io_dims(m)
    r_in, r_out = spec.ranks(m.weight, m.type)
    p_out = gaussian_matrix(spec.seed, f"{m.weight}/out", r_out, n_out, dtype) * (1 / math.sqrt(r_out))
    if m.kind in ("layernorm", "rmsnorm"):
        return p_out, None
    p_in = gaussian_matrix(spec.seed, f"{m.weight}/in", r_in, n_in, dtype) * (1 / math.sqrt(r_in))
    return p_out, p_in


def _selected(spec: FactoredSpec, names: Sequence[str]) -> list[str]:
    try:
        return select(names, spec.include, spec.exclude)
    except ValueError:
        raise ValueError(f"factored: no parameter selected by include={spec.include} exclude={spec.exclude}") from None


def _entries(spec: FactoredSpec, modules: Mapping[str, _Module]) -> list[dict[str, Any]]:
    """One layout entry per sketched parameter, sorted by HF name (without offsets)."""
    owner: dict[str, tuple[_Module, str]] = {}
    for m in modules.values():
        owner[m.weight] = (m, "weight")
        if m.bias:
            owner[m.bias] = (m, "bias")
    out = []
    for name in _selected(spec, sorted(owner)):
        m, role = owner[name]
        vector = role == "bias" or m.kind in ("layernorm", "rmsnorm")
        if vector and spec.handle_vectors == "exclude":
            continue
        r_in, r_out = spec.ranks(m.weight, m.type)
        if not vector:
            shape = [r_out, r_in]
        elif spec.handle_vectors == "exact":
            shape = [_io_dims(m)[1]]
        else:
            shape = [r_out]
        entry = {"name": name, "module": m.prefix, "layer": m.layer, "kind": m.kind, "type": m.type, "role": role,
                 "shape": shape, "size": math.prod(shape)}
        if m.tied_head:  # one tensor, two uses: its block sketches the embedding's and the head's gradient
            entry["tied"] = True
        out.append(entry)
    if not out:
        raise ValueError("factored: the selection holds no parameter to sketch")
    return out


def _with_offsets(entries: list[dict[str, Any]]) -> Layout:
    offset, out = 0, []
    for e in entries:
        out.append({**e, "offset": offset})
        offset += e["size"]
    return out


def _global_layout(k: int) -> Layout:
    """The layout of a `global_k` sketch: one block mixing every parameter."""
    return [{"name": "global", "offset": 0, "size": k, "shape": [k], **block_fields("global")}]


# ------------------------------------------------------------------------------- batch helpers
# ------------------------------------------------------------------------------- capture hooks
def _normalized(m: nn.Module, x: Array) -> Array:
    """x̂ such that the norm's output is γ ⊙ x̂ (+ β): the formulas of `lmgrad.models.layers`."""
    xf = x.astype(jnp.float32)
    if isinstance(m, LayerNorm):
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return (xf - mean) * jax.lax.rsqrt(var + m.eps)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + m.eps)
    return y.astype(x.dtype)


def _make_capture(rows: int) -> Callable[..., Any]:
    """An interceptor adding what the layers do not record themselves: the token ids of embedding
    lookups, and x̂ and a δ perturbation of every norm (norm weights are vectors; their per-example
    gradient Σ_t δ_t ⊙ x̂_t is exact and cheap).

    Lookups shared by the batch (position tables see ids [1, T]) are broadcast to `rows` rows
    first, so their perturbation, hence δ, is per example rather than summed over the batch.
    """

    def capture(next_fun, args, kwargs, ctx):
        m = ctx.module
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(m, Embedding):
            ids = args[0]
            if ids.ndim == 2 and ids.shape[0] != rows:
                ids = jnp.broadcast_to(ids, (rows, ids.shape[1]))
            if m.is_mutable_collection("intermediates"):
                m.sow("intermediates", "ids", ids)
            return next_fun(ids, *args[1:], **kwargs)
        if isinstance(m, (LayerNorm, RMSNorm)):
            y = next_fun(*args, **kwargs)
            if m.is_mutable_collection("intermediates"):
                m.sow("intermediates", "xhat", _normalized(m, args[0]))
            return m.perturb("dy", y)
        return next_fun(*args, **kwargs)

    return capture


def _one(value: Any, key: str) -> Array:
    if value is None:
        raise ValueError(f"factored: nothing captured at {key}")
    if isinstance(value, tuple):
        if len(value) != 1:
            raise ValueError(f"factored: module {key} was called {len(value)} times; each layer must be used once")
        return value[0]
    return value


# -------------------------------------------------------------------------------- fast path
def _proj(a: Array, p: Array) -> Array:
    """[N, T, n] @ P[r, n]ᵀ → [N, T, r] in float32."""
    return jnp.einsum("ntd,rd->ntr", a, p.astype(a.dtype), precision=_HIGHEST, preferred_element_type=jnp.float32)


class _PairRows:
    """Pairs as rows of a bucketed batch: [2B, T] with the B good rows first, then the B bad rows;
    pair b sums rows b and B + b (the bad row's sign is already in its δ)."""

    def outer(self, c: Array, a: Array) -> Array:
        """Σ over (good, bad) rows and tokens of c ⊗ a: [..., 2B, T, r_o], [..., 2B, T, r_i] → [..., B, r_o, r_i]."""
        *lead, n, t, o = c.shape
        c2, a2 = c.reshape(*lead, 2, n // 2, t, o), a.reshape(*lead, 2, n // 2, t, a.shape[-1])
        return jnp.einsum("...sbto,...sbti->...boi", c2, a2, precision=_HIGHEST)

    def total(self, v: Array) -> Array:
        """[..., 2B, T, r] → [..., B, r]: Σ over (good, bad) rows and tokens."""
        *lead, n, t, r = v.shape
        return v.reshape(*lead, 2, n // 2, t, r).sum(axis=(-4, -2))


class _Slots:
    """Pairs in the slots of packed rows (`lmgrad.tasks.iter_packed_pairs`): `onehot` [N, T, Q] says
    which of its row's Q pairs a token belongs to; pair (n, q) sums its tokens, so the result has
    N·Q pairs in row-major order."""

    def __init__(self, onehot: Array):
        self.onehot = onehot

    def outer(self, c: Array, a: Array) -> Array:
        """[..., N, T, r_o], [..., N, T, r_i] → [..., N·Q, r_o, r_i]: Σ over each slot's tokens of c ⊗ a."""
        *lead, n, t, o = c.shape
        i, q = a.shape[-1], self.onehot.shape[-1]
        # The slot one-hot multiplies the narrower factor; the sum over tokens is then one batched
        # matmul per row, [r_o, T] @ [T, Q·r_i].
        if i <= o:
            aq = (a[..., None, :] * self.onehot[..., None]).reshape(*lead, n, t, q * i)
            s = jnp.einsum("...nto,...ntk->...nok", c, aq, precision=_HIGHEST).reshape(*lead, n, o, q, i)
            s = jnp.moveaxis(s, -2, -3)
        else:
            cq = (c[..., None, :] * self.onehot[..., None]).reshape(*lead, n, t, q * o)
            s = jnp.einsum("...ntk,...nti->...nki", cq, a, precision=_HIGHEST).reshape(*lead, n, q, o, i)
        return s.reshape(*lead, n * q, o, i)

    def total(self, v: Array) -> Array:
        """[..., N, T, r] → [..., N·Q, r]: Σ over each slot's tokens."""
        *lead, n, t, r = v.shape
        s = jnp.einsum("...ntr,ntq->...nqr", v, self.onehot.astype(v.dtype), precision=_HIGHEST)
        return s.reshape(*lead, n * self.onehot.shape[-1], r)


def _module_blocks(
    spec: FactoredSpec, m: _Module, factors: tuple[Array, Array | None], want: set[str],
    inter: Mapping[str, Any], dys: Mapping[str, Array], tok: Array, pairs: "_PairRows | _Slots",
) -> dict[str, Array]:
    """{param name: [P, size]} for one module from captured x / δ; tok [N, T] token mask, `pairs` how
    the N rows' tokens sum into P pairs."""
    p_out, p_in = factors
    mask = tok[..., None]
    z = lambda v: jnp.where(mask, v, 0.0)  # noqa: E731
    out: dict[str, Array] = {}
    flat = lambda v: v.reshape(v.shape[0], -1)  # noqa: E731
    if m.kind in ("linear", "conv1d"):
        x, dy = _one(inter.get(f"{m.prefix}.x"), m.prefix), dys[f"{m.prefix}.dy"]
        c = z(_proj(dy, p_out))
        if m.weight in want:
            out[m.weight] = flat(pairs.outer(c, z(_proj(x, p_in))))
        if m.bias and m.bias in want:
            out[m.bias] = pairs.total(c if spec.handle_vectors == "project" else z(dy.astype(jnp.float32)))
    elif m.kind == "embedding":
        if m.weight in want:
            ids = _one(inter.get(f"{m.prefix}.ids"), m.prefix)
            dy = dys[f"{m.prefix}.dy"]
            rows = jnp.take(p_out.T, ids, axis=0)  # P_out one-hot(id) = column id of P_out
            s = pairs.outer(z(rows), z(_proj(dy, p_in)))
            if m.tied_head:
                h, dl = _one(inter.get(f"{m.prefix}.head_x"), m.prefix), dys[f"{m.prefix}.head_dy"]
                s = s + pairs.outer(z(_proj(dl, p_out)), z(_proj(h, p_in)))
            out[m.weight] = flat(s)
    else:  # layernorm / rmsnorm
        xh, dy = _one(inter.get(f"{m.prefix}.xhat"), m.prefix), dys[f"{m.prefix}.dy"]
        # A norm applied per head (Gemma-3's QK-norm) sees [2B, T, H, D]: sum its heads like tokens.
        xh = xh.astype(jnp.float32).reshape(*xh.shape[:2], -1, xh.shape[-1])
        dy = dy.astype(jnp.float32).reshape(xh.shape)
        gw = pairs.total(z((dy * xh).sum(2)))
        dy = z(dy.sum(2))
        exact = spec.handle_vectors == "exact"
        if m.weight in want:
            out[m.weight] = gw if exact else jnp.einsum("bd,rd->br", gw, p_out, precision=_HIGHEST)
        if m.bias and m.bias in want:
            gb = pairs.total(dy)
            out[m.bias] = gb if exact else jnp.einsum("bd,rd->br", gb, p_out, precision=_HIGHEST)
    return out


def _grouped_linear_blocks(
    spec: FactoredSpec, group: Sequence[_Module], factors: Mapping[str, tuple[Array, Array | None]], want: set[str],
    inter: Mapping[str, Any], dys: Mapping[str, Array], tok: Array, pairs: "_PairRows | _Slots",
) -> dict[str, Array]:
    """`_module_blocks` for G Linear/Conv1D modules of one (in, out, r_in, r_out) shape at once: x, δ and
    the factors are stacked so each stage is one batched matmul instead of G small ones (the same
    products, term by term)."""
    mask = tok[None, ..., None]
    z = lambda v: jnp.where(mask, v, 0.0)  # noqa: E731
    xs = jnp.stack([_one(inter.get(f"{m.prefix}.x"), m.prefix) for m in group])
    dy = jnp.stack([dys[f"{m.prefix}.dy"] for m in group])
    p_out = jnp.stack([factors[m.prefix][0] for m in group])
    p_in = jnp.stack([factors[m.prefix][1] for m in group])
    c = z(jnp.einsum("gntd,grd->gntr", dy, p_out.astype(dy.dtype), precision=_HIGHEST,
                     preferred_element_type=jnp.float32))
    out: dict[str, Array] = {}
    if any(m.weight in want for m in group):
        a = z(jnp.einsum("gntd,grd->gntr", xs, p_in.astype(xs.dtype), precision=_HIGHEST,
                         preferred_element_type=jnp.float32))
        w = pairs.outer(c, a)
        w = w.reshape(*w.shape[:2], -1)
        out.update({m.weight: w[i] for i, m in enumerate(group) if m.weight in want})
    biases = [(i, m) for i, m in enumerate(group) if m.bias and m.bias in want]
    if biases:
        bs = pairs.total(c if spec.handle_vectors == "project" else z(dy.astype(jnp.float32)))
        out.update({m.bias: bs[i] for i, m in biases})
    return out


FUSE_MODES = ("loop", "grouped")


class FactoredSketchFn:
    """fn(params, good, bad) → (float32 [B, K] sketch of each pair's differential, layout).

    `core(params, good, bad)` is the un-jitted pure function on sanitised-or-not array dicts with
    fields input_ids, attention_mask, target_mask, valid (all [B, T] / [B]); it is shape-polymorphic
    in B, so it can be jitted or wrapped in shard_map. `traces` counts jit traces.

    `fuse`: ``"grouped"`` projects Linear/Conv1D modules of equal shapes and ranks together (one
    batched matmul per stage and shape); ``"loop"`` one module at a time. Same sketch either way
    (up to float32 rounding of the matmul kernels); `bench/` (``python -m bench run --suite=fusion``)
    measures the two.
    """

    def __init__(self, module: nn.Module, params: Any, spec: FactoredSpec, fuse: str = "grouped"):
        if fuse not in FUSE_MODES:
            raise ValueError(f"FactoredSketchFn: fuse must be one of {FUSE_MODES}, got {fuse!r}")
        # A scanned model (`ModelConfig.scan_layers`) records x and δ stacked over its blocks
        # (`lmgrad.models.layers.run_layers`); `unstack_recorded` gives them per-block keys.
        self.module, self.spec, self.fuse = module, spec, fuse
        self.modules = describe_modules(module, params)
        entries = _entries(spec, self.modules)
        self.block_layout = _with_offsets(entries)
        if spec.global_k is None:
            self.layout = self.block_layout
        else:
            self.layout = _global_layout(int(spec.global_k))
        self.dim = sum(e["size"] for e in self.layout)
        self.traces = 0
        self._jit = jax.jit(self._counted)
        self._packed_jit = jax.jit(self._packed_counted)
        self._factors: dict[str, tuple[Array, Array | None]] | None = None
        self._factor_trace_count = [0]
        self._factor_gen = self._make_factor_gen()

    def with_seed(self, seed: int) -> "FactoredSketchFn":
        """This sketch function for another projection seed, sharing the traced and compiled core:
        the seed enters only through the factor matrices, an argument of the compiled function.
        Not for a `global_k` spec, whose sparse-JL stage is traced with its seed."""
        if self.spec.global_k is not None:
            raise ValueError("FactoredSketchFn.with_seed: a global_k sketch traces its seed; build a new function")
        other = copy.copy(self)
        other.spec = dataclasses.replace(self.spec, seed=int(seed))
        other._factors = None
        return other

    def _used(self) -> list[_Module]:
        want = {e["name"] for e in self.block_layout}
        return [m for m in self.modules.values() if want & {m.weight, m.bias}]

    def factors(self) -> dict[str, tuple[Array, Array | None]]:
        """{module path: (P_out, P_in)} for the sketched modules, generated once and cached (a pure
        function of the spec and shapes; ~(in + out)·r floats per module)."""
        if self._factors is None:
            keys = {m.prefix: _factor_keys(self.spec, m) for m in self._used()}
            self._factors = self._factor_gen(keys)
        return self._factors

    @property
    def factor_traces(self) -> int:
        """How often the factor generator was traced (shared with `with_seed` copies)."""
        return self._factor_trace_count[0]

    def _make_factor_gen(self) -> Callable[[Any], Any]:
        # One jit for all modules (one compile, not one per matrix shape), taking the hashed keys as
        # arguments so that every projection seed runs the same compiled generator.
        used, spec, count = self._used(), self.spec, self._factor_trace_count

        def gen(keys):
            count[0] += 1
            return {m.prefix: _factors_from_keys(spec, m, keys[m.prefix]) for m in used}

        return jax.jit(gen)

    def _counted(self, params, good, bad, factors):
        self.traces += 1
        return self.core(params, good, bad, factors)

    def _packed_counted(self, params, batch, factors):
        self.traces += 1
        return self.packed_core(params, batch, factors)

    def core(
        self, params: Any, good: Mapping[str, Array], bad: Mapping[str, Array],
        factors: Mapping[str, tuple[Array, Array | None]] | None = None,
    ) -> Array:
        """Pure [B, K] sketch; `factors` (from `factors()`) or None to generate them in the trace."""
        g, bd = sanitize(good), sanitize(bad)
        cat = {k: jnp.concatenate([g[k], bd[k]], axis=0) for k in _FIELDS}
        valid2 = jnp.concatenate([g["valid"], g["valid"]])
        sign = jnp.concatenate([jnp.ones_like(g["target_mask"][:, 0]), -jnp.ones_like(bd["target_mask"][:, 0])])
        sign = jnp.where(valid2, sign, 0.0)
        am = cat["attention_mask"]
        tok = (am > 0) & valid2[:, None]
        out = self._sketch(params, cat["input_ids"], am, sign[:, None] * cat["target_mask"], tok, _PairRows(), factors)
        return jnp.where(g["valid"][:, None], out, 0.0)

    def packed_core(
        self, params: Any, batch: Mapping[str, Array], factors: Mapping[str, tuple[Array, Array | None]] | None = None,
    ) -> Array:
        """Pure [R, Q, K] sketch of a packed batch (`lmgrad.tasks.PackedPairBatch` fields input_ids,
        attention_mask (segments), target_mask (signed), slot [R, L] and valid [R, Q]); the pair in
        slot q of row r is row [r, q]; empty slots are exactly zero. Shape-polymorphic in R."""
        valid = batch["valid"]
        r, q = valid.shape
        onehot = batch["slot"][..., None] == jnp.arange(q, dtype=batch["slot"].dtype)
        am = batch["attention_mask"]
        out = self._sketch(params, batch["input_ids"], am, batch["target_mask"], am > 0,
                           _Slots(onehot.astype(jnp.float32)), factors)
        return jnp.where(valid[..., None], out.reshape(r, q, -1), 0.0)

    def _sketch(self, params: Any, ids: Array, am: Array, weights: Array, tok: Array, pairs: "_PairRows | _Slots",
                factors: Mapping[str, tuple[Array, Array | None]] | None) -> Array:
        """[P, K]: one batched backward of −Σ weights · log p over rows `ids` [N, T] (weights carry
        each sentence's sign), then every module's x and δ projected and summed into pairs."""
        if factors is None:
            factors = {m.prefix: factor_matrices(self.spec, m) for m in self._used()}

        def run(pert):
            variables = {"params": params} if pert is None else {"params": params, "perturbations": pert}
            with nn.intercept_methods(_make_capture(ids.shape[0])):
                return self.module.apply(
                    variables, ids, am, mutable=["intermediates"] if pert is not None else ["perturbations"]
                )

        # zeros_like of a batch array keeps its device-variance: inside shard_map, invariant zeros
        # would make grad psum every device's δ (the transpose of the implicit invariant→varying cast).
        shapes = jax.eval_shape(lambda: run(None)[1])["perturbations"]
        pert0 = jax.tree.map(lambda s: jnp.zeros_like(weights, shape=s.shape, dtype=s.dtype), shapes)

        def loss(pert):
            logits, state = run(pert)
            return -jnp.sum(token_logprobs(logits, ids) * weights), state["intermediates"]

        dpert, inter = jax.grad(loss, has_aux=True)(pert0)
        dys, inter = unstack_recorded(flatten(dpert)), unstack_recorded(flatten(inter))
        want = {e["name"] for e in self.block_layout}
        blocks: dict[str, Array] = {}
        groups: dict[tuple, list[_Module]] = {}
        for m in self._used():
            if self.fuse == "grouped" and m.kind in ("linear", "conv1d"):
                groups.setdefault((_io_dims(m), self.spec.ranks(m.weight, m.type)), []).append(m)
            else:
                blocks.update(_module_blocks(self.spec, m, factors[m.prefix], want, inter, dys, tok, pairs))
        for group in groups.values():
            if len(group) == 1:
                blocks.update(_module_blocks(self.spec, group[0], factors[group[0].prefix], want, inter, dys, tok,
                                             pairs))
            else:
                blocks.update(_grouped_linear_blocks(self.spec, group, factors, want, inter, dys, tok, pairs))
        blocks = {e["name"]: blocks[e["name"]] for e in self.block_layout}
        if self.spec.global_k is not None:
            proj = make_projector("sjlt", int(self.spec.global_k), self.spec.seed, s=self.spec.global_s)
            return proj.project(blocks)
        return jnp.concatenate([blocks[e["name"]] for e in self.block_layout], axis=1)

    def __call__(self, params: Any, good: Any, bad: Any) -> tuple[Array, Layout]:
        g, b = as_arrays(good), as_arrays(bad)
        check_pair(g, b)
        return self._jit(params, g, b, self.factors()), self.layout

    def packed(self, params: Any, batch: Any) -> tuple[Array, Layout]:
        """float32 [R, Q, K] sketches of a `lmgrad.tasks.PackedPairBatch`: the pair in slot q of row r
        (`batch.index[r, q]`) is row [r, q], the same sketch `__call__` gives it in a bucketed batch
        (up to float32 rounding); empty slots are zero."""
        return self._packed_jit(params, packed_arrays(batch), self.factors()), self.layout


def make_factored_sketch_fn(model: Any, spec: FactoredSpec | None = None, params: Any = None) -> FactoredSketchFn:
    """Factored sketch of pair differentials: fn(params, good, bad) → (float32 [B, K], layout).

    `model` is a `LoadedModel` (its params give the shapes) or a Flax module with `params`.
    One batched forward/backward per call; see the module docstring for the blocks' meaning.
    """
    module = getattr(model, "module", model)
    params = params if params is not None else getattr(model, "params", None)
    if params is None:
        raise ValueError("make_factored_sketch_fn: pass a LoadedModel or params= (shapes are needed)")
    return FactoredSketchFn(module, params, spec or FactoredSpec())


# ---------------------------------------------------------------------------- slow reference
def exact_pair_grads(module: nn.Module, params: Any, good: Any, bad: Any) -> dict[str, np.ndarray]:
    """Exact per-pair ∇[ℓ(good) − ℓ(bad)] by a Python loop of `jax.grad` (one pair, [1, T], at a time).

    Returns numpy {HF name: [B, *shape]}; padding rows are zero and never run.
    """
    g, b = as_arrays(good), as_arrays(bad)

    def nll(p, row):
        logits = module.apply({"params": p}, row["input_ids"], row["attention_mask"])
        return -sequence_logprob(logits, row["input_ids"], row["target_mask"])[0]

    grad_fn = jax.jit(jax.grad(lambda p, gr, br: nll(p, gr) - nll(p, br)))
    flat0 = flatten(params)
    out = {n: np.zeros((g["input_ids"].shape[0],) + tuple(v.shape), np.float64) for n, v in flat0.items()}
    for i in np.flatnonzero(np.asarray(g["valid"])):
        row = lambda d: {k: d[k][i: i + 1] for k in _FIELDS}  # noqa: E731
        for n, v in flatten(grad_fn(params, row(g), row(b))).items():
            out[n][i] = np.asarray(v, np.float64)
    return out


def project_exact(
    spec: FactoredSpec, modules: Mapping[str, _Module], grads: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, Layout]:
    """float64 [B, K] sketch of exact per-example gradients {name: [B, *shape]} with the same
    matrices: P_out G P_inᵀ (G in (out, in) orientation), P_out g for vectors, dense SJLT stage."""
    layout = _with_offsets(_entries(spec, modules))
    by_param = {}
    for m in modules.values():
        by_param[m.weight] = m
        if m.bias:
            by_param[m.bias] = m
    blocks = {}
    for e in layout:
        m, g = by_param[e["name"]], np.asarray(grads[e["name"]], np.float64)
        p_out, p_in = (None if p is None else np.asarray(p, np.float64) for p in factor_matrices(spec, m))
        if e["role"] == "weight" and m.kind not in ("layernorm", "rmsnorm"):
            g_oi = np.swapaxes(g, 1, 2) if m.kind == "conv1d" else g
            blk = np.einsum("ro,boi,si->brs", p_out, g_oi, p_in)
        elif spec.handle_vectors == "exact":
            blk = g
        else:
            blk = np.einsum("ro,bo->br", p_out, g)
        blocks[e["name"]] = blk.reshape(g.shape[0], -1)
    if spec.global_k is None:
        return np.concatenate([blocks[e["name"]] for e in layout], axis=1), layout
    proj = make_projector("sjlt", int(spec.global_k), spec.seed, s=spec.global_s)
    out = sum(blk @ proj.dense_matrix(name, blk.shape[1]).T for name, blk in sorted(blocks.items()))
    return out, _global_layout(int(spec.global_k))


def factored_reference(
    model: Any, spec: FactoredSpec, good: Any, bad: Any, params: Any = None
) -> tuple[np.ndarray, Layout]:
    """Slow twin of `make_factored_sketch_fn`: exact per-example gradient differentials (a loop of
    `jax.grad`) projected in float64 with the same P_out, P_in. Tiny models only."""
    module = getattr(model, "module", model)
    params = params if params is not None else model.params
    modules = describe_modules(module, params)
    return project_exact(spec, modules, exact_pair_grads(module, params, good, bad))


__all__ = [
    "DEFAULT_OVERRIDES", "DEFAULT_R_IN", "DEFAULT_R_OUT", "FactoredSketchFn", "FactoredSpec", "MODULE_TYPES", "VECTOR_POLICIES", "describe_modules", "exact_pair_grads",
    "factor_matrices", "factored_reference", "make_factored_sketch_fn", "project_exact",
]
