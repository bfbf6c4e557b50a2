"""The sketch job: every minimal pair → one row (a sketch of ∇ℓ(good) − ∇ℓ(bad)) in a run store.

`run_sketch` is what `launch/sketch.py` and `launch/pipeline.py` call. Rows are produced in a
deterministic order (tasks sorted, pairs bucketed by length), written in shards at batch
boundaries, so a killed run resumed with `resume=True` skips exactly the committed rows and ends
with the rows of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from lmgrad import provenance
from lmgrad.grads import check_finite, make_mesh, select_params, sharded_sketch_fn
from lmgrad.models.loading import LoadedModel, flatten_params, logits_fn
from lmgrad.sketch import make_projector
from lmgrad.store import StoreWriter
from lmgrad.tasks import Task, encode_pairs, iter_pair_batches, task_provenance

log = logging.getLogger(__name__)

METHODS = ("exact", "factored")
DEFAULT_OVERRIDES = (("*.v_proj.weight", 8, 128), ("*.down_proj.weight", 8, 128), ("embed", 16, 256), ("norm", 8, 256))


@dataclasses.dataclass(frozen=True)
class SketchOptions:
    """What to sketch and how; everything here goes into the store's config (checked on resume)."""

    method: str = "exact"  # exact: vmap(grad) + projector; factored: Kronecker per linear layer
    projector: str = "sjlt"
    k: int = 4096
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    from_first_difference: bool = False
    # Factored path: default ranks and ((module type or HF-name pattern, r_in, r_out), ...) overrides,
    # first match wins. The defaults put output-side rank where SmolLM2's gradient norm is; pair-cosine
    # Pearson vs exact gradients 0.975 at K = 100k (0.85 for uniform 16 × 16; bench/README.md).
    r_in: int = 8
    r_out: int = 16
    overrides: tuple[tuple[str, int, int], ...] = DEFAULT_OVERRIDES
    bos: str = "auto"
    dtype: str = "float32"  # stored row dtype

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown sketch method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.k is None or int(self.k) < 0 or (self.method == "exact" and self.projector != "identity" and int(self.k) <= 0):
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"store dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclasses.dataclass
class Sketcher:
    """A compiled fn(params, good, bad) → [B, K] plus what a manifest must say about it."""

    fn: Callable[[Any, Any, Any], jax.Array]
    k: int
    layout: list[dict[str, Any]]
    spec: dict[str, Any]


def build_sketcher(
    model: LoadedModel,
    opts: SketchOptions,
    *,
    chunk_size: int | None = 4,
    num_devices: int | None = None,
) -> Sketcher:
    """Compiles the per-pair sketch function for `model` on a `data` mesh of local devices."""
    names = list(flatten_params(model.params))
    selected = select_params(names, list(opts.include) or None, list(opts.exclude) or None)
    shapes = {n: tuple(v.shape) for n, v in flatten_params(model.params).items() if n in selected}
    mesh = make_mesh(num_devices)
    selection = {"include": list(opts.include), "exclude": list(opts.exclude), "n_selected": len(selected),
                 "n_params": int(sum(int(np.prod(s)) for s in shapes.values()))}
    if opts.method == "exact":
        proj = make_projector(opts.projector, opts.k if opts.projector != "identity" else None, opts.seed)
        fn = sharded_sketch_fn(logits_fn(model), selected, lambda g: proj.project(g, shapes), mesh,
                               chunk_size=chunk_size)
        return Sketcher(fn, proj.output_dim(shapes), proj.layout(shapes),
                        {"method": "exact", "projector": proj.spec, "selection": selection})
    from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn

    spec = FactoredSpec(seed=opts.seed, r_in=opts.r_in, r_out=opts.r_out, overrides=tuple(opts.overrides),
                        include=tuple(opts.include) or None,
                        exclude=tuple(opts.exclude), global_k=int(opts.k) or None)
    factored = make_factored_sketch_fn(model, spec)
    fn = _shard_factored(factored, mesh)
    return Sketcher(fn, factored.dim, factored.layout,
                    {"method": "factored", "factored": spec.spec, "selection": selection})


