"""The sketch stage: every minimal pair → one row (a sketch of ∇ℓ(good) − ∇ℓ(bad)) in a run store.

`run` is what `launch/sketch.py` and the pipeline call; `sketch_pairs` is the same on an already
loaded model and tasks. Rows are produced in a deterministic order (tasks sorted; pairs packed into
rows, or bucketed by length), written in shards at batch boundaries, so a killed run resumed with `resume=True`
skips exactly the committed rows and ends with the rows of an uninterrupted run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lmgrad import provenance
from lmgrad.grads import check_finite, make_mesh, reseeded_factored_fn, sharded_factored_fn, sharded_sketch_fn
from lmgrad.grads.factored import DEFAULT_OVERRIDES, DEFAULT_R_IN, DEFAULT_R_OUT, FactoredSpec, make_factored_sketch_fn
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import check_choices, option
from lmgrad.models.loading import LoadedModel, logits_fn
from lmgrad.params import flatten, select
from lmgrad.sketch import make_projector
from lmgrad.store import StoreWriter, deal
from lmgrad.tasks import (PackedPairBatch, Task, degenerate_pairs, encode_pairs, iter_packed_pairs,
                          iter_pair_batches, packed_pair_shape, task_provenance)

log = logging.getLogger(__name__)

METHODS = ("exact", "factored")
PROJECTORS = ("identity", "gaussian", "rademacher", "sjlt")
# Above this size the exact path's per-example gradient (one parameter-sized copy per example in a
# chunk) dominates time and memory; the factored path was 4.4x faster at flat memory on a
# GPT-2-small shape (bench/results/factored.jsonl). Below it, exact sketches are cheap and exact.
AUTO_FACTORED_PARAMS = 50_000_000
DEFAULT_EXACT_K = 4096


@dataclasses.dataclass(frozen=True)
class SketchOptions:
    """What to sketch and how. `resolve(model)` fixes `method=auto` and the default width; what
    changes the numbers goes into the store's config (checked on resume)."""

    method: str = option("auto", "exact: jit(vmap(grad)) + projector; factored: Kronecker per linear layer "
                         f"(one block per module); auto: factored above {AUTO_FACTORED_PARAMS // 10**6}M "
                         "parameters, else exact.", choices=("auto",) + METHODS)
    projector: str = option("sjlt", "Exact path's projector ('factored' is an alias of method=factored).",
                            choices=PROJECTORS + ("factored",))
    k: int | None = option(None, f"Exact path: sketch width (default {DEFAULT_EXACT_K}; the identity projector "
                           "keeps every coordinate).")
    global_k: int = option(0, "Factored path: width of an optional global sparse-JL stage over the module "
                           "blocks (0 = off: one block per module, readable per layer and module type).")
    projection_seed: int = option(0, "Projection seed: same seed, same projection on any device count.")
    include: tuple[str, ...] = option((), "HF parameter-name patterns to differentiate (glob, or re:REGEX); "
                                      "empty = all.")
    exclude: tuple[str, ...] = option((), "HF parameter-name patterns to leave out.")
    from_first_difference: bool = option(False, "Score tokens only from the first differing token.")
    # Factored ranks: defaults from the fidelity study (grads/factored.py, bench/README.md).
    r_in: int = option(DEFAULT_R_IN, "Factored path: input-side projection size per module.")
    r_out: int = option(DEFAULT_R_OUT, "Factored path: output-side projection size per module.")
    overrides: tuple[tuple[str, int, int], ...] = option(
        DEFAULT_OVERRIDES, "Factored path: TYPE_OR_PATTERN:R_IN:R_OUT entries (types: embed, head, attn, "
        "mlp, norm, other), first match wins.")
    batch_size: int = option(16, "Pairs per batch (packed: on average; rows of one shape hold the tokens of "
                             "about this many pairs).")
    pack: bool = option(True, "Factored path: pack whole pairs side by side into rows of one shape (one compile, "
                        "~97% real tokens on BLiMP) instead of padding each sentence to a length bucket.")
    chunk_size: int = option(4, "Exact path: examples per vmap micro-batch (bounds memory).")
    shard_rows: int = option(256, "Rows per store shard (committed atomically).")
    store_dtype: str = option("float32", "Stored row dtype.", choices=("float32", "bfloat16"))

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("batch_size", "chunk_size", "shard_rows", "r_in", "r_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"SketchOptions.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_k < 0:
            raise ValueError(f"SketchOptions.global_k must be >= 0, got {self.global_k}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"SketchOptions.k must be a positive integer or None, got {self.k!r}")
        if self.method == "factored" and self.k is not None:
            raise ValueError("SketchOptions.k is the exact path's sketch width; the factored path's optional "
                             "global stage is global_k")

    def resolve(self, model: LoadedModel | None = None, *, num_params: int | None = None) -> "SketchOptions":
        """Concrete options for `model`: method=auto and the projector alias resolved, k set."""
        method = self.method
        if self.projector == "factored":
            method = "factored"
        elif method == "auto":
            n = num_params if num_params is not None else int(model.provenance["num_params"])
            method = "factored" if n > AUTO_FACTORED_PARAMS else "exact"
        projector = "sjlt" if self.projector == "factored" else self.projector
        k = self.k
        if method == "exact" and k is None and projector != "identity":
            k = DEFAULT_EXACT_K
        if method == "factored":
            k = None
        return dataclasses.replace(self, method=method, projector=projector, k=k)


@dataclasses.dataclass
class Sketcher:
    """A compiled fn(params, good, bad) → [B, K] plus what a manifest must say about it; `packed`
    (factored path) is fn(params, packed_batch) → [R, Q, K] (`FactoredSketchFn.packed`)."""

    fn: Callable[[Any, Any, Any], jax.Array]
    k: int
    layout: list[dict[str, Any]]
    spec: dict[str, Any]
    packed: Callable[[Any, Any], jax.Array] | None = None


def build_sketcher(
    model: LoadedModel,
    opts: SketchOptions,
    *,
    num_devices: int | None = None,
    mesh: Mesh | None = None,
) -> Sketcher:
    """Compiles the per-pair sketch function for `model` on `mesh` (default: a `data` mesh of
    `num_devices` local devices; a mesh with fsdp > 1 runs on sharded parameters). `opts` must be
    resolved (`SketchOptions.resolve`). Memoised per (module, parameter shapes, options, mesh): the
    next checkpoint of an architecture reuses the traced function (`fn(params, good, bad)`), and a
    factored sketch's next projection seed reuses it too (the seed enters through the factor
    matrices, an input)."""
    if opts.method not in METHODS:
        raise ValueError(f"build_sketcher needs resolved options (method {opts.method!r}); call opts.resolve(model)")
    flat = flatten(model.params)
    mesh = make_mesh(num_devices) if mesh is None else mesh
    # Checkpoints of one architecture (a sweep's series) share the traced and compiled function:
    # it takes the parameters as an argument, and depends on the module, shapes, options and mesh.
    shapes = tuple((n, tuple(v.shape), str(v.dtype)) for n, v in sorted(flat.items()))
    key = (model.module, shapes, opts, mesh)
    if key in _SKETCHERS:
        _SKETCHERS.move_to_end(key)
        return _SKETCHERS[key]
    base = None
    if opts.method == "factored" and not opts.global_k:
        seedless = dataclasses.replace(opts, projection_seed=0)
        base = next((s for (mod, shp, o, m), s in reversed(_SKETCHERS.items())
                     if (mod, shp, m) == (model.module, shapes, mesh)
                     and dataclasses.replace(o, projection_seed=0) == seedless), None)
    if base is not None:
        fn = reseeded_factored_fn(base.fn, opts.projection_seed)
        sketcher = Sketcher(fn, base.k, base.layout, {**base.spec, "factored": fn.factored.spec.spec}, fn.packed)
    else:
        sketcher = _build_sketcher(model, opts, flat, mesh)
    _SKETCHERS[key] = sketcher
    while len(_SKETCHERS) > 4:
        _SKETCHERS.popitem(last=False)
    return sketcher


_SKETCHERS: "collections.OrderedDict[Any, Sketcher]" = collections.OrderedDict()


def _build_sketcher(model: LoadedModel, opts: SketchOptions, flat: dict[str, Any], mesh: Mesh) -> Sketcher:
    selected = select(list(flat), list(opts.include) or None, list(opts.exclude) or None)
    shapes = {n: tuple(flat[n].shape) for n in selected}
    selection = {"include": list(opts.include), "exclude": list(opts.exclude), "n_selected": len(selected),
                 "n_params": int(sum(int(np.prod(s)) for s in shapes.values()))}
    if opts.method == "exact":
        proj = make_projector(opts.projector, opts.k if opts.projector != "identity" else None, opts.projection_seed)
        fn = sharded_sketch_fn(logits_fn(model), selected, lambda g: proj.project(g, shapes), mesh,
                               chunk_size=opts.chunk_size)
        return Sketcher(fn, proj.output_dim(shapes), proj.layout(shapes),
                        {"method": "exact", "projector": proj.spec, "selection": selection})
    spec = FactoredSpec(seed=opts.projection_seed, r_in=opts.r_in, r_out=opts.r_out, overrides=tuple(opts.overrides),
                        include=tuple(opts.include) or None,
                        exclude=tuple(opts.exclude), global_k=opts.global_k or None)
    factored = make_factored_sketch_fn(model, spec)
    fn = sharded_factored_fn(factored, mesh)
    return Sketcher(fn, factored.dim, factored.layout,
                    {"method": "factored", "factored": spec.spec, "selection": selection}, fn.packed)


def store_config(model: LoadedModel, tasks: Sequence[Task], opts: SketchOptions, sketcher: Sketcher,
                 bos: str) -> dict[str, Any]:
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
                 "bos": bos},
        # The row order (checked on resume) follows the batching; the rows themselves do not.
        "batching": "packed" if packs(opts) else "bucketed",
        "lmgrad_version": provenance.lmgrad.__version__,
    }


