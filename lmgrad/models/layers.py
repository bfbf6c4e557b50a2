"""Building blocks shared by the model families.

Parameters are named and shaped exactly like the Hugging Face PyTorch state dict (`weight` of a
Linear is [out, in], GPT-2's Conv1D `weight` is [in, out]) so checkpoint conversion is an identity
map plus a short list of per-family exceptions.

Every linear map records its input and exposes its output through Flax's intermediates and
perturbation mechanisms (`sow('intermediates', 'x', ...)` and `perturb('dy', ...)`); both are
no-ops unless the caller asks for those collections. The factored sketch path uses them to get,
in one batched backward, the layer inputs x and output gradients δ of every example.

`run_layers` runs a family's transformer blocks either unrolled (one traced copy per block) or,
with `ModelConfig.scan_layers`, as one `jax.lax.scan` over the blocks' parameters stacked inside
the trace, so compile time does not grow with depth. Parameters keep their per-block HF names
(``layers_3``) in both modes: checkpoints, selections, gradients and store layouts never see the
stacked form.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from lmgrad.models.config import ModelConfig

Dtype = jnp.dtype

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear_map(x: jax.Array, w: jax.Array, out_in: bool) -> jax.Array:
    """x [..., in] through a weight stored [out, in] (`out_in`, torch's Linear) or [in, out] (GPT-2's
    Conv1D) → [..., out]. Its gradient is the usual one, with the weight gradient written as one
    matrix product over all leading axes (δᵀ x on [N, out] and [N, in]): the transpose JAX derives
    by itself came out of XLA:CPU's algebraic passes as a dot of two transposed operands, 1.6× slower
    on a GPT-2-small MLP's weight gradients (bench/README.md, kernels: mlp+wgrad)."""
    return jnp.einsum("...i,oi->...o" if out_in else "...i,io->...o", x, w)