def _shard_factored(factored: Any, mesh: Any) -> Callable[[Any, Any, Any], jax.Array]:
    """The factored sketch with the batch split over the mesh's `data` axis.

    Nothing in the factored path needs a collective: each device differentiates its own rows'
    perturbations. `check_vma=False` keeps the zero perturbations (created inside the body, so
    device-invariant) from being psum-ed across devices in the transpose.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lmgrad.grads import as_arrays, replicate
    from lmgrad.grads.mesh import ReplicaCache

    n_dev = mesh.shape["data"]
    body = jax.shard_map(lambda p, g, b, f: factored.core(p, g, b, f), mesh=mesh,
                         in_specs=(P(), P("data"), P("data"), P()), out_specs=P("data"), check_vma=False)
    jitted = jax.jit(body)
    replicated = ReplicaCache(mesh)
    factors = replicate(factored.factors(), mesh)  # independent of the params: placed once

    def fn(params: Any, good: Any, bad: Any) -> jax.Array:
        g, b = as_arrays(good), as_arrays(bad)
        n = g["input_ids"].shape[0]
        pad = (-n) % n_dev
        g, b = ({k: np.concatenate([np.asarray(v), np.zeros((pad,) + v.shape[1:], np.asarray(v).dtype)])
                 for k, v in d.items()} for d in (g, b))
        rows = NamedSharding(mesh, P("data"))
        out = jitted(replicated(params), jax.device_put(g, rows), jax.device_put(b, rows), factors)
        return out[:n]

    return fn


def store_config(model: LoadedModel, tasks: Sequence[Task], opts: SketchOptions, sketcher: Sketcher) -> dict[str, Any]:
    """The store config: everything that must match for rows to be mixed in one store.

    The code version is compared only by lmgrad version; the exact git commit, host and time of
    each session go to the manifest's `sessions` (a resume after a docs-only commit is allowed).
    """
    return {
        "model": model.provenance,
        "tasks": task_provenance(tasks),
        "sketch": sketcher.spec,
        "loss": {"kind": "sentence NLL differential ℓ(good) − ℓ(bad)",
                 "tokens": "from_first_difference" if opts.from_first_difference else "whole_sentence",
                 "bos": opts.bos},
        "lmgrad_version": provenance.lmgrad.__version__,
    }


def run_sketch(
    model: LoadedModel,
    tasks: Sequence[Task],
    workdir: str,
    opts: SketchOptions,
    *,
    batch_size: int = 16,
    chunk_size: int | None = 4,
    shard_rows: int = 256,
    resume: bool = False,
    num_devices: int | None = None,
    progress: Callable[[int], None] | None = None,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, Any]:
    """Sketches every pair of `tasks` into the store at `workdir`; returns timing facts.

    With `process_count > 1` (a multi-host run) this process takes every `process_count`-th batch,
    starting at `process_index`, and writes its own store `workdir/process-XXXXX/`;
    `lmgrad.store.open(workdir)` reads them as one. `max_batches` stops early (for tests of
    crash/resume); the store is then incomplete.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if model.tokenizer is None:
        raise ValueError(f"{model.spec}: model was loaded without a tokenizer")
    pairs = [p for t in tasks for p in t.pairs]
    if not pairs:
        raise ValueError("no pairs to sketch")
    good, bad, sg, sb = encode_pairs(model.tokenizer, pairs, bos=opts.bos, max_length=model.max_length,
                                     from_first_difference=opts.from_first_difference)
    sketcher = build_sketcher(model, opts, chunk_size=chunk_size, num_devices=num_devices)
    config = store_config(model, tasks, opts, sketcher)
    batches = [gb for i, gb in enumerate(iter_pair_batches(
        good, bad, batch_size=batch_size, score_from_good=sg, score_from_bad=sb, max_len=model.max_length))
        if i % process_count == process_index]
    total = sum(int(g.valid.sum()) for g, _ in batches)
    if process_count > 1:
        from lmgrad.store import process_dir

        config["process"] = {"index": process_index, "count": process_count, "batch_size": batch_size}
        workdir = str(process_dir(workdir, process_index))
    writer = StoreWriter(workdir, config=config, k=sketcher.k, dtype=opts.dtype, layout=sketcher.layout,
                         total_rows=total, resume=resume, info=provenance.run_info())
    skip = writer.rows_done
    if progress is not None and skip:
        progress(skip)
    buf_rows: list[np.ndarray] = []
    buf_meta: list[dict[str, Any]] = []
    done = 0
    t0 = time.perf_counter()
    n_batches = 0

    def flush() -> None:
        if buf_rows:
            writer.write(np.concatenate(buf_rows), list(buf_meta))
            buf_rows.clear()
            buf_meta.clear()

    with writer:
        for g, b in batches:
            n_valid = int(g.valid.sum())
            if skip:
                if skip < n_valid:
                    raise RuntimeError(f"{workdir}: committed rows ({writer.rows_done}) do not end at a batch "
                                       "boundary; was the store written with another batch size?")
                skip -= n_valid
                continue
            if max_batches is not None and n_batches >= max_batches:
                break
            rows = np.asarray(sketcher.fn(model.params, g, b), dtype=np.float32)
            check_finite(rows, g.index, pairs)
            idx = g.index[g.valid]
            buf_rows.append(rows[g.valid])
            buf_meta.extend({"UID": pairs[i].UID, "pairID": pairs[i].pairID, "field": pairs[i].field,
                             "linguistics_term": pairs[i].linguistics_term} for i in idx)
            done += n_valid
            n_batches += 1
            if progress is not None:
                progress(n_valid)
            if sum(len(r) for r in buf_rows) >= shard_rows:
                flush()
        flush()
    elapsed = time.perf_counter() - t0
    return {"pairs": done, "seconds": elapsed, "pairs_per_s": done / max(elapsed, 1e-9), "k": sketcher.k,
            "rows_total": writer.rows_done, "complete": writer.rows_done == total, "workdir": workdir}