def packs(opts: SketchOptions) -> bool:
    """Whether resolved `opts` sketch packed batches (the factored path with `pack`)."""
    return opts.method == "factored" and opts.pack


def sketch_batches(good: Sequence[np.ndarray], bad: Sequence[np.ndarray], opts: SketchOptions, *,
                   score_from_good: np.ndarray, score_from_bad: np.ndarray, max_len: int | None) -> list[Any]:
    """The sketch stage's batches in run order: `PackedPairBatch`es (`packs(opts)`), else bucketed
    (good, bad) `Batch` pairs."""
    if packs(opts):
        row_len, rows = packed_shape([len(g) + len(b) for g, b in zip(good, bad)], opts.batch_size)
        return list(iter_packed_pairs(good, bad, rows=rows, row_len=row_len,
                                      score_from_good=score_from_good, score_from_bad=score_from_bad))
    return list(iter_pair_batches(good, bad, batch_size=opts.batch_size, score_from_good=score_from_good,
                                  score_from_bad=score_from_bad, max_len=max_len))


def packed_shape(pair_lengths: Sequence[int], batch_size: int) -> tuple[int, int]:
    """(row length, rows per batch) of packed sketch batches (`lmgrad.tasks.packed_pair_shape`)."""
    return packed_pair_shape(pair_lengths, batch_size)