def _linear_map_fwd(x: jax.Array, w: jax.Array, out_in: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return linear_map(x, w, out_in), (x, w)


def _linear_map_bwd(out_in: bool, res: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    dx = jnp.einsum("...o,oi->...i" if out_in else "...o,io->...i", dy, w)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dw = jnp.einsum("no,ni->oi", dy2, x2) if out_in else jnp.einsum("ni,no->io", x2, dy2)
    return _like(dx.astype(x.dtype), x), _like(dw.astype(w.dtype), w)


def _like(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """`grad` summed over the mesh axes along which it varies and `primal` does not (inside
    `shard_map`): what JAX's own transpose of the implicit invariant→varying cast does, and the type
    a custom rule must return."""
    extra = tuple(sorted(_varying(grad) - _varying(primal)))
    return jax.lax.psum(grad, extra) if extra else grad


def _varying(x: jax.Array) -> frozenset:
    """The mesh axes along which `x` varies inside `shard_map` (`aval.mat.varying` in jax 0.10, `aval.vma`
    before it); empty outside one."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


linear_map.defvjp(_linear_map_fwd, _linear_map_bwd)


def _capture(module: nn.Module, x: jax.Array) -> None:
    if module.is_mutable_collection("intermediates"):
        module.sow("intermediates", "x", x)


class Linear(nn.Module):
    """y = x Wᵀ + b with W stored [out, in] as in `torch.nn.Linear`."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.dtype)
        _capture(self, x)
        y = linear_map(x, w.astype(x.dtype), True)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype).astype(x.dtype)
        return self.perturb("dy", y)


class Conv1D(nn.Module):
    """GPT-2's `Conv1D`: a linear map with W stored [in, out]."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.dtype)
        b = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        _capture(self, x)
        y = linear_map(x, w.astype(x.dtype), False) + b.astype(x.dtype)
        return self.perturb("dy", y)


class Embedding(nn.Module):
    """Token (or position) embedding table [num, dim], usable as a tied output head."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.weight = self.param(
            "weight", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        y = jnp.take(self.weight, ids, axis=0)
        return self.perturb("dy", y)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output head: logits = h Eᵀ."""
        # Separate names from the lookup's so both uses of a tied matrix are seen.
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "head_x", h)
        y = linear_map(h, self.weight.astype(h.dtype), True)
        return self.perturb("head_dy", y)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (d,), self.dtype)
        b = self.param("bias", nn.initializers.zeros, (d,), self.dtype)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * w.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. `unit_offset` is Gemma's form: the stored weight w scales by
    (1 + w), in float32 before the cast back, as transformers' `Gemma3RMSNorm`."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        w = self.param("weight", init, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        # As transformers' LlamaRMSNorm: normalise in float32, cast, then scale.
        return w.astype(x.dtype) * y.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq: tuple[float, ...], factor: float = 1.0):
    """cos/sin tables [..., T, rotary_dim] in float32 (rotate-half layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first `rotary_dim` channels of x [B, T, H, D] (GPT-NeoX/Llama rotate-half)."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x_rot * c + rotated * s, x_pass], axis=-1)


def _band_mask(band: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, 1, T, T]: band[t, s] (0/1), key s not padding (attention_mask > 0), and query t and key s
    in the same segment (equal mask values: a 0/1 mask is one segment per row, and a packed row
    numbers its sentences 1, 2, … so none attends to another).

    Written as min(band, mask) · [same] > 0 (equal for any real or integer mask) rather than a
    boolean `and` of broadcasts: XLA:CPU took tens of seconds to compile that `and` as a kernel of
    its own, which it becomes when hoisted out of a scanned layer stack (bench/README.md)."""
    am = attention_mask.astype(jnp.int32) if attention_mask.dtype == jnp.bool_ else attention_mask
    key = jnp.minimum(band.astype(am.dtype)[None, None], am[:, None, None, :])
    same = (am[:, None, :, None] == am[:, None, None, :]).astype(am.dtype)
    return key * same > 0


def segment_positions(attention_mask: jax.Array) -> jax.Array:
    """[B, T] int32 position of each token within its segment (a run of equal mask values): 0, 1, …
    from each sentence's first token, so a right-padded row gets 0…T−1 and a packed row restarts
    at every sentence, as if each were alone in its row."""
    am = attention_mask
    t = am.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones_like(am[:, :1], dtype=bool), am[:, 1:] != am[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: query t sees key s iff s ≤ t and s is not padding."""
    t = attention_mask.shape[-1]
    return _band_mask(jnp.tril(jnp.ones((t, t), jnp.int32)), attention_mask)


def sliding_causal_mask(attention_mask: jax.Array, window: int) -> jax.Array:
    """`causal_mask` restricted to the last `window` keys: query t sees s iff t - window < s ≤ t
    (transformers' `sliding_window_overlay`: the window counts the query itself)."""
    t = attention_mask.shape[-1]
    pos = jnp.arange(t)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    return _band_mask(band, attention_mask)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,K,D] with H = G·K; returns [B,T,H·D].

    Scores and softmax in float32 whatever the compute dtype.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v)
    return o.reshape(b, t, h * d)


def unrolled(module: nn.Module) -> nn.Module:
    """`module` with its blocks unrolled (`scan_layers=False`); the same params apply to both.

    For code that addresses modules by their per-block paths (method interceptors, the factored
    sketch's captured x and δ)."""
    config = getattr(module, "config", None)
    if config is None or not getattr(config, "scan_layers", False):
        return module
    return module.clone(config=dataclasses.replace(config, scan_layers=False))


def run_layers(
    parent: nn.Module, name: str, layers: Sequence[nn.Module], x: jax.Array,
    block_args: Callable[[Any], tuple[Any, ...]], *, pass_index: bool = False,
) -> jax.Array:
    """x through `layers` (the setup-defined list `parent.<name>`, children ``{name}_{i}``).

    Block i is called as ``layers[i](x, *block_args(i))`` (plus ``layer_idx=i`` with `pass_index`).
    Unrolled unless `parent.config.scan_layers`. Scanned, the blocks' params are stacked to
    [L, ...] in the trace and one block body is traced and lowered, whatever the depth; gradients
    flow back to each block's own (HF-named) params through the stack. There `i` is a traced int32
    (per-block arguments, e.g. Gemma-3's sliding or global mask, are selected with it inside the
    body). Initialisation and applies that record 'intermediates' or 'perturbations' always run
    unrolled, because those collections are keyed by per-block module paths.

    On XLA:CPU (SmolLM2-135M) this cut the forward's total compile time 2.6x and the per-example
    differential's 1.5x, whose XLA backend compile stays about the same (bench/README.md).
    """
    c = parent.config
    n = len(layers)
    if not c.scan_layers or n < 2 or parent.is_initializing():
        for i, layer in enumerate(layers):
            x = layer(x, *block_args(i), layer_idx=i) if pass_index else layer(x, *block_args(i))
        return x
    params = parent.variables["params"]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(params[f"{name}_{i}"] for i in range(n)))
    # An unbound copy of block 0's definition (blocks differ only in their params and index).
    body_module = layers[0].clone(parent=None)
    return _scan(parent, name, body_module, stacked, jnp.arange(n, dtype=jnp.int32), x, block_args, pass_index)


