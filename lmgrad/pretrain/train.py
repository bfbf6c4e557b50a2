"""The training step, the optimiser and the checkpoint schedule (pure functions, no I/O).

* Loss: mean next-token cross-entropy over every position of a packed window (no padding).
* Optimiser: optax AdamW (β = 0.9, 0.95) on a linear warmup + cosine decay to
  `min_lr_ratio · lr`, global-norm clipping; weight decay skips vectors (norms, biases).
* Compute dtype: float32, or bfloat16 with float32 master weights (params are cast inside the loss).
* Checkpoint steps: 0 (the initialisation), the powers of two below `steps`, every multiple of
  `every` (if > 0), and `steps` itself (as Pythia's series, which adds every 1,000 steps).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def schedule(lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> optax.Schedule:
    warmup = min(warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=max(steps, warmup + 1), end_value=lr * min_lr_ratio)


def optimizer(lr: float, warmup_steps: int, steps: int, *, min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
              b1: float = 0.9, b2: float = 0.95, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay; decay only on matrices (ndim ≥ 2)."""
    sched = schedule(lr, warmup_steps, steps, min_lr_ratio)
    # Update i (0-based) takes sched(i + 1): the first update is not a zero-learning-rate no-op,
    # and the rate logged for checkpoint step s is sched(s), the one that produced it.
    adamw = optax.adamw(lambda count: sched(count + 1), b1=b1, b2=b2, weight_decay=weight_decay,
                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw


def token_nll(apply_fn: Callable[..., jax.Array], params: Any, windows: jax.Array,
              compute_dtype: Any = jnp.float32) -> jax.Array:
    """Per-token negative log-likelihood [B, T] of windows [B, T + 1] (inputs [:-1], targets [1:])."""
    if compute_dtype != jnp.float32:
        params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = apply_fn({"params": params}, inputs, jnp.ones_like(inputs)).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def make_train_step(apply_fn: Callable[..., jax.Array], tx: optax.GradientTransformation,
                    compute_dtype: Any = jnp.float32) -> Callable[..., Any]:
    """jit (params, opt_state, windows) → (params, opt_state, loss, grad_norm). No buffer donation:
    an asynchronous checkpoint may still be reading the previous step's arrays."""

    def loss_fn(params: Any, windows: jax.Array) -> jax.Array:
        return token_nll(apply_fn, params, windows, compute_dtype).mean()

    def step(params: Any, opt_state: Any, windows: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    return jax.jit(step)


def make_eval_fn(apply_fn: Callable[..., jax.Array], compute_dtype: Any = jnp.float32) -> Callable[..., jax.Array]:
    """jit (params, windows) → summed NLL over the batch's tokens (float32)."""
    return jax.jit(lambda params, windows: token_nll(apply_fn, params, windows, compute_dtype).sum())


def checkpoint_steps(steps: int, every: int = 0) -> list[int]:
    """0, the powers of two below `steps`, the multiples of `every` (if > 0), and `steps`."""
    out = {0, steps}
    p = 1
    while p < steps:
        out.add(p)
        p *= 2
    if every > 0:
        out.update(range(every, steps, every))
    return sorted(out)


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