def _pair_index(batch: Any) -> np.ndarray:
    """The pair index of each row a batch yields, in order (−1 for padding)."""
    return batch.index.reshape(-1) if isinstance(batch, PackedPairBatch) else batch[0].index


def sketch_pairs(
    model: LoadedModel,
    tasks: Sequence[Task],
    workdir: str | os.PathLike,
    opts: SketchOptions,
    *,
    bos: str = InputOptions.bos,
    resume: bool = False,
    num_devices: int | None = None,
    mesh: Mesh | None = None,
    progress: Callable[[int], None] | None = None,
    max_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, Any]:
    """Sketches every pair of `tasks` into the store at `workdir`; returns timing facts.

    `opts` is resolved for `model` here; `bos` is the inputs' sentence-start token.

    With `process_count > 1` (a multi-host run) this process takes every `process_count`-th batch,
    starting at `process_index`, and writes its own store `workdir/process-XXXXX/`;
    `lmgrad.store.open(workdir)` reads them as one. A run resumed on another number of processes
    (one included) deals the batches no store has committed to the new processes
    (`lmgrad.store.deal`), so it still ends with every pair exactly once. `max_batches` stops early (for tests of
    crash/resume); the store is then incomplete.

    A non-finite differential stops the run before its batch is written, naming the pairs
    (`NonFiniteGradientError`). Packed, a NaN in one sentence's activations also reaches the other
    pairs of its row (attention's 0 · NaN), so the message may name those too; `pack=False` isolates it.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if model.tokenizer is None:
        raise ValueError(f"{model.spec}: model was loaded without a tokenizer")
    pairs = [p for t in tasks for p in t.pairs]
    if not pairs:
        raise ValueError("no pairs to sketch")
    opts = opts.resolve(model)
    workdir = str(workdir)
    good, bad, sg, sb = encode_pairs(model.tokenizer, pairs, bos=bos, max_length=model.max_length,
                                     from_first_difference=opts.from_first_difference)
    # Sentences that differ only in what the tokenizer erases have an exactly-zero differential:
    # no signal, and a zero row breaks cosine-based analysis. (Identical sentences are already
    # dropped at selection.)
    same = set(degenerate_pairs(good, bad))
    if same:
        dropped = [[pairs[i].UID, pairs[i].pairID] for i in sorted(same)]
        log.warning("dropping %d pair(s) whose sentences tokenise identically: %s", len(same), dropped)
        keep = [i for i in range(len(pairs)) if i not in same]
        pairs, good, bad, sg, sb = [pairs[i] for i in keep], [good[i] for i in keep], [bad[i] for i in keep], sg[keep], sb[keep]
        if not pairs:
            raise ValueError("no pairs to sketch: every pair tokenises identically")
    sketcher = build_sketcher(model, opts, num_devices=num_devices, mesh=mesh)
    config = store_config(model, tasks, opts, sketcher, bos)
    if same:
        config["loss"]["dropped_token_identical"] = dropped
        for row in config["tasks"]:  # per task, beside selection's count of identical sentences
            row["n_token_identical_dropped"] = sum(1 for uid, _ in dropped if uid == row["uid"])
    every = sketch_batches(good, bad, opts, score_from_good=sg, score_from_bad=sb, max_len=model.max_length)
    counts = [int((_pair_index(x) >= 0).sum()) for x in every]

    # Which batches this process owns: batch i of a fresh run goes to process i mod count; a run
    # resumed on another number of processes re-deals the batches no store has committed.
    share = deal(workdir, counts, process_index, process_count, resume=resume, batch_size=opts.batch_size)
    batches = [every[i] for i in share.batches]
    total = sum(counts[i] for i in share.batches)
    if share.process is not None:
        config["process"] = share.process
    workdir = str(share.path)
    writer = StoreWriter(workdir, config=config, k=sketcher.k, dtype=opts.store_dtype, layout=sketcher.layout,
                         total_rows=total, resume=resume, info=provenance.run_info())
    skip = writer.rows_done
    if skip:
        _check_committed_rows(workdir, skip, [pairs[i] for x in batches for i in _pair_index(x) if i >= 0])
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
        for batch in batches:
            index = _pair_index(batch)
            n_valid = int((index >= 0).sum())
            if skip:
                if skip < n_valid:
                    raise RuntimeError(f"{workdir}: committed rows ({writer.rows_done}) do not end at a batch "
                                       "boundary; was the store written with another batch size?")
                skip -= n_valid
                continue
            if max_batches is not None and n_batches >= max_batches:
                break
            if isinstance(batch, PackedPairBatch):
                rows = np.asarray(sketcher.packed(model.params, batch), dtype=np.float32).reshape(len(index), -1)
            else:
                rows = np.asarray(sketcher.fn(model.params, *batch), dtype=np.float32)
            check_finite(rows, index, pairs)
            idx = index[index >= 0]
            buf_rows.append(rows[index >= 0])
            # The sentences and their token counts travel with each row, so an offline analysis
            # (surface controls, attribution queries) needs nothing but the store.
            buf_meta.extend({"UID": pairs[i].UID, "pairID": pairs[i].pairID, "field": pairs[i].field,
                             "linguistics_term": pairs[i].linguistics_term,
                             "sentence_good": pairs[i].sentence_good, "sentence_bad": pairs[i].sentence_bad,
                             "n_tokens_good": int(len(good[i])), "n_tokens_bad": int(len(bad[i]))}
                            for i in idx)
            done += n_valid
            n_batches += 1
            if progress is not None:
                progress(n_valid)
            if sum(len(r) for r in buf_rows) >= opts.shard_rows:
                flush()
        flush()
    elapsed = time.perf_counter() - t0
    return {"pairs": done, "seconds": elapsed, "pairs_per_s": done / max(elapsed, 1e-9), "k": sketcher.k,
            "method": opts.method, "rows_total": writer.rows_done, "complete": writer.rows_done == total,
            "workdir": workdir}


def _check_committed_rows(workdir: str, n: int, expected: Sequence[Any]) -> None:
    """A resumed store's committed rows must be the first `n` pairs of this run's batch order: a
    different tokenizer or batching would otherwise append rows that repeat or skip pairs."""
    from lmgrad.store import Store, StoreMismatchError

    got = [(r["UID"], r["pairID"]) for r in Store(workdir, verify=False).meta_records()]
    want = [(p.UID, p.pairID) for p in expected[:n]]
    if len(got) != n or got != want:
        j = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise StoreMismatchError(
            f"lmgrad.store: refusing to resume {workdir}: committed row {j} is pair "
            f"{got[j] if j < len(got) else None}, but this run puts {want[j] if j < len(want) else None} there "
            "(the pairs are batched in another order: another tokenizer, batch size or lmgrad version?); "
            "use a new workdir")


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with explicit values where given (arguments, else the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); otherwise JAX detects
    TPU pods, SLURM and MPI itself."""
    env = os.environ
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"),
                               num_processes=num_processes, process_id=process_id)


