r"""Fidelity of factored (Kronecker) sketches on SmolLM2-135M / BLiMP, and the rank allocation behind the default.

    python bench/bench_fidelity.py --stage ref        # exact reference, once (~7 min on 2 cores; cached)
    python bench/bench_fidelity.py --stage big        # one factored pass at large ranks (cached)
    python bench/bench_fidelity.py --stage explore    # norm shares + many allocations, cheaply (prefix trick)
    python bench/bench_fidelity.py --stage measure    # real runs of the chosen configs: fidelity + s/batch → JSONL
    python bench/bench_fidelity.py --stage timing --configs r=16 vdown128   # interleaved s/batch rounds

Reference. Exact per-pair differentials ∇[ℓ(good) − ℓ(bad)] of all parameters (`make_sketch_fn`,
jit(vmap(grad))), reduced inside the jit to (a) one sparse-JL sketch (`sjlt`, k=65,536, seed 1234)
per parameter group (embed, attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, norm; their sum is the
all-parameter SJLT sketch, since the projector is linear and per-leaf) and (b) every parameter's
exact squared norm. Cached under --cache as .npy, so the expensive pass runs once. Its own cosine
error is ≈ √((1+cos²)/k) ≈ 0.004, against a spread of reference cosines of ≈ 0.06.

Prefix trick (explore). `gaussian_matrix(seed, name, r, n)` is a row prefix of the same matrix with
more rows (`lmgrad.sketch.hashing.gaussian_block`), and P = G/√r, so a block at ranks (r_out, r_in)
equals √(R_out·R_in / (r_out·r_in)) · S[:r_out, :r_in] of the block S computed at (R_out, R_in). One
factored pass at large ranks therefore gives every allocation below them exactly; the measure stage
re-runs the real `make_factored_sketch_fn` for the recorded configurations and checks the agreement.

Metrics, all against the reference: Pearson and Spearman correlation of the pair-pair cosine
similarities (upper triangle, n(n−1)/2 entries); mean |Δcos|; Pearson of the task-level cosine
matrices (sketches averaged per task, off-diagonal); K (floats per row); steady-state seconds per
batch of 16 pairs (each bucket shape compiled and warmed before timing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

from _common import append_jsonl, loadavg, results_path, run_meta
from lmgrad.params import param_info

RESULTS = results_path("fidelity")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.py")
REF_SEED = 1234


# ------------------------------------------------------------------------------------ setup
def _setup(args):
    """(model, pairs' task index [n], batches, task uids) for the BLiMP sample."""
    from lmgrad.models import load_model
    from lmgrad.tasks import select_tasks
    from lmgrad.tasks.batching import encode_pairs, iter_pair_batches

    model = load_model("smollm2")
    tasks = select_tasks("blimp", max_pairs_per_task=args.pairs_per_task)
    pairs = [p for t in tasks for p in t.pairs]
    task_of = np.array([i for i, t in enumerate(tasks) for _ in t.pairs])
    good, bad, sg, sb = encode_pairs(model.tokenizer, pairs)
    batches = list(iter_pair_batches(good, bad, batch_size=args.batch, score_from_good=sg, score_from_bad=sb))
    return model, task_of, batches, [t.uid for t in tasks]


def _group(name: str) -> str:
    """Parameter group of an HF name: embed, head, attn.<proj>, mlp.<proj>, norm, other."""
    info = param_info(name)
    if info.type in ("attn", "mlp"):
        return f"{info.type}.{info.module.rpartition('.')[2]}"
    return info.type


def _layer(name: str) -> int | None:
    return param_info(name).layer


def _collect(fn, batches, n: int, timing: bool = False) -> tuple[np.ndarray, float | None]:
    """Rows of fn(good, bad) placed by pair index; with `timing`, steady-state s/batch (the first
    batch of each [B, T] shape is run twice, the first call compiling and untimed)."""
    import jax

    out, seen, times = None, set(), []
    for g, b in batches:
        shape = tuple(g.input_ids.shape)
        if timing and shape not in seen:
            seen.add(shape)
            jax.block_until_ready(fn(g, b))
        t = time.perf_counter()
        s = np.asarray(jax.block_until_ready(fn(g, b)))
        times.append(time.perf_counter() - t)
        out = np.zeros((n, s.shape[1]), np.float32) if out is None else out
        out[g.index[g.valid]] = s[g.valid]
    return out, (float(np.mean(times)) if timing else None)


def _paths(args) -> dict[str, str]:
    tag = f"smollm2_blimp{args.pairs_per_task}_k{args.ref_k}_s{REF_SEED}"
    os.makedirs(args.cache, exist_ok=True)
    return {k: os.path.join(args.cache, f"{tag}_{k}.npy") for k in ("ref_groups", "ref_sqnorm")} | {
        "ref_meta": os.path.join(args.cache, f"{tag}_meta.json"),
        "big": os.path.join(args.cache, f"smollm2_blimp{args.pairs_per_task}_factored_big.npy"),
        "big_meta": os.path.join(args.cache, f"smollm2_blimp{args.pairs_per_task}_factored_big.json"),
    }


# -------------------------------------------------------------------------------- reference
def reference(args) -> None:
    """Exact per-pair differentials → per-group SJLT sketches [n, G, k] and squared norms [n, P]."""
    import jax.numpy as jnp

    from lmgrad.grads import make_sketch_fn
    from lmgrad.models import logits_fn
    from lmgrad.params import flatten as flatten_params
    from lmgrad.sketch import make_projector

    paths = _paths(args)
    model, task_of, batches, uids = _setup(args)
    n = len(task_of)
    names = sorted(flatten_params(model.params))
    groups = sorted({_group(x) for x in names})
    proj = make_projector("sjlt", args.ref_k, REF_SEED)

    def reduce(grads):
        # One SJLT per group (each leaf projected once, as in proj.project over all leaves) and the
        # exact squared norms, side by side in one [c, G·k + P] row.
        parts = [proj.project({x: grads[x] for x in names if _group(x) == grp}) for grp in groups]
        sq = [jnp.sum(jnp.square(grads[x].reshape(grads[x].shape[0], -1)), axis=1) for x in names]
        return jnp.concatenate(parts + [jnp.stack(sq, axis=1)], axis=1)

    fn = make_sketch_fn(logits_fn(model), names, reduce, chunk_size=1)
    t = time.perf_counter()
    rows, _ = _collect(lambda g, b: fn(model.params, g, b), batches, n)
    secs = time.perf_counter() - t
    gk = len(groups) * args.ref_k
    np.save(paths["ref_groups"], rows[:, :gk].reshape(n, len(groups), args.ref_k))
    np.save(paths["ref_sqnorm"], rows[:, gk:].astype(np.float64))
    with open(paths["ref_meta"], "w") as f:
        json.dump({"names": names, "groups": groups, "task_of": task_of.tolist(), "uids": uids, "seconds": secs,
                   "k": args.ref_k, "seed": REF_SEED}, f)
    print(f"reference: {n} pairs, {len(groups)} groups × k={args.ref_k}, {secs:.1f} s → {args.cache}")


def _load_ref(args):
    paths = _paths(args)
    with open(paths["ref_meta"]) as f:
        meta = json.load(f)
    return np.load(paths["ref_groups"], mmap_mode="r"), np.load(paths["ref_sqnorm"]), meta


# ------------------------------------------------------------------------------ metrics
def _cos(gram: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.maximum(np.diag(gram), 1e-300))
    return gram / np.outer(d, d)


def metrics(gram: np.ndarray, ref_gram: np.ndarray, task_of: np.ndarray) -> dict[str, float]:
    """Agreement of a sketch's pair Gram matrix [n, n] with the reference's (both float64)."""
    from scipy.stats import spearmanr

    n = len(task_of)
    iu = np.triu_indices(n, 1)
    c, cr = _cos(gram)[iu], _cos(ref_gram)[iu]
    # Task means of sketches: Gram of means = A G Aᵀ with A the [tasks, n] averaging matrix.
    a = np.zeros((task_of.max() + 1, n))
    a[task_of, np.arange(n)] = 1
    a /= a.sum(1, keepdims=True)
    it = np.triu_indices(a.shape[0], 1)
    tc, tcr = _cos(a @ gram @ a.T)[it], _cos(a @ ref_gram @ a.T)[it]
    return {"pearson_cos": float(np.corrcoef(c, cr)[0, 1]), "spearman_cos": float(spearmanr(c, cr)[0]),
            "mean_abs_cos_err": float(np.mean(np.abs(c - cr))), "ref_cos_std": float(np.std(cr)),
            "task_pearson_cos": float(np.corrcoef(tc, tcr)[0, 1]),
            "task_mean_abs_cos_err": float(np.mean(np.abs(tc - tcr))), "ref_task_cos_std": float(np.std(tcr))}


# -------------------------------------------------------------------- factored blocks
def _modules(model):
    from lmgrad.grads.factored import describe_modules

    return describe_modules(model.module, model.params)


def _k_of(spec, modules) -> int:
    """Row width K of a factored spec (weights r_out·r_in, vectors r_out; handle_vectors='project')."""
    k = 0
    for m in modules.values():
        r_in, r_out = spec.ranks(m.weight, m.type)
        vec = m.kind in ("layernorm", "rmsnorm")
        k += r_out if vec else r_out * r_in
        k += r_out if m.bias else 0
    return k


BIG = (("embed", 256, 256), ("attn", 128, 128), ("mlp", 128, 128), ("norm", 256, 256))


def factored_big(args) -> None:
    """One factored pass at large ranks (`BIG`), cached: every allocation below them is a rescaled
    prefix of these blocks (module docstring)."""
    from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn

    paths = _paths(args)
    model, task_of, batches, _ = _setup(args)
    spec = FactoredSpec(seed=0, r_in=128, r_out=128, overrides=BIG)
    fn = make_factored_sketch_fn(model, spec)
    t = time.perf_counter()
    rows, _ = _collect(lambda g, b: fn(model.params, g, b)[0], batches, len(task_of))
    np.save(paths["big"], rows)
    with open(paths["big_meta"], "w") as f:
        json.dump({"spec": spec.spec, "layout": fn.layout, "seconds": time.perf_counter() - t}, f)
    print(f"factored big: K={fn.dim}, {time.perf_counter() - t:.1f} s → {paths['big']}")


class Prefix:
    """Gram matrices of any allocation ≤ `BIG` from the cached big blocks (exact, by prefix)."""

    def __init__(self, args, modules):
        paths = _paths(args)
        self.rows = np.load(paths["big"], mmap_mode="r")
        with open(paths["big_meta"]) as f:
            meta = json.load(f)
        from lmgrad.grads.factored import FactoredSpec

        self.big = FactoredSpec.from_spec(meta["spec"])
        self.layout = meta["layout"]
        self.modules = modules
        self.owner = {}
        for m in modules.values():
            self.owner[m.weight] = m
            if m.bias:
                self.owner[m.bias] = m
        self._cache: dict = {}

    def _block(self, e: dict, r_in: int, r_out: int) -> np.ndarray:
        """[n, size] rescaled prefix of one cached block."""
        n = self.rows.shape[0]
        blk = np.asarray(self.rows[:, e["offset"]: e["offset"] + e["size"]], np.float64)
        if len(e["shape"]) == 2:
            big_o, big_i = e["shape"]
            x = blk.reshape(n, big_o, big_i)[:, :r_out, :r_in].reshape(n, -1)
            return x * np.sqrt(big_o * big_i / (r_out * r_in))
        (big_o,) = e["shape"]
        return blk[:, :r_out] * np.sqrt(big_o / r_out)

    def group_gram(self, group: str, r_in: int, r_out: int) -> np.ndarray:
        """Gram [n, n] of the blocks of one parameter group, all at (r_in, r_out); cached."""
        key = (group, r_in, r_out)
        if key not in self._cache:
            out = 0.0
            for e in self.layout:
                if _group(e["name"]) == group:
                    x = self._block(e, r_in, r_out)
                    out = out + x @ x.T
            self._cache[key] = out
        return self._cache[key]

    def gram(self, spec) -> np.ndarray:
        """Gram [n, n] of the sketch `spec` would give (overrides resolved per module)."""
        out = 0.0
        for e in self.layout:
            m = self.owner[e["name"]]
            r_in, r_out = spec.ranks(m.weight, m.type)
            bi, bo = self.big.ranks(m.weight, m.type)
            if r_in > bi or r_out > bo:
                raise ValueError(f"{e['name']}: ranks ({r_in}, {r_out}) exceed the cached big ranks ({bi}, {bo})")
            x = self._block(e, r_in, r_out)
            out = out + x @ x.T
        return out


# ------------------------------------------------------------------------------ explore
LADDER = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _override_key(group: str) -> str:
    """FactoredSpec override key selecting one parameter group (module type or HF-name glob)."""
    if group in ("embed", "head", "norm", "other"):
        return group
    return f"*.{group.split('.', 1)[1]}.weight"


def spec_of(alloc: dict[str, tuple[int, int]], seed: int = 0, global_k: int | None = None):
    """FactoredSpec from {group: (r_in, r_out)}: the most common ranks become the default."""
    from collections import Counter

    from lmgrad.grads.factored import FactoredSpec

    (r_in, r_out), _ = Counter(alloc.values()).most_common(1)[0]
    ov = tuple((_override_key(g), ri, ro) for g, (ri, ro) in sorted(alloc.items()) if (ri, ro) != (r_in, r_out))
    return FactoredSpec(seed=seed, r_in=r_in, r_out=r_out, overrides=ov, global_k=global_k)


def _shares(sq: np.ndarray, names: list[str]) -> tuple[dict[str, float], dict[int, float]]:
    """Mean over pairs of each group's and layer's share of the squared gradient norm."""
    frac = sq / sq.sum(1, keepdims=True)
    by_group: dict[str, float] = {}
    by_layer: dict[int, float] = {}
    for j, x in enumerate(names):
        by_group[_group(x)] = by_group.get(_group(x), 0.0) + float(frac[:, j].mean())
        lay = _layer(x)
        key = -1 if lay is None else lay
        by_layer[key] = by_layer.get(key, 0.0) + float(frac[:, j].mean())
    return by_group, by_layer


def explore(args) -> list[dict]:
    """Norm shares, uniform controls and a greedy per-group allocation under a K budget (prefix trick)."""
    from lmgrad.models import load_model

    groups_sk, sq, meta = _load_ref(args)
    names, groups, task_of = meta["names"], meta["groups"], np.asarray(meta["task_of"])
    ref_g = {g: np.asarray(groups_sk[:, i], np.float64) for i, g in enumerate(groups)}
    ref_all = sum(ref_g.values())
    ref_gram = ref_all @ ref_all.T

    by_group, by_layer = _shares(sq, names)
    print("share of ‖∇‖² (mean over pairs) by group:")
    for g, v in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"  {g:16s} {v:7.4f}")
    print("by layer (-1 = outside the blocks):", " ".join(f"{k}:{v:.3f}" for k, v in sorted(by_layer.items())))

    model = load_model("smollm2")
    modules = _modules(model)
    pre = Prefix(args, modules)
    meta_row = _meta(args) | {"stage": "explore (prefix of cached big blocks)", "pairs": len(task_of)}
    rows = [meta_row | {"kind": "norm_shares", "by_group": by_group, "by_layer": {str(k): v for k, v in by_layer.items()}}]

    def evaluate(alloc):
        gram = sum(pre.group_gram(g, *alloc[g]) for g in groups)
        spec = spec_of(alloc)
        return spec, _k_of(spec, modules), metrics(gram, ref_gram, task_of)

    def show(tag, spec, k, m):
        print(f"{tag:10s} K={k:8d} pair r={m['pearson_cos']:.4f} ρ={m['spearman_cos']:.4f} "
              f"|Δcos|={m['mean_abs_cos_err']:.4f} task r={m['task_pearson_cos']:.4f}  {spec.overrides}")

    print("\nper-group fidelity (group's own Gram vs its reference Gram), square ranks:")
    for g in groups:
        rs = [r for r in (8, 16, 32, 64, 128) if r <= pre.big.ranks(*_probe(modules, g))[0]]
        cells = []
        for r in rs:
            m = metrics(pre.group_gram(g, r, r), ref_g[g] @ ref_g[g].T, task_of)
            cells.append(f"r={r}:{m['pearson_cos']:.3f}")
        print(f"  {g:16s} " + " ".join(cells))

    print("\nuniform controls:")
    for r in (8, 16, 32, 48, 64, 96, 128):
        spec, k, m = evaluate({g: (r, r) for g in groups})
        show(f"r={r}", spec, k, m)
        rows.append(meta_row | {"kind": "uniform", "spec": spec.spec, "K": k, **m})

    print("\nnamed allocations:")
    for name in NAMED:
        spec = _config_spec(name, args)
        k, m = _k_of(spec, modules), metrics(pre.gram(spec), ref_gram, task_of)
        show(name, spec, k, m)
        rows.append(meta_row | {"kind": "named", "config": name, "spec": spec.spec, "K": k, **m})

    # Greedy: start at r=8 everywhere and repeatedly take the single step (one rung up the ladder in
    # r_in, r_out, or both) with the largest gain in pair-level Pearson per float of K added.
    alloc = {g: (8, 8) for g in groups}
    spec, k, m = evaluate(alloc)
    path = []
    while True:
        best = None
        for g in groups:
            bi, bo = pre.big.ranks(*_probe(modules, g))
            ri, ro = alloc[g]
            up = lambda r: next((x for x in LADDER if x > r), None)  # noqa: E731
            steps = ((ri, up(ro)),) if g == "norm" else ((up(ri), up(ro)), (up(ri), ro), (ri, up(ro)))
            for cand in steps:
                if None in cand or cand[0] > bi or cand[1] > bo or cand == (ri, ro):
                    continue
                trial = dict(alloc) | {g: cand}
                s2, k2, m2 = evaluate(trial)
                if k2 > args.budget:
                    continue
                gain = (m2["pearson_cos"] - m["pearson_cos"]) / max(k2 - k, 1)
                if best is None or gain > best[0]:
                    best = (gain, trial, s2, k2, m2)
        if best is None:
            break
        _, alloc, spec, k, m = best
        path.append((dict(alloc), spec, k, m))
        show("greedy", spec, k, m)
        rows.append(meta_row | {"kind": "greedy", "spec": spec.spec, "K": k, "alloc": alloc, **m})
    alloc, spec, k, m = max(path, key=lambda p: p[3]["pearson_cos"])
    show("best", spec, k, m)
    with open(os.path.join(args.cache, "explore_best.json"), "w") as f:
        json.dump({"alloc": alloc, "spec": spec.spec, "K": k, "metrics": m}, f, indent=1)
    return rows