STACKED = "_stacked"


def _scan(
    parent: nn.Module, name: str, body_module: nn.Module, stacked: Any, idx: jax.Array, x: jax.Array,
    block_args: Callable[[Any], tuple[Any, ...]], pass_index: bool,
) -> jax.Array:
    """The blocks as one `lax.scan` of `body_module` over their stacked params.

    In an apply that records 'intermediates' or 'perturbations', each block's collections travel
    through the scan with a leading [L] axis and are stored on the parent under ``{name}_stacked``
    (so HF-flattened keys read ``model.layers_stacked.…``): the intermediates a block sows come out
    stacked, and the perturbations are taken (or, in a pass that creates them, made) stacked, so
    their gradient is every block's δ in one [L, …] array. `unstack_recorded` turns such keys back
    into per-block ones."""
    key = f"{name}{STACKED}"
    sow = parent.is_mutable_collection("intermediates")
    pert = parent.variables.get("perturbations", {}).get(key)
    make_pert = pert is None and parent.is_mutable_collection("perturbations")
    mutable = [c for c, on in (("intermediates", sow), ("perturbations", make_pert)) if on]

    def body(h: jax.Array, xs: tuple[Any, jax.Array, Any]) -> tuple[jax.Array, Any]:
        p, i, pe = xs
        kw = {"layer_idx": i} if pass_index else {}
        variables = {"params": p} if pe is None else {"params": p, "perturbations": pe}
        if not mutable:
            return body_module.apply(variables, h, *block_args(i), **kw), {}
        return body_module.apply(variables, h, *block_args(i), **kw, mutable=mutable)

    x, state = jax.lax.scan(body, x, (stacked, idx, pert))
    if sow and state.get("intermediates"):
        parent.put_variable("intermediates", key, state["intermediates"])
    if make_pert and state.get("perturbations"):
        parent.put_variable("perturbations", key, state["perturbations"])
    return x


def unstack_recorded(flat: dict[str, Any]) -> dict[str, Any]:
    """HF-flattened collections with ``{name}_stacked`` entries (a scanned apply's, `run_layers`)
    split into per-block keys: ``model.layers_stacked.mlp.x`` [L, …] → ``model.layers.{i}.mlp.x``."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        parts = k.split(".")
        hit = [j for j, p in enumerate(parts) if p.endswith(STACKED)]
        if not hit:
            out[k] = v
            continue
        j = hit[0]
        base = parts[j][: -len(STACKED)]
        n = jax.tree.leaves(v)[0].shape[0]
        for i in range(n):
            out[".".join(parts[:j] + [base, str(i)] + parts[j + 1:])] = jax.tree.map(lambda a: a[i], v)
    return out


class CausalLM(nn.Module):
    """A family's backbone plus its output head: tied to the input embedding (the backbone's
    `head`) or a bias-free Linear named like the checkpoint's head. Returns float32 logits [B, T, V]
    for right-padded `input_ids` and `attention_mask` [B, T]."""

    config: ModelConfig
    backbone: ClassVar[type[nn.Module]]
    backbone_name: ClassVar[str]
    head_name: ClassVar[str] = "lm_head"

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        model = self.backbone(c, name=self.backbone_name)
        h = model(input_ids, attention_mask)
        if c.tie_word_embeddings:
            logits = model.head(h)
        else:
            logits = Linear(c.vocab_size, use_bias=False, name=self.head_name)(h)
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcapping:  # Gemma: c·tanh(logits/c)
            cap = c.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return logits