def run(inputs: InputOptions, options: SketchOptions, workdir: str | os.PathLike, *,
        resume: bool = False, model: LoadedModel | None = None, tasks: Sequence[Task] | None = None,
        num_devices: int | None = None, max_batches: int | None = None, progress: bool = True,
        desc: str = "sketching") -> dict[str, Any]:
    """The sketch stage: selects the pairs and loads the model (unless given), sketches every pair
    into the store at `workdir` (this process's share of the batches in a multi-host run), and
    returns timing facts. `resume=True` continues a killed run in `workdir`."""
    from tqdm import tqdm

    tasks = inputs.select_tasks() if tasks is None else tasks
    mesh = inputs.make_mesh(num_devices)
    model = inputs.load_model(mesh) if model is None else model
    n = sum(len(t) for t in tasks)
    resolved = options.resolve(model)
    log.info("sketch method: %s", resolved.method)
    with tqdm(total=n, unit="pair", desc=f"{desc} ({resolved.method}, seed {resolved.projection_seed})",
              disable=not progress) as bar:
        return sketch_pairs(model, tasks, workdir, resolved, bos=inputs.bos, resume=resume,
                            mesh=mesh, progress=bar.update, max_batches=max_batches,
                            process_index=jax.process_index(), process_count=jax.process_count())