def _probe(modules, group: str) -> tuple[str, str]:
    """(weight name, module type) of one module of `group`, for `FactoredSpec.ranks`."""
    for m in modules.values():
        if _group(m.weight) == group:
            return m.weight, m.type
    raise KeyError(group)


def _meta(args) -> dict:
    return run_meta(model="smollm2-135m", tasks="blimp", pairs_per_task=args.pairs_per_task,
                    ref=f"exact vmap(grad), all params, sjlt k={args.ref_k} seed={REF_SEED}")


# ------------------------------------------------------------------------------ measure
# Named allocations (r_in, r_out, overrides). The explore stage showed r_in hardly matters (layer
# inputs are strongly aligned across tokens and pairs, so their projected inner products err by a
# nearly common factor) while r_out on the high-norm groups does: norms, v_proj, embed, down_proj.
NAMED = {
    "example": (16, 16, (("embed", 64, 128), ("mlp", 32, 32))),  # the allocation suggested in the brief
    "out64": (8, 64, (("embed", 16, 256), ("norm", 8, 256))),  # module types only (portable)
    "out48": (8, 48, (("embed", 16, 256), ("norm", 8, 256))),
    "out32": (8, 32, (("embed", 16, 256), ("norm", 8, 256))),
    "in4out64": (4, 64, (("embed", 16, 256), ("norm", 8, 256))),
    "in16out32": (16, 32, (("embed", 16, 256), ("norm", 8, 256))),
    "vdown64": (8, 16, (("*.v_proj.weight", 8, 64), ("*.down_proj.weight", 8, 64), ("embed", 16, 256),
                        ("norm", 8, 256))),
    "vdown128": (8, 16, (("*.v_proj.weight", 8, 128), ("*.down_proj.weight", 8, 128), ("embed", 16, 256),
                         ("norm", 8, 256))),
    "vdown128_out32": (8, 32, (("*.v_proj.weight", 8, 128), ("*.down_proj.weight", 8, 128), ("embed", 16, 256),
                               ("norm", 8, 256))),
}


