"""Where XLA and torch differ inside a GPT-2-small step: one component at a time, same shapes, same process.

    python -m bench run --suite=kernels                 # B = 16 rows (8 pairs), T = 128
    python -m bench run --suite=kernels -- --T 16

Each component is timed forward + backward to its input, as the factored sketch needs it (no weight
gradients), in JAX (lmgrad's own functions where they exist) and in torch (`torch.set_num_threads` at
the usable cores), medians of `--reps` calls after a warm-up:

* attention: `lmgrad.models.layers.attention` with `causal_mask` vs `F.scaled_dot_product_attention`;
* bmm: the batched [T, D] @ [D, T] matmul of attention scores alone (B·H of them);
* mlp: 768 → 3072 → 768 with tanh-GELU (four matmuls: two forward, two to the input); mlp+wgrad: the
  same with the two weight gradients as well (a training step's MLP), written with `@` and with
  `lmgrad.models.layers.linear_map` (torch column: the same torch call);
* head: hidden @ Eᵀ over the 50,257-token vocabulary, log-softmax and the target gather
  (`lmgrad.scoring.token_logprobs`) vs torch's `log_softmax` + `gather`.

Appends to bench/results/kernels.jsonl.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import _common


def _median_ms(fn, reps: int, sync=None) -> float:
    fn()
    ts = []
    for _ in range(reps):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    return round(1000 * float(np.median(ts)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--B", type=int, default=16, help="rows (two per pair)")
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from lmgrad.models.layers import attention, causal_mask
    from lmgrad.scoring import token_logprobs

    import speed

    torch.set_num_threads(_common.usable_cores())
    dev = speed.torch_device()  # CUDA where torch sees a GPU; JAX takes its default device
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    B, T, H, D, V = args.B, args.T, 12, 64, 50257
    d = H * D
    rng = np.random.default_rng(0)
    arr = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    q, k, v, wo = arr(B, T, H, D), arr(B, T, H, D), arr(B, T, H, D), arr(B, T, d)
    x, W1, W2, E = arr(B, T, d), arr(d, 4 * d, scale=0.02), arr(4 * d, d, scale=0.02), arr(V, d, scale=0.02)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    w = rng.random((B, T)).astype(np.float32)
    J = lambda *a: [jnp.asarray(t) for t in a]  # noqa: E731
    Tt = lambda *a: [torch.tensor(t, device=dev, requires_grad=True) for t in a]  # noqa: E731
    tt = lambda t, **kw: torch.tensor(t, device=dev, **kw)  # noqa: E731
    results = {}

    # attention
    mask = causal_mask(jnp.ones((B, T), jnp.int32))
    # value_and_grad, and every operand an argument: XLA must run the forward too and can fold nothing.
    ja = jax.jit(jax.value_and_grad(lambda q, k, v, wo: jnp.sum(attention(q, k, v, mask, D ** -0.5) * wo),
                                    argnums=(0, 1, 2)))
    jq, jk, jv, jwo = J(q, k, v, wo)
    tq, tk, tv = Tt(*(t.transpose(0, 2, 1, 3).copy() for t in (q, k, v)))
    two = tt(wo.reshape(B, T, H, D).transpose(0, 2, 1, 3).copy())

    def t_attn():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        torch.autograd.grad((o * two).sum(), (tq, tk, tv))

    results["attention"] = (_median_ms(lambda: jax.block_until_ready(ja(jq, jk, jv, jwo)), args.reps),
                            _median_ms(t_attn, args.reps, sync), 6 * 2 * B * H * T * T * D)
    # batched score matmul alone
    a, b = arr(B * H, T, D), arr(B * H, D, T)
    jmm = jax.jit(lambda a, b: a @ b)
    ja_, jb_ = J(a, b)
    ta_, tb_ = tt(a), tt(b)
    results["bmm"] = (_median_ms(lambda: jax.block_until_ready(jmm(ja_, jb_)), args.reps),
                      _median_ms(lambda: torch.bmm(ta_, tb_), args.reps, sync), 2 * B * H * T * T * D)
    # mlp
    jx, jW1, jW2, jE = J(x, W1, W2, E)
    jm = jax.jit(jax.value_and_grad(lambda x, W1, W2, c: jnp.sum(jax.nn.gelu(x @ W1, approximate=True) @ W2 * c)))
    (tx,) = Tt(x)
    tW1, tW2, tE = (tt(t) for t in (W1, W2, E))
    tx_const = tt(x + 1)

    def t_mlp():
        y = torch.nn.functional.gelu(tx @ tW1, approximate="tanh") @ tW2
        torch.autograd.grad((y * tx_const).sum(), tx)

    jc = jx + 1
    results["mlp"] = (_median_ms(lambda: jax.block_until_ready(jm(jx, jW1, jW2, jc)), args.reps),
                      _median_ms(t_mlp, args.reps, sync), 4 * 2 * B * T * d * 4 * d)
    # the same MLP with its weight gradients too (what a training step, or FTGD tuning, runs)
    jmw = jax.jit(jax.value_and_grad(lambda x, W1, W2, c: jnp.sum(jax.nn.gelu(x @ W1, approximate=True) @ W2 * c),
                                     argnums=(0, 1, 2)))
    tW1g, tW2g = Tt(W1, W2)

    def t_mlpw():
        y = torch.nn.functional.gelu(tx @ tW1g, approximate="tanh") @ tW2g
        torch.autograd.grad((y * tx_const).sum(), (tx, tW1g, tW2g))

    results["mlp+wgrad"] = (_median_ms(lambda: jax.block_until_ready(jmw(jx, jW1, jW2, jc)), args.reps),
                            _median_ms(t_mlpw, args.reps, sync), 6 * 2 * B * T * d * 4 * d)
    # ... and through lmgrad's own linear map (its custom weight-gradient product)
    from lmgrad.models.layers import linear_map

    jml = jax.jit(jax.value_and_grad(
        lambda x, W1, W2, c: jnp.sum(linear_map(jax.nn.gelu(linear_map(x, W1, False), approximate=True), W2, False) * c),
        argnums=(0, 1, 2)))
    results["mlp+wgrad lmgrad"] = (_median_ms(lambda: jax.block_until_ready(jml(jx, jW1, jW2, jc)), args.reps),
                                   results["mlp+wgrad"][1], results["mlp+wgrad"][2])
    # head + log-softmax + gather
    jids, jw = J(ids, w)
    jh = jax.jit(jax.value_and_grad(lambda x, E, ids, w: -jnp.sum(token_logprobs(x @ E.T, ids) * w)))
    tids, tw = tt(ids, dtype=torch.int64), tt(w)

    def t_head():
        lp = torch.log_softmax((tx @ tE.T)[:, :-1], dim=-1).gather(-1, tids[:, 1:, None])[..., 0]
        torch.autograd.grad(-(lp * tw[:, 1:]).sum(), tx)

    results["head"] = (_median_ms(lambda: jax.block_until_ready(jh(jx, jE, jids, jw)), args.reps), _median_ms(t_head, args.reps, sync),
                       2 * 2 * B * T * d * V)  # the head's forward and input-gradient matmuls
    rows = []
    print(f"B = {B}, T = {T}: forward + backward to the input, ms (median of {args.reps})")
    print(f"{'component':17s} {'jax':>9s} {'torch':>9s} {'torch/jax':>9s} {'jax GFLOP/s':>12s} {'torch GFLOP/s':>14s}")
    for name, (j, t, flops) in results.items():
        rows.append(_common.run_meta(bench="kernels", component=name, B=B, T=T, jax_ms=j, torch_ms=t,
                                     torch_over_jax=round(t / j, 3), flops=flops,
                                     jax_gflops=round(flops / j / 1e6, 1), torch_gflops=round(flops / t / 1e6, 1),
                                     torch=torch.__version__, torch_device=str(dev), jax=jax.__version__))
        print(f"{name:17s} {j:9.2f} {t:9.2f} {t / j:9.2f} {flops / j / 1e6:12.1f} {flops / t / 1e6:14.1f}")
    _common.append_jsonl(_common.results_path("kernels"), rows)


if __name__ == "__main__":
    main()
