"""The sketch-speed suites of ``python -m bench``: lmgrad's factored path against its baselines and
PyTorch peers in one process, scaling curves, and the factored path's own variants.

Suites (``python -m bench run --suite=NAME``):

* ``speed``: GPT-2 shapes (random init in transformers; lmgrad gets the same weights through
  `convert_state_dict`), the same [B] pairs for every method, timed passes interleaved method by
  method, median of ``--reps``:
  - ``matmul``: an n³ float32 matmul (achievable FLOP/s on this device);
  - ``plain``: `jax.grad` of Σ_b [ℓ(good_b) − ℓ(bad_b)] w.r.t. all parameters (one training step's gradient);
  - ``factored``: `make_factored_sketch_fn` (lmgrad's default ranks; weight matrices only, so the peers
    compute the same sketch);
  - ``torch_hooks``: `peers.TorchHookSketch` (LoGra/bergson-style hooks) on lmgrad's projection matrices;
  - ``torch_vmap``: `peers.TorchVmapSketch` (`torch.func` vmap(grad) + the same projection);
  - ``torch_plain``: the transformers model's batched forward+backward (all parameter gradients).
  FLOPs are counted per method from the shapes (`count_flops`), XLA's own count is recorded beside;
  the hook peer's sketch is compared with lmgrad's (max relative difference) on every shape.
* ``scaling``: pairs/s and memory of the factored path against batch size, sequence length, width
  (GPT-2 small → XL widths, at 2 blocks by default: ``gpt2-xl@L2``), depth (2 → 12 blocks at d = 768) and
  rank, beside lmgrad's exact per-example path (``exact``: jit(vmap(grad)) of every parameter, one chunk)
  in the batch, width and depth sweeps; one fresh process per point (peak RSS is that point's); XLA's
  buffer plan (temporaries + outputs) per point, and per pair; points whose plan exceeds
  ``--run_max_gib`` are compiled only (``compile_only``: memory analysis, no timing); plotted into
  ``bench/results/scaling_*.png`` (``python -m bench report --since DATE`` redraws from the records).
* ``fusion``: the factored path's implementation variants (``FactoredSketchFn(fuse=...)``) on the
  same batch, interleaved: ratios of each change to the previous.

Memory: on CPU, ``peak_rss_gib`` is the process's resident high-water mark where a point runs alone
(scaling) and ``peak_extra_gib`` the sampled RSS rise above the pre-call level during a call (speed:
several methods share a process); on accelerators, the device's peak bytes in use. ``xla_temp_gib`` is
XLA's own buffer plan for the compiled program.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from _common import append_jsonl, loadavg, results_path, run_meta, usable_cores

GPT2_SHAPES = {  # name → (n_embd, n_layer, n_head): the GPT-2 family, random init
    "gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25),
    "gpt2-tiny": (128, 2, 2),
}
# Dense float32 peak FLOP/s for MFU where the device kind is known (no sparsity; TF32 not assumed).
PEAK_FLOPS = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L4": 30.3e12, "A10G": 31.2e12, "V100": 15.7e12,
              "T4": 8.1e12}
PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


# ---------------------------------------------------------------------------------- models
def shape_dims(shape: str) -> tuple[int, int, int]:
    """(n_embd, n_layer, n_head) of a shape name: a `GPT2_SHAPES` key, optionally at another depth
    (``gpt2-large@L2``: GPT-2 large's width and heads, 2 blocks)."""
    name, _, depth = shape.partition("@L")
    d, n_layer, n_head = GPT2_SHAPES[name]
    return d, int(depth) if depth else n_layer, n_head


def hf_config(shape: str, seq: int):
    import transformers

    d, n_layer, n_head = shape_dims(shape)
    return transformers.GPT2Config(n_embd=d, n_layer=n_layer, n_head=n_head, n_positions=max(1024, seq))


def torch_model(shape: str, seq: int, seed: int = 0):
    """A random-init transformers GPT-2 of `shape` (float32, eval)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_config(shape, seq)).float().eval()


def torch_device():
    """CUDA where torch sees a GPU (the peers then run there), else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lmgrad_model(shape: str, seq: int, tmodel=None):
    """(config, Flax module, params): the torch model's weights when given, else the Flax module's own init."""
    import jax
    import jax.numpy as jnp

    from lmgrad.models import build_module, convert_state_dict, from_hf_config

    config = from_hf_config(hf_config(shape, seq))
    module = build_module(config)
    if tmodel is not None:
        sd = {k: v.detach().cpu().numpy() for k, v in tmodel.state_dict().items()}
        params = convert_state_dict(sd, config, source=f"random {shape}")
    else:
        ids = jnp.zeros((1, 8), jnp.int32)
        params = jax.jit(module.init)(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    return config, module, params


def make_pairs(vocab: int, batch: int, seq: int, seed: int = 1) -> tuple[dict, dict]:
    """Random full-length good/bad batches (numpy; column 0 unscored)."""
    rng = np.random.default_rng(seed)

    def one():
        tm = np.ones((batch, seq), np.float32)
        tm[:, 0] = 0
        return {"input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int32),
                "attention_mask": np.ones((batch, seq), np.int32), "target_mask": tm, "valid": np.ones(batch, bool)}

    return one(), one()


def default_spec(r: int | None = None, vectors: str = "exclude"):
    """lmgrad's default factored ranks (or uniform r), weight matrices only unless `vectors` says."""
    from lmgrad.grads.factored import FactoredSpec

    if r is None:
        return FactoredSpec(seed=0, handle_vectors=vectors)
    return FactoredSpec(seed=0, r_in=r, r_out=r, overrides=(), handle_vectors=vectors)


# ----------------------------------------------------------------------------------- FLOPs
def count_flops(fn, config, batch: int, seq: int) -> dict[str, float]:
    """FLOPs per call for each method, counted from the shapes (multiply-add = 2).

    fwd = Σ_linear 2·N·in·out + head 2·N·d·V + attention 4·N·T·d per layer (N = 2B·T tokens, full
    T×T scores). plain = 3·fwd (forward, input and weight gradients). factored = 2·fwd (forward, input
    gradients) + projections Σ_module 2·N·(in·r_in + out·r_out + r_in·r_out). torch_vmap = 3·fwd + per
    pair Σ 2·(out·in·r_in + r_out·out·r_in) (G P_inᵀ, then P_out).
    """
    from lmgrad.grads.factored import _io_dims

    n_tok = 2 * batch * seq
    d, n_layer, vocab = config.hidden_size, config.num_layers, config.vocab_size
    fwd = 4 * n_tok * seq * d * n_layer
    proj = vmap_proj = 0.0
    for m in fn.modules.values():
        n_in, n_out = _io_dims(m)
        if m.kind in ("linear", "conv1d"):
            fwd += 2 * n_tok * n_in * n_out
        if m.kind == "embedding" and m.tied_head:
            fwd += 2 * n_tok * n_in * n_out
    for e in fn.block_layout:
        if e["role"] != "weight" or e["kind"] in ("layernorm", "rmsnorm"):
            continue
        m = fn.modules[e["module"]]
        n_in, n_out = _io_dims(m)
        r_out, r_in = e["shape"]
        uses = 2 if (m.kind == "embedding" and m.tied_head) else 1
        if m.kind == "embedding":  # lookup: P_out one-hot is a gather; δ (dim) projected by P_in
            proj += 2 * n_tok * (n_in * r_in + r_in * r_out)
            if m.tied_head:
                proj += 2 * n_tok * (n_in * r_in + n_out * r_out + r_in * r_out)
        else:
            proj += 2 * n_tok * (n_in * r_in + n_out * r_out + r_in * r_out)
        vmap_proj += batch * 2 * (n_out * n_in * r_in + r_out * n_out * r_in) * (1 if uses else 1)
    return {"plain": 3 * fwd, "factored": 2 * fwd + proj, "torch_hooks": 2 * fwd + proj,
            "torch_vmap": 3 * fwd + vmap_proj, "torch_plain": 3 * fwd, "exact": 3 * fwd, "fwd": fwd}


# ------------------------------------------------------------------------------- measuring
class RssSampler:
    """Peak resident-set rise above the level at `start`, sampled every `every` s in a thread."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self.base = every, 0, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first accelerator (None on CPU)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"]) if ca and ca.get("flops") is not None else None
    except Exception:  # best effort across backends
        return None


def xla_temp_bytes(compiled) -> int | None:
    try:
        ma = compiled.memory_analysis()
        return int(ma.temp_size_in_bytes + ma.output_size_in_bytes)
    except Exception:
        return None


def xla_memory(compiled) -> dict[str, float | None]:
    """XLA's buffer plan for a compiled program, GiB: temporaries, outputs, arguments (the parameters)."""
    try:
        ma = compiled.memory_analysis()
        return {"xla_only_temp_gib": ma.temp_size_in_bytes / 2**30, "xla_output_gib": ma.output_size_in_bytes / 2**30,
                "xla_argument_gib": ma.argument_size_in_bytes / 2**30}
    except Exception:
        return {"xla_only_temp_gib": None, "xla_output_gib": None, "xla_argument_gib": None}


def mfu(flops_per_s: float | None, device_kind: str, bf16: bool = False) -> float | None:
    table = PEAK_FLOPS_BF16 if bf16 else PEAK_FLOPS
    for key, peak in table.items():
        if flops_per_s is not None and key.lower() in device_kind.lower():
            return flops_per_s / peak
    return None


# ------------------------------------------------------------------------------ the methods
def jax_methods(module, params, fn, good, bad, batch: int,
                which: tuple[str, ...] = ("plain", "factored")) -> dict[str, tuple[Callable, dict]]:
    """name → (call, info) for the JAX methods; call() blocks until done; info has compile_s etc."""
    import jax
    import jax.numpy as jnp

    from lmgrad.scoring import sequence_logprob

    g = {k: jnp.asarray(v) for k, v in good.items()}
    b = {k: jnp.asarray(v) for k, v in bad.items()}

    def step(p, g, b):
        cat = {k: jnp.concatenate([g[k], b[k]]) for k in ("input_ids", "attention_mask", "target_mask")}
        sign = jnp.concatenate([jnp.ones(batch), -jnp.ones(batch)])

        def loss(q):
            logits = module.apply({"params": q}, cat["input_ids"], cat["attention_mask"])
            return jnp.sum(sign * -sequence_logprob(logits, cat["input_ids"], cat["target_mask"]))

        return jax.grad(loss)(p)

    out = {}
    todo = [(n, jitted, args) for n, jitted, args in (("plain", jax.jit(step), (params, g, b)),
                                                     ("factored", fn._jit, (params, g, b, fn.factors())))
            if n in which]
    if "exact" in which:  # lmgrad's exact per-example path: jit(vmap(grad)) of every parameter, one chunk
        from lmgrad.grads.differential import per_example_core
        from lmgrad.params import flatten, split

        def apply_fn(p, input_ids, attention_mask):
            return module.apply({"params": p}, input_ids, attention_mask)

        trainable, frozen = split(params, sorted(flatten(params)))
        todo.append(("exact", jax.jit(per_example_core(apply_fn, None)), (trainable, frozen, g, b)))
    for name, jitted, args in todo:
        t = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        info = {"compile_s": time.perf_counter() - t, "xla_flops": xla_flops(compiled),
                "xla_temp_gib": (xla_temp_bytes(compiled) or 0) / 2**30, **xla_memory(compiled)}
        out[name] = ((lambda c=compiled, a=args: jax.block_until_ready(c(*a))), info)
    return out


def matmul_method(n: int) -> tuple[Callable, dict, float]:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    t = time.perf_counter()
    compiled = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
    return (lambda: jax.block_until_ready(compiled(a, a))), {"compile_s": time.perf_counter() - t}, 2.0 * n**3


def torch_methods(tmodel, fn, good, bad, which: list[str], vmap_chunk: int) -> dict[str, tuple[Callable, dict]]:
    import torch

    from peers import TorchHookSketch, TorchVmapSketch, _batch, _nll, _positions

    out = {}
    if "torch_hooks" in which:
        hook = TorchHookSketch(tmodel, fn.factors(), fn.layout)
        out["torch_hooks"] = ((lambda: hook(good, bad)), {"compile_s": 0.0, "peer": hook})
    if "torch_vmap" in which:
        vm = TorchVmapSketch(tmodel, fn.factors(), fn.layout, chunk=vmap_chunk)
        out["torch_vmap"] = ((lambda: vm(good, bad)), {"compile_s": 0.0, "vmap_chunk": vmap_chunk})
    if "torch_plain" in which:
        ids, am, tm, sign = _batch(good, bad, next(tmodel.parameters()).device)

        def plain():
            for p in tmodel.parameters():
                p.requires_grad_(True)
                p.grad = None
            logits = tmodel(input_ids=ids, attention_mask=am, position_ids=_positions(ids)).logits
            (sign * _nll(logits, ids, tm)).sum().backward()
            if ids.is_cuda:
                torch.cuda.synchronize()
            for p in tmodel.parameters():
                p.requires_grad_(False)
                p.grad = None

        out["torch_plain"] = (plain, {"compile_s": 0.0})
    return out


def time_interleaved(methods: dict[str, tuple[Callable, dict]], reps: int) -> dict[str, dict]:
    """One warm-up call each, then `reps` rounds calling every method once per round (interleaved, so
    load swings hit all alike). Returns per method: secs list, median, peak memory rise."""
    res = {name: {"secs": [], "peak_extra_gib": 0.0} for name in methods}
    for name, (call, info) in list(methods.items()):
        try:
            with RssSampler() as s:
                call()
        except Exception as e:  # out of memory, typically: that method is reported failed, the rest go on
            info["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  {name}: failed ({info['error'][:200]})", flush=True)
            methods = {k: v for k, v in methods.items() if k != name}
            del res[name]
            continue
        res[name]["peak_extra_gib"] = s.extra / 2**30
    for _ in range(reps):
        for name, (call, _) in methods.items():
            with RssSampler() as s:
                t = time.perf_counter()
                call()
                res[name]["secs"].append(time.perf_counter() - t)
            res[name]["peak_extra_gib"] = max(res[name]["peak_extra_gib"], s.extra / 2**30)
    for r in res.values():
        r["sec_per_call"] = float(np.median(r["secs"]))
    return res


# -------------------------------------------------------------------------------- suite: speed
def speed(args) -> list[dict]:
    """Factored vs plain step, matmul and the PyTorch peers, per (shape, T, B), in one process."""
    import jax
    import torch

    torch.set_num_threads(usable_cores())
    meta = run_meta(suite="speed", torch=torch.__version__, torch_threads=torch.get_num_threads())
    rows: list[dict] = []
    mm_call, mm_info, mm_flops = matmul_method(args.matmul_n)
    for shape in args.shapes:
        for seq in args.seqs:
            for batch in args.batches:
                tmodel = torch_model(shape, seq)
                config, module, params = lmgrad_model(shape, seq, tmodel)
                tmodel = tmodel.to(torch_device())
                from lmgrad.grads.factored import make_factored_sketch_fn

                fn = make_factored_sketch_fn(module, default_spec(args.r), params=params)
                good, bad = make_pairs(config.vocab_size, batch, seq)
                methods = {"matmul": (mm_call, dict(mm_info))}
                methods.update(jax_methods(module, params, fn, good, bad, batch))
                methods.update(torch_methods(tmodel, fn, good, bad, args.peers, args.vmap_chunk))
                # Same computation: the hook peer's sketch against lmgrad's on these weights and pairs.
                agree = None
                if "torch_hooks" in methods:
                    ours = np.asarray(fn(params, good, bad)[0], np.float64)
                    theirs = methods["torch_hooks"][1]["peer"](good, bad)
                    agree = float(np.abs(theirs - ours).max() / np.abs(ours).max())
                load0 = loadavg()
                timed = time_interleaved(methods, args.reps)
                for name in set(methods) - set(timed):
                    rows.append({**meta, "model": f"{shape}(random)", "seq": seq, "batch_pairs": batch, "method": name,
                                 "error": methods[name][1]["error"]})
                flops = count_flops(fn, config, batch, seq)
                flops["matmul"] = mm_flops
                base = {**meta, "loadavg": load0, "loadavg_after": loadavg(), "model": f"{shape}(random)",
                        "shape": {"d": config.hidden_size, "layers": config.num_layers, "vocab": config.vocab_size,
                                  "params": int(sum(p.numel() for p in tmodel.parameters()))},
                        "seq": seq, "batch_pairs": batch, "k": fn.dim, "spec": fn.spec.spec}
                mm_rate = mm_flops / timed["matmul"]["sec_per_call"]
                agree = agree if "torch_hooks" in timed else None
                for name, t in timed.items():
                    sec = t["sec_per_call"]
                    info = {k: v for k, v in methods[name][1].items() if k != "peer"}
                    row = {**base, "method": name, "sec_per_call": sec, "secs": t["secs"],
                           "pairs_per_s": None if name == "matmul" else batch / sec,
                           "tokens_per_s": None if name == "matmul" else 2 * batch * seq / sec,
                           "flops_per_call": flops.get(name), "flops_per_s": flops.get(name) and flops[name] / sec,
                           "peak_extra_gib": t["peak_extra_gib"], "device_peak_gib": (device_peak_bytes() or 0) / 2**30,
                           **info}
                    row["frac_of_matmul"] = row["flops_per_s"] and row["flops_per_s"] / mm_rate
                    row["mfu"] = mfu(row["flops_per_s"], meta["device"])
                    for ref in ("plain", "torch_hooks", "torch_vmap", "torch_plain"):
                        if ref in timed and name != "matmul":
                            row[f"x_{ref}"] = timed[ref]["sec_per_call"] / sec
                    if name == "torch_hooks":
                        row["max_rel_diff_vs_lmgrad"] = agree
                    rows.append(row)
                print_speed([r for r in rows if r["seq"] == seq and r["batch_pairs"] == batch
                             and r["model"] == base["model"] and "error" not in r])
                del tmodel, params, methods
                jax.clear_caches()
    return rows


def _fmt(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def speed_table(rows: list[dict]) -> str:
    """Markdown table of speed rows."""
    head = ("| model | T | B | method | s/call | pairs/s | tokens/s | GFLOP/call | GFLOP/s | of matmul | "
            "× plain | × torch hooks | × torch vmap | peak Δ GiB | compile s | load |")
    lines = [head, "|" + "---|" * 3 + "---|" + "---:|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['seq']} | {r['batch_pairs']} | {r['method']} | failed: "
                         f"{r['error'][:60]} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['model']} | {r['seq']} | {r['batch_pairs']} | {r['method']} | {r['sec_per_call']:.3f} | "
            f"{_fmt(r['pairs_per_s'], '.2f')} | {_fmt(r['tokens_per_s'], '.0f')} | "
            f"{_fmt(r['flops_per_call'] and r['flops_per_call'] / 1e9, '.1f')} | "
            f"{_fmt(r['flops_per_s'] and r['flops_per_s'] / 1e9, '.1f')} | {_fmt(r.get('frac_of_matmul'), '.0%')} | "
            f"{_fmt(r.get('x_plain'), '.2f')} | {_fmt(r.get('x_torch_hooks'), '.2f')} | {_fmt(r.get('x_torch_vmap'), '.2f')} | "
            f"{r['peak_extra_gib']:.2f} | {_fmt(r.get('compile_s'), '.1f')} | {_fmt(r.get('loadavg'), '.1f')} |")
    return "\n".join(lines)


def print_speed(rows: list[dict]) -> None:
    print(speed_table(rows), flush=True)
    for r in rows:
        if r.get("max_rel_diff_vs_lmgrad") is not None:
            print(f"  torch_hooks sketch vs lmgrad: max |Δ| / max |S| = {r['max_rel_diff_vs_lmgrad']:.1e}")


# ------------------------------------------------------------------------------ suite: scaling
def scaling_point(method: str, shape: str, batch: int, seq: int, r: int | None, reps: int,
                  run_max_gib: float | None = None) -> dict:
    """One point in a fresh process (its peak RSS is this point's): compile, time, report.

    `method`: ``factored``, ``plain`` or ``exact`` (lmgrad's per-example jit(vmap(grad)) of every
    parameter, unchunked). Where XLA's plan (temporaries + outputs) exceeds `run_max_gib`, the point is
    compiled only (``compile_only``: memory analysis, no timing)."""
    import jax

    from lmgrad.grads.factored import make_factored_sketch_fn

    config, module, params = lmgrad_model(shape, seq)
    fn = make_factored_sketch_fn(module, default_spec(r), params=params)
    good, bad = make_pairs(config.vocab_size, batch, seq)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    call, info = jax_methods(module, params, fn, good, bad, batch, which=(method,))[method]
    flops = count_flops(fn, config, batch, seq)[method]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    row = {"method": method, "model": f"{shape}(random)", "batch_pairs": batch, "seq": seq, "r": r, "k": fn.dim,
           "shape": {"d": config.hidden_size, "layers": config.num_layers, "params": n_params},
           "flops_per_call": flops, "rss_before_call_gib": rss0, **info,
           "xla_temp_per_pair_mib": info["xla_temp_gib"] * 1024 / batch}
    if run_max_gib is not None and info["xla_temp_gib"] > run_max_gib:
        row.update(compile_only=True, sec_per_call=None, secs=[], pairs_per_s=None, tokens_per_s=None,
                   flops_per_s=None)
    else:
        call()
        secs = []
        for _ in range(reps):
            t = time.perf_counter()
            call()
            secs.append(time.perf_counter() - t)
        sec = float(np.median(secs))
        row.update(compile_only=False, sec_per_call=sec, secs=secs, pairs_per_s=batch / sec,
                   tokens_per_s=2 * batch * seq / sec, flops_per_s=flops / sec)
    row.update(peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               device_peak_gib=(device_peak_bytes() or 0) / 2**30)
    return row


def scaling_points(args) -> list[tuple[str, str, str, int, int, int | None]]:
    """(sweep, method, shape, B, T, r) for every point of the scaling suite.

    The batch, seq, width and r sweeps run the GPT-2 shapes at `--scaling_layers` blocks (0: the
    shape's own depth; the shape name then carries ``@L<n>``); the depth sweep varies the blocks at
    GPT-2 small's width. B, T of the width and depth sweeps: `--width_batch`, T = 16."""
    def at(shape: str) -> str:
        return f"{shape}@L{args.scaling_layers}" if args.scaling_layers else shape

    small = at("gpt2-small")
    pts = []
    for b in args.sweep_batches:
        pts.append(("batch", "factored", small, b, 16, None))
    for b in args.sweep_batches_exact:
        pts.append(("batch", "exact", small, b, 16, None))
    for b in args.sweep_batches_medium:
        pts.append(("batch", "factored", at("gpt2-medium"), b, 16, None))
    for b in args.sweep_batches_plain:
        pts.append(("batch", "plain", small, b, 16, None))
    for s in args.sweep_shapes:
        pts.append(("width", "factored", at(s), args.width_batch, 16, None))
    for s in args.sweep_shapes_exact:
        pts.append(("width", "exact", at(s), args.width_batch, 16, None))
    for n in args.sweep_depths:
        pts.append(("depth", "factored", f"gpt2-small@L{n}", args.width_batch, 16, None))
    for n in args.sweep_depths_exact:
        pts.append(("depth", "exact", f"gpt2-small@L{n}", args.width_batch, 16, None))
    for t in args.sweep_seqs:
        pts.append(("seq", "factored", small, args.seq_batch, t, None))
    for r in args.sweep_rs:
        pts.append(("r", "factored", small, args.width_batch, 16, r))
    return pts


def scaling(args) -> list[dict]:
    meta = run_meta(suite="scaling")
    rows, done = [], {}
    for sweep, method, shape, b, t, r in scaling_points(args):
        key = (method, shape, b, t, r)
        if key in done and "error" not in done[key]:  # the same point in another sweep: measured once
            row = {**done[key], "sweep": sweep, "same_point_as_sweep": done[key]["sweep"]}
        else:
            cmd = [sys.executable, "-m", "bench", "_point",
                   json.dumps([method, shape, b, t, r, args.reps, args.run_max_gib])]
            load0 = loadavg()
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                err = out.stderr[-1500:] if out.returncode != 0 else None
            except subprocess.TimeoutExpired:
                err = f"timed out after {args.point_timeout} s"
            if err is not None:
                row = {**meta, "loadavg": load0, "sweep": sweep, "method": method, "model": shape, "batch_pairs": b,
                       "seq": t, "r": r, "error": err}
                print(f"{sweep:6s} {method:9s} {shape:15s} B={b:3d} T={t:4d} r={r}: ERROR {err[-300:]}", flush=True)
            else:
                row = {**meta, "loadavg": load0, "loadavg_after": loadavg(), "sweep": sweep,
                       **json.loads(out.stdout.strip().splitlines()[-1])}
            done[key] = row
        if "error" not in row:
            print(f"{sweep:6s} {method:9s} {shape:15s} B={b:3d} T={t:4d} r={r}: "
                  f"{_fmt(row['pairs_per_s'], '8.2f')} pairs/s  XLA temp {row['xla_temp_gib']:.3f} GiB "
                  f"({row['xla_temp_per_pair_mib']:.1f} MiB/pair)  peak RSS {row['peak_rss_gib']:.2f} GiB "
                  f"(before call {row['rss_before_call_gib']:.2f})  compile {row['compile_s']:.0f} s  "
                  f"load {row['loadavg']}{'  compile only' if row.get('compile_only') else ''}", flush=True)
        rows.append(row)
        if not args.no_write:  # one line per point as it finishes: a long sweep cut short keeps its points
            append_jsonl(results_path("scaling"), [row])
    return rows


def plot_scaling(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per sweep: pairs/s, XLA's temporaries + outputs per pair, and whole-process peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in rows if "error" not in r]
    xkey = {"batch": "batch_pairs", "seq": "seq", "r": "r"}
    for sweep in ("batch", "seq", "width", "depth", "r"):
        sel = [r for r in ok if r.get("sweep") == sweep]
        if not sel:
            continue
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.8))
        groups: dict[str, list[dict]] = {}
        for r in sel:
            if sweep == "width":
                label = (f"{r['method']}, {r['shape']['layers']} blocks" if "@L" in r["model"]
                         else f"{r['method']}, GPT-2's own depth")
            elif sweep == "depth":
                label = r["method"]
            else:
                label = f"{r['method']} {r['model']}"
            groups.setdefault(label, []).append(r)
        for i, (label, rs) in enumerate(groups.items()):
            c = f"C{i}"
            xs = [r["shape"]["params"] / 1e6 if sweep in ("width", "depth") else r[xkey[sweep]] for r in rs]
            run = [(x, r) for x, r in zip(xs, rs) if r.get("pairs_per_s") is not None]
            if run:
                a1.plot([x for x, _ in run], [r["pairs_per_s"] for _, r in run], "o-", color=c, label=label)
            a2.plot(xs, [r["xla_temp_per_pair_mib"] for r in rs], "o-", color=c, label=label)
            co = [(x, r) for x, r in zip(xs, rs) if r.get("compile_only")]
            if co:
                a2.plot([x for x, _ in co], [r["xla_temp_per_pair_mib"] for _, r in co], "s", mfc="none", ms=10,
                        color=c, label=f"{label}: compile only")
            if run:
                a3.plot([x for x, _ in run], [r["peak_rss_gib"] for _, r in run], "o-", color=c, label=f"{label} peak")
                a3.plot([x for x, _ in run], [r["rss_before_call_gib"] for _, r in run], "x--", color=c,
                        label=f"{label} before the call")
        r0 = sel[0]
        fixed = {"batch": f"T={r0['seq']}, {r0['model']}", "seq": f"B={r0['batch_pairs']}, {r0['model']}",
                 "width": f"B={r0['batch_pairs']} T={r0['seq']}, GPT-2 small/medium/large/XL widths",
                 "depth": f"B={r0['batch_pairs']} T={r0['seq']}, GPT-2 small width (d=768) at 2..12 blocks",
                 "r": f"B={r0['batch_pairs']} T={r0['seq']}, {r0['model']}"}[sweep]
        xlabel = {"batch": "pairs per call (B)", "seq": "tokens per sentence (T)",
                  "width": "parameters (M); d = 768 / 1024 / 1280 / 1600",
                  "depth": "parameters (M)", "r": "rank r (uniform r_in = r_out)"}[sweep]
        for a in (a1, a2, a3):
            a.set_xlabel(xlabel)
            a.set_xscale("log", base=2 if sweep in ("batch", "seq", "r") else 10)
            a.grid(alpha=0.3)
            a.legend(fontsize=6)
        a2.set_yscale("log")
        a1.set_ylabel("pairs/s")
        a2.set_ylabel("XLA temp + output per pair (MiB)")
        a3.set_ylabel("process peak RSS (GiB)")
        fig.suptitle(f"scaling: {sweep} ({fixed}); {r0['device']}, {r0.get('cores')} shared cores, "
                     f"load {min(r.get('loadavg') or 0 for r in sel):.1f}–{max(r.get('loadavg') or 0 for r in sel):.1f}",
                     fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"scaling_{sweep}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------- suite: fusion
def fusion(args) -> list[dict]:
    """The factored path's implementation variants on the same batch, interleaved; ratios to the first."""
    import jax
    import jax.numpy as jnp

    from lmgrad.grads.factored import FactoredSketchFn

    meta = run_meta(suite="fusion")
    rows = []
    for shape in args.shapes:
        for seq in args.seqs:
            batch = args.batches[0]
            config, module, params = lmgrad_model(shape, seq)
            good, bad = make_pairs(config.vocab_size, batch, seq)
            g = {k: jnp.asarray(v) for k, v in good.items()}
            b = {k: jnp.asarray(v) for k, v in bad.items()}
            methods, outs = {}, {}
            for variant in args.variants:
                fn = FactoredSketchFn(module, params, default_spec(args.r, vectors=args.vectors), fuse=variant)
                a = (params, g, b, fn.factors())
                t = time.perf_counter()
                compiled = fn._jit.lower(*a).compile()
                info = {"compile_s": time.perf_counter() - t, "xla_flops": xla_flops(compiled),
                        "xla_temp_gib": (xla_temp_bytes(compiled) or 0) / 2**30}
                outs[variant] = np.asarray(compiled(*a))
                methods[variant] = ((lambda c=compiled, a=a: jax.block_until_ready(c(*a))), info)
            load0 = loadavg()
            timed = time_interleaved(methods, args.reps)
            first = args.variants[0]
            prev = None
            for v in args.variants:
                sec = timed[v]["sec_per_call"]
                same = bool(np.array_equal(outs[v], outs[first]))
                rel = float(np.abs(outs[v] - outs[first]).max() / np.abs(outs[first]).max())
                row = {**meta, "loadavg": load0, "loadavg_after": loadavg(), "model": f"{shape}(random)", "seq": seq,
                       "batch_pairs": batch, "method": f"factored[{v}]", "variant": v, "sec_per_call": sec,
                       "secs": timed[v]["secs"], "pairs_per_s": batch / sec, "x_first": timed[first]["sec_per_call"] / sec,
                       "x_previous": None if prev is None else timed[prev]["sec_per_call"] / sec,
                       "bitwise_equal_first": same, "max_rel_diff_first": rel,
                       "peak_extra_gib": timed[v]["peak_extra_gib"], **methods[v][1]}
                rows.append(row)
                prev = v
                print(f"{shape} T={seq} B={batch} {v:12s} {sec:8.3f} s  {batch / sec:7.2f} pairs/s  × first "
                      f"{row['x_first']:.2f}  × previous {_fmt(row['x_previous'], '.2f')}  equal {same} "
                      f"(max rel {rel:.1e})  compile {info['compile_s']:.1f} s", flush=True)
            jax.clear_caches()
    return rows


def scaling_rows(path: str, since: str) -> list[dict]:
    """The records of `path` (scaling.jsonl) from runs started at or after `since` (ISO date/time)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("date", "") >= since]


def scaling_table(rows: list[dict]) -> str:
    """Markdown table of scaling rows (a `compile only` row has XLA's plan, no timing)."""
    lines = ["| sweep | method | model | params M | B | T | r | K | pairs/s | GFLOP/s | XLA temp+out GiB | "
             "per pair MiB | peak RSS GiB | RSS before call GiB | compile s | load |", "|---|---|---|" + "---:|" * 13]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['sweep']} | {r['method']} | {r['model']} | | {r['batch_pairs']} | {r['seq']} | "
                         f"{_fmt(r['r'], 'd')} | | failed | | | | | | | {_fmt(r.get('loadavg'), '.1f')} |")
            continue
        co = r.get("compile_only")
        lines.append(
            f"| {r['sweep']} | {r['method']} | {r['model']} | {r['shape']['params'] / 1e6:.0f} | {r['batch_pairs']} | "
            f"{r['seq']} | {_fmt(r['r'], 'd')} | {r['k'] if r['method'] == 'factored' else '–'} | "
            f"{'compile only' if co else _fmt(r['pairs_per_s'], '.2f')} | "
            f"{_fmt(r['flops_per_s'] and r['flops_per_s'] / 1e9, '.1f')} | {r['xla_temp_gib']:.3f} | "
            f"{r.get('xla_temp_per_pair_mib', r['xla_temp_gib'] * 1024 / r['batch_pairs']):.1f} | "
            f"{r['peak_rss_gib']:.2f} | {r['rss_before_call_gib']:.2f} | {r['compile_s']:.1f} | "
            f"{_fmt(r.get('loadavg'), '.1f')} |")
    return "\n".join(lines)


def fusion_table(rows: list[dict]) -> str:
    """Markdown table of fusion rows."""
    lines = ["| model | T | B | variant | s/call | pairs/s | × first | × previous | equal to first | compile s | "
             "XLA temp GiB | load |", "|---|---:|---:|---|" + "---:|" * 8]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seq']} | {r['batch_pairs']} | {r['variant']} | {r['sec_per_call']:.3f} | "
            f"{r['pairs_per_s']:.2f} | {r['x_first']:.2f} | {_fmt(r['x_previous'], '.2f')} | "
            f"{'bitwise' if r['bitwise_equal_first'] else format(r['max_rel_diff_first'], '.1e')} | "
            f"{r['compile_s']:.1f} | {r['xla_temp_gib']:.2f} | {_fmt(r.get('loadavg'), '.1f')} |")
    return "\n".join(lines)