def _load_config(path: str):
    """A config file as a module, loaded by path (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_spec(name: str, args):
    """FactoredSpec for a --configs entry: r=N | best | default | a `NAMED` key, then :seed=S / :global_k=K."""
    from lmgrad.grads.factored import FactoredSpec

    base, *opts = name.split(":")
    kw = dict(o.split("=") for o in opts)
    seed, gk = int(kw.get("seed", 0)), (int(kw["global_k"]) if "global_k" in kw else None)
    if base.startswith("r="):
        r = int(base[2:])
        return FactoredSpec(seed=seed, r_in=r, r_out=r, global_k=gk)
    if base == "best":
        with open(os.path.join(args.cache, "explore_best.json")) as f:
            sp = json.load(f)["spec"]
        return FactoredSpec.from_spec(sp | {"seed": seed, "global_k": gk})
    if base in NAMED:
        r_in, r_out, ov = NAMED[base]
        return FactoredSpec(seed=seed, r_in=r_in, r_out=r_out, overrides=ov, global_k=gk)
    if base == "default":
        c = _load_config(DEFAULT_CONFIG).get_config().sketch
        return FactoredSpec(seed=seed, r_in=c.r_in, r_out=c.r_out, overrides=tuple(tuple(o) for o in c.overrides),
                            global_k=gk)
    raise ValueError(f"--configs: unknown entry {name!r} (r=N | best | default | NAMED key, then :seed=S :global_k=K)")


def measure(args) -> list[dict]:
    """Real `make_factored_sketch_fn` runs over all pairs: fidelity vs the reference and s/batch."""
    from lmgrad.grads.factored import make_factored_sketch_fn

    groups_sk, _, meta = _load_ref(args)
    ref_all = np.asarray(groups_sk, np.float64).sum(1)
    ref_gram = ref_all @ ref_all.T
    model, task_of, batches, _ = _setup(args)
    assert np.array_equal(task_of, np.asarray(meta["task_of"])), "pair sample differs from the cached reference"
    modules = _modules(model)
    pre = Prefix(args, modules) if os.path.exists(_paths(args)["big"]) else None
    meta_row = _meta(args) | {"stage": "measure (real make_factored_sketch_fn)", "pairs": len(task_of),
                              "batch_pairs": args.batch, "n_batches": len(batches)}
    rows = []
    print(f"{'config':26s} {'K':>8s} {'pair r':>7s} {'ρ':>7s} {'|Δcos|':>7s} {'task r':>7s} {'s/batch':>8s}")
    for name in args.configs:
        spec = _config_spec(name, args)
        fn = make_factored_sketch_fn(model, spec)
        sk, sec = _collect(lambda g, b: fn(model.params, g, b)[0], batches, len(task_of), timing=True)
        x = sk.astype(np.float64)
        gram = x @ x.T
        m = metrics(gram, ref_gram, task_of)
        row = meta_row | {"config": name, "spec": spec.spec, "K": fn.dim, **m, "sec_per_batch": sec}
        if pre is not None and spec.global_k is None and spec.seed == 0:
            try:
                row["prefix_max_abs_cos_diff"] = float(np.max(np.abs(_cos(gram) - _cos(pre.gram(spec)))))
            except ValueError:
                pass
        rows.append(row)
        print(f"{name:26s} {fn.dim:8d} {m['pearson_cos']:7.4f} {m['spearman_cos']:7.4f} {m['mean_abs_cos_err']:7.4f} "
              f"{m['task_pearson_cos']:7.4f} {sec:8.3f}  load {loadavg()}", flush=True)
        del sk, x, fn
    base = [r["sec_per_batch"] for r in rows if r["config"] == "r=16"]
    if base:
        for r in rows:
            r["time_vs_r16"] = r["sec_per_batch"] / float(np.mean(base))
    return rows


def timing(args) -> list[dict]:
    """Interleaved steady-state timing (s/batch of `--batch` pairs) of --configs over all batches,
    `--repeats` rounds; the shared 2-core machine's load swings, so compare within a round."""
    import jax

    from lmgrad.grads.factored import make_factored_sketch_fn

    model, task_of, batches, _ = _setup(args)
    fns = {name: make_factored_sketch_fn(model, _config_spec(name, args)) for name in args.configs}
    for fn in fns.values():  # compile every [B, T] shape first
        for shape in {tuple(g.input_ids.shape): (g, b) for g, b in batches}.values():
            jax.block_until_ready(fn(model.params, *shape)[0])
    per: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for g, b in batches:
                jax.block_until_ready(fn(model.params, g, b)[0])
            per[name].append((time.perf_counter() - t) / len(batches))
    meta_row = _meta(args) | {"stage": "timing (interleaved)", "pairs": len(task_of), "batch_pairs": args.batch,
                              "n_batches": len(batches)}
    rows, base = [], per.get("r=16")
    for name, ts in per.items():
        ratio = None if base is None else [t / b for t, b in zip(ts, base)]
        rows.append(meta_row | {"config": name, "spec": fns[name].spec.spec, "K": fns[name].dim,
                                "sec_per_batch": float(np.median(ts)), "sec_per_batch_rounds": ts,
                                "time_vs_r16_rounds": ratio})
        print(f"{name:26s} K={fns[name].dim:8d} s/batch median {np.median(ts):.3f} rounds "
              + " ".join(f"{t:.3f}" for t in ts) + ("" if ratio is None else "  ×r16 " + " ".join(f"{r:.2f}" for r in ratio)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["ref", "big", "explore", "measure", "timing"], required=True)
    ap.add_argument("--pairs_per_task", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ref_k", type=int, default=65536)
    ap.add_argument("--cache", default="/tmp/lmgrad_fidelity")
    ap.add_argument("--configs", nargs="*",
                    default=["r=16", "r=32", "r=64", "example", "out64", "vdown128", "vdown128:seed=1",
                             "vdown128:global_k=65536", "best", "r=16"],
                    help="measure: r=N | best | default | a NAMED key, with optional :seed=S :global_k=K")
    ap.add_argument("--repeats", type=int, default=3, help="timing: interleaved rounds")
    ap.add_argument("--budget", type=int, default=150_000, help="explore: largest K per row")
    ap.add_argument("--no_record", action="store_true", help="do not append to bench/results/fidelity.jsonl")
    args = ap.parse_args()
    if args.stage == "ref":
        reference(args)
    elif args.stage == "big":
        factored_big(args)
    elif args.stage == "explore":
        rows = explore(args)
        if not args.no_record:
            append_jsonl(RESULTS, rows)
    elif args.stage in ("measure", "timing"):
        rows = measure(args) if args.stage == "measure" else timing(args)
        if not args.no_record:
            append_jsonl(RESULTS, rows)


if __name__ == "__main__":
    main()
