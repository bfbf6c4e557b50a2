"""The probe stage: transfer-based task spaces by fine-tuning via gradient differentials (FTGD).

For every selected task i the model is tuned on i's training pairs (FTGD: the update lowers the
margin objective, restricted to the top-p fraction of parameters by |mean differential| of i), and
every task j's held-out pairs are scored before and after:

    T[i, j] = eval_j(after tuning on i) − eval_j(before)      (accuracy and mean log-prob margin)

Tasks are tuned `task_batch` at a time by one jit(vmap) step over stacked parameter copies
(`lmgrad.transfer.tune`); each group is evaluated and dropped before the next, so memory holds one
group. Also measured: neutral-text perplexity of every tuned model (the collapse guard), the same
tuning without the mask (FTGD vs plain fine-tuning), one-step SGD transfer at small step sizes
against the first-order prediction η⟨h_j, M_i ⊙ ∇L_i⟩, the overlap of the top-p masks, the
hypothesis test with surface controls, and how well gradient alignment and mask overlap rank
auxiliary tasks. Outputs: transfer.npz, stats.json, figures, report.md.

A killed run resumes: each finished part (a task's gradients and mask, the evaluation before tuning,
each tuned group's evaluation) is written atomically under WORKDIR/progress/ as it completes, and a
rerun with the same workdir loads them instead of recomputing (`Progress`); a rerun with other
options, inputs, model or tasks is refused by field. The directory is removed once the outputs are
written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any, Sequence

import numpy as np

from lmgrad import io as lio
from lmgrad import provenance
from lmgrad.jobs.inputs import InputOptions
from lmgrad.jobs.schema import check_choices, differences, nested, option, to_dict
from lmgrad.models.loading import LoadedModel, logits_fn
from lmgrad.params import flatten, select as select_params, split as split_params
from lmgrad.sharding import place, rows_for
from lmgrad.tasks import Task, encode
from lmgrad.transfer import objective as tobj
from lmgrad.transfer import predict as tpred
from lmgrad.transfer import tune as ttune

log = logging.getLogger(__name__)

EXACT_PREDICT_PARAMS = 5_000_000   # below: exact inner products; above: one sparse-JL sketch
_T = ttune.TuneSpec()


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """How tasks are tuned and what is measured. Where Weber et al. (2024) are silent (objective,
    optimiser, p, step counts), the choice is a flag and the report says what was used."""

    objective: str = option(_T.objective, "Margin objective: plain (the differential ℓ(good) − ℓ(bad), "
                            "unbounded), logistic (τ·softplus(−m/τ)) or hinge (max(0, γ − m)).",
                            choices=tobj.OBJECTIVES)
    logistic_scale: float = option(_T.logistic_scale, "Logistic objective's temperature τ (nats).")
    hinge_margin: float = option(_T.hinge_margin, "Hinge objective's margin γ (nats).")
    top_p: float = option(0.05, "FTGD mask: fraction of the selected parameters updated, the largest "
                          "|mean differential| of the task (global top-p; 1 = no mask).")
    optimizer: str = option(_T.optimizer, "optax optimiser.", choices=ttune.OPTIMIZERS)
    learning_rate: float = option(_T.learning_rate, "Peak learning rate.")
    steps: int = option(_T.steps, "Tuning steps per task.")
    batch_size: int = option(_T.batch_size, "Training pairs per step.")
    schedule: str = option(_T.schedule, "Learning-rate schedule after warm-up.", choices=ttune.SCHEDULES)
    warmup_steps: int = option(_T.warmup_steps, "Linear warm-up steps.")
    weight_decay: float = option(_T.weight_decay, "adamw's decoupled weight decay (masked too).")
    task_batch: int = option(_T.task_batch, "Tasks tuned at once by one vmapped step (stacked parameter "
                             "copies; memory ∝ task_batch); 1 = sequential, one compiled step reused.")
    held_out: int = option(4, "Held-out pairs per task (never tuned on); the rest are training pairs.")
    split_seed: int = option(0, "Seed of each task's train/held-out split and batch order.")
    include: tuple[str, ...] = option((), "HF parameter-name patterns that may be tuned (empty = all).")
    exclude: tuple[str, ...] = option((), "HF parameter-name patterns never tuned.")
    from_first_difference: bool = option(False, "Score tokens only from the first differing token.")
    neutral: str = option("auto", "Neutral text for the perplexity guard: auto (acceptable sentences of "
                          "BLiMP paradigms not tuned on; the tasks' held-out good sentences if none), "
                          "heldout, or a text file (one sentence per line).")
    neutral_sentences: int = option(64, "At most this many neutral sentences (seeded sample).")
    compare_unmasked: bool = option(True, "Also tune every task without the mask (p = 1) for FTGD vs "
                                    "plain fine-tuning.")
    first_order_lrs: tuple[float, ...] = option((1e-4, 1e-3), "Step sizes of one-step SGD probes "
                                                "(full training batch) compared with the first-order "
                                                "prediction; empty = none.")
    predict_k: int = option(0, "Sketch width for gradient inner products (0: exact below "
                            f"{EXACT_PREDICT_PARAMS // 10**6}M tuned parameters, else 8192).")
    hypothesis: str = option("linguistics_term", "Task metadata field grouping tasks for the hypothesis test.",
                             choices=("linguistics_term", "field"))
    n_perm: int = option(999, "Permutations for p-values.")
    resample_seed: int = option(0, "Seed of the permutations.")
    eval_batch_size: int = option(16, "Sentences per evaluation batch (packed: on average; pairs per "
                                  "task-gradient batch).")
    pack: bool = option(_T.pack, "Pack pairs (tuning steps, task gradients) and sentences (evaluation) side "
                        "by side into rows of one shape: one compile per function and little padding; "
                        "False: right-padded length buckets.")
    save_tuned: bool = option(False, "Save each tuned model's parameters (orbax) under WORKDIR/tuned/UID.")

    def __post_init__(self) -> None:
        check_choices(self)
        tobj.check_top_p(self.top_p)
        if self.held_out < 1:
            raise ValueError(f"ProbeOptions.held_out must be >= 1, got {self.held_out}")
        for lr in self.first_order_lrs:
            if not lr > 0:
                raise ValueError(f"ProbeOptions.first_order_lrs must be positive, got {lr}")
        self.tune_spec()   # validates the tuning fields

    def tune_spec(self, **changes: Any) -> ttune.TuneSpec:
        fields = {f.name for f in dataclasses.fields(ttune.TuneSpec)} - {"seed"}
        return ttune.TuneSpec(**{**{n: getattr(self, n) for n in fields}, "seed": self.split_seed, **changes})


# ----------------------------------------------------------------------------------- helpers
def neutral_texts(opts: ProbeOptions, tasks: Sequence[Task], held: dict[str, list[Any]],
                  blimp_dir: str | None) -> tuple[list[str], str]:
    """The neutral sentences and a description of where they come from."""
    rng = np.random.default_rng([opts.split_seed, 7])

    def sample(texts: list[str]) -> list[str]:
        texts = sorted(set(texts))
        if len(texts) > opts.neutral_sentences:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), opts.neutral_sentences, replace=False))]
        return texts

    if opts.neutral not in ("auto", "heldout"):
        path = pathlib.Path(opts.neutral)
        if not path.is_file():
            raise ValueError(f"ProbeOptions.neutral: {path} is not a file (auto, heldout or a text file)")
        lines = [s.strip() for s in path.read_text().splitlines() if s.strip()]
        if not lines:
            raise ValueError(f"ProbeOptions.neutral: {path} has no non-empty line")
        return sample(lines), f"file {path}"
    if opts.neutral == "auto":
        from lmgrad.tasks import BLIMP_UIDS, load_blimp

        tuned = {t.uid for t in tasks}
        others = [u for u in BLIMP_UIDS if u not in tuned]
        if others:
            pick = sorted(rng.choice(len(others), min(len(others), 8), replace=False))
            texts = [p.sentence_good for t in load_blimp([others[i] for i in pick], blimp_dir=blimp_dir)
                     for p in t.pairs[:50]]
            return sample(texts), "acceptable sentences of BLiMP paradigms not tuned on: " + \
                ", ".join(others[i] for i in pick)
    return sample([p.sentence_good for ps in held.values() for p in ps]), "held-out acceptable sentences"


@dataclasses.dataclass(frozen=True)
class ProbeJobOptions:
    """What a probe config file holds: the inputs and the probe options."""

    inputs: InputOptions = nested(InputOptions, "Model and pair sample.")
    probe: ProbeOptions = nested(ProbeOptions, "FTGD tuning and the transfer analysis.")


def _sym(m: np.ndarray) -> np.ndarray:
    s = (m + m.T) / 2
    np.fill_diagonal(s, 0.0)
    return s


def _save_tuned(root: pathlib.Path, uid: str, trainable: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    path = (root / uid).resolve()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, {n: np.asarray(v) for n, v in trainable.items()}, force=True)
    ckpt.wait_until_finished()


class ProbeResumeError(ValueError):
    """The workdir holds an unfinished probe run made with other settings."""


class Progress:
    """The finished parts of one probe run, WORKDIR/progress/<part>.npz, each written atomically
    once complete; `key` (options, inputs, model provenance, tasks) is recorded at the first start
    and must match on a resume."""

    def __init__(self, root: pathlib.Path, key: dict[str, Any]):
        from lmgrad.analysis.stats import jsonable

        self.root = root
        key = json.loads(json.dumps(jsonable(key), default=str))
        record = root / "run.json"
        if record.exists():
            diffs = differences(json.loads(record.read_text()), key, got_name="this run",
                                want_name="unfinished run")
            if diffs:
                raise ProbeResumeError(f"{root}: an unfinished probe run with other settings is here "
                                       f"({'; '.join(diffs[:6])}); use another --workdir, or delete {root} "
                                       "to start over")
        else:
            root.mkdir(parents=True, exist_ok=True)
            lio.write_json(record, key)
        self.loaded: dict[str, int] = {}

    def load(self, part: str) -> dict[str, np.ndarray] | None:
        path = self.root / f"{part}.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        stage = part.split("/")[0]
        self.loaded[stage] = self.loaded.get(stage, 0) + 1
        return out

    def save(self, part: str, **arrays: Any) -> None:
        path = self.root / f"{part}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        lio.write_npz(path, **arrays)

    def groups(self, phase: str) -> dict[int, dict[str, np.ndarray]]:
        """The saved evaluations of `phase`'s tuned groups, by group index."""
        d = self.root / phase
        found = sorted(d.glob("group_*.npz")) if d.is_dir() else []
        return {int(f.stem.split("_")[1]): self.load(f"{phase}/{f.stem}") for f in found}

    def finish(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _tune_and_eval(apply_fn, params, selected, train, masks, spec, ev, scorer, frozen, opts, *,
                   save_dir: pathlib.Path | None = None, desc: str = "", progress: bool = True,
                   step: Any = None, mesh: Any = None, state: Progress | None = None,
                   phase: str = "") -> dict[str, Any]:
    """Tunes every task and evaluates each tuned model on `ev`; rows in task order (NaN: failed).
    Groups saved under `state`'s `phase` are loaded, not tuned again; each new one is saved."""
    from tqdm import tqdm

    t = len(train)
    n_eval = len(ev.uids)
    acc = np.full((t, n_eval), np.nan)
    mar = np.full((t, n_eval), np.nan)
    ppl = np.full(t, np.nan)
    losses = np.full((t, spec.steps), np.nan)
    failed: dict[str, str] = {}
    index = {e.uid: i for i, e in enumerate(train)}

    def fill(uids, a, m, p, ls) -> None:
        for r, uid in enumerate(uids):
            i = index[str(uid)]
            acc[i], mar[i], ppl[i], losses[i] = a[r], m[r], p[r], ls[r]

    done = state.groups(phase) if state is not None else {}
    for saved in done.values():
        fill(saved["uids"], saved["accuracy"], saved["margin"], saved["perplexity"], saved["losses"])
        failed.update(json.loads(str(saved["failed"])))
    t0 = time.perf_counter()
    with tqdm(total=t, unit="task", desc=desc, disable=not progress) as bar:
        for group in ttune.tune_tasks(apply_fn, params, selected, train, masks, spec, progress=bar.update,
                                         step=step, mesh=mesh, skip=set(done)):
            failed.update(group.failed)
            n_eval = len(ev.uids)
            e = (ttune.evaluate(scorer, group.trainable, frozen, ev, batch_size=opts.eval_batch_size,
                                pack=opts.pack, mesh=mesh) if group.uids else
                 ttune.Evaluation(np.zeros((0, n_eval)), np.zeros((0, n_eval)), np.zeros(0)))
            fill(group.uids, e.accuracy, e.margin, e.perplexity, group.losses)
            if save_dir is not None:
                for r, uid in enumerate(group.uids):
                    _save_tuned(save_dir, uid, {n: v[r] for n, v in group.trainable.items()})
            if state is not None:
                state.save(f"{phase}/group_{group.index:05d}", uids=np.asarray(group.uids, dtype=str),
                           accuracy=e.accuracy, margin=e.margin, perplexity=e.perplexity,
                           losses=np.asarray(group.losses).reshape(len(group.uids), spec.steps),
                           failed=np.asarray(json.dumps(group.failed)))
    return {"accuracy": acc, "margin": mar, "perplexity": ppl, "losses": losses, "failed": failed,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------- the stage
def check_mesh(inputs: InputOptions, options: ProbeOptions) -> Any:
    """The probe's mesh (`inputs.mesh`), once its batches are known to split over the data axis:
    packed rows are padded to, bucketed batch sizes must be, a multiple of it (a ValueError names
    the flag). Callers that run the probe later (a sweep) check before any work."""
    mesh = inputs.make_mesh()
    if not options.pack:
        ttune.check_rows("--batch_size", options.batch_size, mesh)
        ttune.check_rows("--eval_batch_size", options.eval_batch_size, mesh)
    return mesh


def run(inputs: InputOptions, options: ProbeOptions, workdir: str | os.PathLike, *,
        model: LoadedModel | None = None, tasks: Sequence[Task] | None = None, progress: bool = True,
        target: str | None = None) -> dict[str, Any]:
    """The probe stage; writes WORKDIR/{transfer.npz, stats.json, report.md, *.png} and returns
    the stats (with `ranking` for `target`, a task uid, when given).

    Every batch (task gradients, tuning steps, evaluation) is split over the data axis of the mesh
    `inputs.mesh` names (default: every local device on data), and the parameters are placed by the
    sharding rules (replicated, or sharded over fsdp). A given `model` is placed there too: a copy
    when it lives elsewhere (the caller's stays allocated while the probe runs)."""
    t_start = time.perf_counter()
    opts = options
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tasks = list(inputs.select_tasks() if tasks is None else tasks)
    if len(tasks) < 2:
        raise ValueError(f"the probe needs >= 2 tasks, got {[t.uid for t in tasks]}")
    uids = [t.uid for t in tasks]
    if target is not None and target not in uids:
        raise ValueError(f"--target={target!r} is not among the selected tasks {uids}")
    mesh = check_mesh(inputs, opts)
    model = inputs.load_model(mesh) if model is None else model
    model = dataclasses.replace(model, params=place(model.params, mesh))
    if model.tokenizer is None:
        raise ValueError(f"{model.spec}: model was loaded without a tokenizer")
    timings: dict[str, float] = {}
    spec = opts.tune_spec()

    # Splits and encodings.
    enc = dict(bos=inputs.bos, max_length=model.max_length, from_first_difference=opts.from_first_difference)
    train, held, held_pairs = [], [], {}
    for t in tasks:
        tr, he = ttune.split_pairs(t.uid, t.pairs, opts.held_out, seed=opts.split_seed)
        train.append(ttune.encode_task_pairs(model.tokenizer, t.uid, tr, **enc))
        held.append(ttune.encode_task_pairs(model.tokenizer, t.uid, he, **enc))
        held_pairs[t.uid] = he
        if len(train[-1]) == 0:
            raise ValueError(f"task {t.uid!r}: empty training split (every training pair tokenises identically)")
        if len(held[-1]) == 0:
            raise ValueError(f"task {t.uid!r}: empty held-out split (every held-out pair tokenises identically)")
    texts, neutral_source = neutral_texts(opts, tasks, held_pairs, inputs.blimp_dir or None)
    neutral = encode(model.tokenizer, texts, bos=inputs.bos, max_length=model.max_length)
    ev = ttune.EvalSet.build(held, neutral)

    apply_fn = logits_fn(model)
    names = list(flatten(model.params))
    selected = select_params(names, list(opts.include) or None, list(opts.exclude) or None)
    shapes = {n: tuple(np.shape(flatten(model.params)[n])) for n in selected}
    n_params = int(sum(int(np.prod(s)) for s in shapes.values()))
    k = opts.predict_k or (0 if n_params <= EXACT_PREDICT_PARAMS else 8192)
    projector = None
    if k:
        from lmgrad.sketch import make_projector

        projector = make_projector("sjlt", k, opts.resample_seed)
    state = Progress(workdir / "progress", {
        "options": to_dict(opts), "inputs": {f: v for f, v in to_dict(inputs).items() if f != "mesh"},
        "model": model.provenance, "tasks": uids})
    order = sorted(shapes)

    # Task gradients: masks, first-order vectors.
    t0 = time.perf_counter()
    diff_fn = tpred.make_task_grad_fn(apply_fn, packed=opts.pack)
    obj_fn = diff_fn if opts.objective == "plain" else tpred.make_task_grad_fn(apply_fn, spec, packed=opts.pack)
    masks, packed, upd_m, upd_u, tgt, gvec = [], [], [], [], [], []
    gb = dict(batch_size=opts.eval_batch_size, max_len=model.max_length,
              packing=ttune.pair_packing(train + held, opts.eval_batch_size) if opts.pack else None, mesh=mesh)
    sizes = np.cumsum([int(np.prod(shapes[n])) for n in order])[:-1]
    for i, (tr_, he_) in enumerate(zip(train, held)):
        part = f"gradients/task_{i:05d}"
        saved = state.load(part)
        if saved is None:
            g = tpred.task_gradient(diff_fn, model.params, selected, tr_, **gb)
            if not all(np.isfinite(v).all() for v in g.values()):
                raise FloatingPointError(f"task {tr_.uid!r}: non-finite mean differential on its training pairs")
            mask = tobj.top_p_mask(g, opts.top_p) if opts.top_p < 1 else None
            gl = g if obj_fn is diff_fn else tpred.task_gradient(obj_fn, model.params, selected, tr_, **gb)
            held_g = tpred.task_gradient(diff_fn, model.params, selected, he_, **gb)
            saved = dict(upd_m=tpred.vectorize(gl, projector, mask), upd_u=tpred.vectorize(gl, projector),
                         gvec=tpred.vectorize(g, projector), tgt=tpred.vectorize(held_g, projector),
                         masked=np.asarray(mask is not None),   # the mask as bits in sorted-name order
                         mask_bits=np.packbits(np.concatenate([mask[n].ravel() for n in order])
                                               if mask is not None else np.zeros(0, bool)))
            state.save(part, uid=np.asarray(tr_.uid), **saved)
            del g, gl, held_g, mask
        mask = None       # a fresh run reads its masks back from the bits too, as a resumed one does
        if bool(saved["masked"]):
            bits = np.split(np.unpackbits(saved["mask_bits"], count=n_params).astype(bool), sizes)
            mask = {n: b.reshape(shapes[n]) for n, b in zip(order, bits)}
        masks.append(mask)
        packed.append(tobj.pack_mask(mask if mask is not None else {n: np.ones(s, bool) for n, s in shapes.items()}))
        for out, name in ((upd_m, "upd_m"), (upd_u, "upd_u"), (gvec, "gvec"), (tgt, "tgt")):
            out.append(saved[name])
    pred_m = tpred.first_order_matrix(upd_m, tgt)
    pred_u = tpred.first_order_matrix(upd_u, tgt)
    grad_cos = tpred.cosine_matrix(gvec)
    timings["gradients"] = time.perf_counter() - t0

    # Before.
    scorer = ttune.make_group_scorer(apply_fn)
    trainable0, frozen = split_params(model.params, selected)
    t0 = time.perf_counter()
    saved = state.load("before")
    if saved is None:
        before = ttune.evaluate(scorer, ttune.stack([trainable0]), frozen, ev, batch_size=opts.eval_batch_size,
                                pack=opts.pack, mesh=mesh)
        saved = dict(accuracy=before.accuracy[0], margin=before.margin[0], perplexity=before.perplexity[0])
        state.save("before", **saved)
    acc0, mar0, ppl0 = saved["accuracy"], saved["margin"], float(saved["perplexity"])
    timings["evaluate_before"] = time.perf_counter() - t0

    # FTGD.
    save_dir = workdir / "tuned" if opts.save_tuned else None
    common = dict(ev=ev, scorer=scorer, frozen=frozen, opts=opts, progress=progress, mesh=mesh, state=state)
    step = ttune.make_group_step(apply_fn, spec)    # compiled once, shared by FTGD and unmasked tuning
    ftgd = _tune_and_eval(apply_fn, model.params, selected, train, masks, spec, save_dir=save_dir,
                          desc=f"FTGD (p={opts.top_p})", step=step, phase="ftgd", **common)
    timings["ftgd"] = ftgd["seconds"]
    unmasked = None
    if opts.compare_unmasked and opts.top_p < 1:
        unmasked = _tune_and_eval(apply_fn, model.params, selected, train, [None] * len(train), spec,
                                  desc="unmasked", step=step, phase="unmasked", **common)
        timings["unmasked"] = unmasked["seconds"]
    one_step = []
    full_batch = rows_for(max(len(t) for t in train), mesh)   # all pairs; rows split evenly
    for lr in opts.first_order_lrs:
        s1 = opts.tune_spec(optimizer="sgd", learning_rate=lr, steps=1, batch_size=full_batch, schedule="constant",
                            warmup_steps=0)
        r = _tune_and_eval(apply_fn, model.params, selected, train, masks, s1, desc=f"one step, η={lr:g}",
                           phase=f"one_step_{lr:g}", **common)
        one_step.append((lr, r))
        timings[f"one_step_{lr:g}"] = r["seconds"]

    # Spaces and statistics.
    t0 = time.perf_counter()
    T_acc = ftgd["accuracy"] - acc0[None]
    T_mar = ftgd["margin"] - mar0[None]
    overlap = tpred.mask_overlap(packed, selected)
    one_step_delta = [(lr, r["margin"] - mar0[None]) for lr, r in one_step]
    stats = analyse(opts, tasks, uids, T_acc, T_mar, pred_m, pred_u, grad_cos, overlap, one_step_delta,
                    train, held)
    timings["analysis"] = time.perf_counter() - t0
    failed = {**ftgd["failed"], **({f"{u} (unmasked)": v for u, v in unmasked["failed"].items()} if unmasked else {})}
    own = np.diag(T_mar)
    summary = {
        "tasks": uids, "n_train": [len(t) for t in train], "n_held_out": [len(h) for h in held],
        "n_tuned_params": n_params, "n_masked_params": tobj.n_kept(n_params, opts.top_p),
        "inner_products": "exact" if projector is None else f"sjlt k={k}",
        "neutral": {"source": neutral_source, "sentences": len(neutral), "tokens": ev.neutral_tokens},
        "before": {"accuracy": acc0, "margin": mar0, "perplexity": ppl0},
        "ftgd": {"own_accuracy_after": np.diag(ftgd["accuracy"]), "own_margin_gain": own,
                 "own_accuracy_gain": np.diag(T_acc), "perplexity_after": ftgd["perplexity"],
                 "perplexity_change": ftgd["perplexity"] / ppl0 - 1,
                 "mean_own_margin_gain": _nanmean(own), "mean_own_accuracy_gain": _nanmean(np.diag(T_acc)),
                 "mean_offdiag_margin_change": _nanmean(T_mar[~np.eye(len(uids), dtype=bool)]),
                 "median_perplexity_change": _nanmedian(ftgd["perplexity"] / ppl0 - 1)},
        "failed": failed,
    }
    if unmasked is not None:
        u_mar = unmasked["margin"] - mar0[None]
        u_acc = unmasked["accuracy"] - acc0[None]
        summary["unmasked"] = {
            "own_margin_gain": np.diag(u_mar), "own_accuracy_gain": np.diag(u_acc),
            "perplexity_after": unmasked["perplexity"], "perplexity_change": unmasked["perplexity"] / ppl0 - 1,
            "mean_own_margin_gain": _nanmean(np.diag(u_mar)), "mean_own_accuracy_gain": _nanmean(np.diag(u_acc)),
            "mean_offdiag_margin_change": _nanmean(u_mar[~np.eye(len(uids), dtype=bool)]),
            "median_perplexity_change": _nanmedian(unmasked["perplexity"] / ppl0 - 1)}
    ranking = None
    if target is not None:
        j = uids.index(target)
        ranking = {name: [uids[i] for i in tpred.rank_candidates(mat, j)]
                   for name, mat in (("gradient_alignment_masked", pred_m), ("gradient_alignment", pred_u),
                                     ("mask_overlap", overlap["overall"]), ("measured_margin", T_mar))}
    result = {"options": to_dict(opts), "inputs": to_dict(inputs), "model": model.provenance,
              "tune": dataclasses.asdict(spec), "summary": summary, "stats": stats, "timings": timings,
              "lmgrad_version": provenance.lmgrad.__version__, "run": provenance.run_info()}
    if ranking is not None:
        result["ranking"] = {"target": target, **ranking}
    arrays = dict(tasks=np.asarray(uids), transfer_accuracy=T_acc, transfer_margin=T_mar,
                  before_accuracy=acc0, before_margin=mar0, before_perplexity=np.float64(ppl0),
                  after_accuracy=ftgd["accuracy"], after_margin=ftgd["margin"], after_perplexity=ftgd["perplexity"],
                  train_losses=ftgd["losses"], predicted_masked=pred_m, predicted_unmasked=pred_u,
                  gradient_cosine=grad_cos, mask_jaccard=overlap["overall"],
                  **{f"mask_jaccard_type_{g}": m for g, m in overlap["type"].items()},
                  **{f"mask_jaccard_layer_{g.replace(' ', '_')}": m for g, m in overlap["layer"].items()})
    if unmasked is not None:
        arrays.update(unmasked_transfer_margin=unmasked["margin"] - mar0[None],
                      unmasked_transfer_accuracy=unmasked["accuracy"] - acc0[None],
                      unmasked_after_perplexity=unmasked["perplexity"])
    if one_step:
        arrays.update(one_step_lrs=np.asarray([lr for lr, _ in one_step]),
                      one_step_transfer_margin=np.stack([r["margin"] - mar0[None] for _, r in one_step]))
    lio.write_npz(workdir / "transfer.npz", **arrays)
    from lmgrad.analysis.stats import jsonable

    lio.write_json(workdir / "stats.json", jsonable(result))
    figures(workdir, uids, T_mar, pred_m, overlap["overall"], one_step_delta)
    lio.write_text(workdir / "report.md", report(result, uids))
    timings["total"] = time.perf_counter() - t_start
    result["resumed"] = dict(state.loaded)   # parts of an earlier, killed run that were loaded
    lio.write_json(workdir / "stats.json", jsonable(result))
    state.finish()
    return result


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _nanmedian(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.nanmedian(x)) if np.isfinite(x).any() else None


def analyse(opts: ProbeOptions, tasks: Sequence[Task], uids: list[str], T_acc: np.ndarray, T_mar: np.ndarray,
            pred_m: np.ndarray, pred_u: np.ndarray, grad_cos: np.ndarray, overlap: dict[str, Any],
            one_step: list[tuple[float, np.ndarray]], train: Sequence[Any], held: Sequence[Any]) -> dict[str, Any]:
    """Agreement of the gradient space with the transfer space, the hypothesis test with surface
    controls, and auxiliary-task ranking quality."""
    q = dict(n_perm=opts.n_perm, seed=opts.resample_seed)
    out: dict[str, Any] = {}
    agree = {}
    for name, pred in (("masked", pred_m), ("unmasked", pred_u), ("cosine", grad_cos),
                       ("mask_overlap", overlap["overall"])):
        agree[name] = {"ftgd_margin": tpred.qap_correlation(pred, T_mar, **q),
                       "ftgd_margin_with_diagonal": tpred.qap_correlation(pred, T_mar, diagonal=True, **q),
                       "ftgd_margin_spearman": tpred.qap_correlation(pred, T_mar, method="spearman", **q),
                       "ftgd_accuracy": tpred.qap_correlation(pred, T_acc, **q)}
    out["agreement"] = agree
    per_step = []
    for lr, delta in one_step:
        entry: dict[str, Any] = {"lr": lr}
        for name, pred in (("masked", pred_m), ("unmasked", pred_u)):
            ok = np.isfinite(delta)
            x, y = lr * pred[ok], delta[ok]
            slope = float(x @ y / (x @ x)) if (x @ x) > 0 else None
            entry[name] = {"offdiag": tpred.qap_correlation(pred, delta, **q),
                           "with_diagonal": tpred.qap_correlation(pred, delta, diagonal=True, **q),
                           "slope_measured_on_predicted": slope,
                           "relative_error": float(np.linalg.norm(y - x) / max(np.linalg.norm(y), 1e-30))}
        per_step.append(entry)
    out["one_step"] = per_step
    # Ranking of auxiliary tasks.
    preds = {"gradient_alignment_masked": pred_m, "gradient_alignment": pred_u, "gradient_cosine": grad_cos,
             "mask_overlap": overlap["overall"]}
    out["ranking_margin"] = tpred.ranking_quality(T_mar, preds, k=3)
    out["ranking_accuracy"] = tpred.ranking_quality(T_acc, preds, k=3)
    # Hypothesis test with surface controls, on symmetrised spaces.
    out["hypothesis"] = hypothesis_tests(opts, tasks, uids, {
        "transfer_margin": _sym(T_mar), "transfer_accuracy": _sym(T_acc), "mask_overlap": _sym(overlap["overall"]),
        "gradient_cosine": _sym(grad_cos)}, train, held)
    return out


def hypothesis_tests(opts: ProbeOptions, tasks: Sequence[Task], uids: list[str], spaces: dict[str, np.ndarray],
                     train: Sequence[Any], held: Sequence[Any]) -> dict[str, Any]:
    """Each (symmetrised) space against the taxonomy: Mantel, and MRQAP (Freedman–Lane) with the
    surface spaces (`lmgrad.analysis.surface`) as controls. Needs >= 4 tasks and 2+ categories."""
    from lmgrad.analysis.hypothesis import categorical
    from lmgrad.analysis.stats import mantel
    from lmgrad.analysis.surface import mrqap, surface_spaces

    cats = [getattr(t, opts.hypothesis) or "?" for t in tasks]
    if len(tasks) < 4 or len(set(cats)) < 2 or len(set(cats)) == len(cats):
        return {"skipped": f"needs >= 4 tasks and categories shared by some but not all tasks "
                           f"({len(tasks)} tasks, {len(set(cats))} categories)"}
    hyp = categorical(uids, cats, opts.hypothesis)
    pairs = {t.uid: [(p.sentence_good, p.sentence_bad) for p in tr.pairs + he.pairs]
             for t, tr, he in zip(tasks, train, held)}
    surf = surface_spaces(pairs)
    order = [list(surf.names).index(u) for u in uids]
    controls = {n: np.nan_to_num(m[np.ix_(order, order)], nan=0.0) for n, m in surf.spaces.items()}
    out: dict[str, Any] = {"hypothesis": opts.hypothesis, "controls": sorted(controls),
                           "n_categories": len(set(cats)), "spaces": {}}
    off = ~np.eye(len(uids), dtype=bool)
    for name, sp in spaces.items():
        vals = sp[off][np.isfinite(sp[off])]
        if vals.size == 0 or np.ptp(vals) == 0:
            out["spaces"][name] = {"skipped": "constant off the diagonal (no task changed another's metric)",
                                   "within": None, "between": None}
            continue
        entry: dict[str, Any] = {"mantel": mantel(sp, hyp.matrix, n_perm=opts.n_perm, seed=opts.resample_seed).as_dict()}
        try:
            entry["mrqap"] = mrqap(sp, [hyp.matrix, *controls.values()], n_perm=opts.n_perm, seed=opts.resample_seed,
                                   names=uids).as_dict()
        except ValueError as e:
            entry["mrqap"] = {"skipped": str(e)}
        cat = np.asarray(cats)
        same = (cat[:, None] == cat[None, :]) & ~np.eye(len(cat), dtype=bool)
        diff = cat[:, None] != cat[None, :]
        entry["within"] = float(sp[same].mean()) if same.any() else None
        entry["between"] = float(sp[diff].mean()) if diff.any() else None
        out["spaces"][name] = entry
    return out


def figures(workdir: pathlib.Path, uids: list[str], T_mar: np.ndarray, pred_m: np.ndarray, jac: np.ndarray,
            one_step: list[tuple[float, np.ndarray]]) -> None:
    """transfer.png (the asymmetric margin transfer space), mask_overlap.png, first_order.png."""
    from matplotlib.figure import Figure

    t = len(uids)
    fs = max(4.0, min(8.0, 200 / max(t, 1)))
    for name, mat, title, cmap in (("transfer.png", T_mar, "Δ held-out margin of j (column) after tuning on i (row)",
                                    "RdBu_r"),
                                   ("mask_overlap.png", jac, "Jaccard overlap of top-p masks", "viridis")):
        fig = Figure(figsize=(0.25 * t + 4, 0.25 * t + 3))
        ax = fig.add_subplot(111)
        finite = mat[np.isfinite(mat)]
        if cmap == "RdBu_r":
            v = float(np.quantile(np.abs(finite), 0.98)) if finite.size else 1.0
            im = ax.imshow(mat, cmap=cmap, vmin=-v, vmax=v, interpolation="nearest")
        else:
            im = ax.imshow(mat, cmap=cmap, interpolation="nearest")
        ax.set_xticks(range(t), uids, rotation=90, fontsize=fs)
        ax.set_yticks(range(t), uids, fontsize=fs)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
        fig.tight_layout()
        fig.savefig(workdir / name, dpi=120)
    if one_step:
        fig = Figure(figsize=(4 * len(one_step), 3.6))
        for a, (lr, delta) in enumerate(one_step):
            ax = fig.add_subplot(1, len(one_step), a + 1)
            off = ~np.eye(t, dtype=bool)
            ax.scatter(lr * pred_m[off], delta[off], s=6, label="i ≠ j")
            ax.scatter(lr * np.diag(pred_m), np.diag(delta), s=10, c="C3", label="i = j")
            lim = np.nanmax(np.abs(np.concatenate([lr * pred_m.ravel(), delta[np.isfinite(delta)].ravel()])))
            ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.7)
            ax.set_xlabel("predicted η⟨h_j, M_i⊙∇L_i⟩", fontsize=8)
            ax.set_ylabel("measured Δ margin", fontsize=8)
            ax.set_title(f"one SGD step, η={lr:g}", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(workdir / "first_order.png", dpi=120)


def _f(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def _corr(c: dict[str, Any]) -> str:
    from lmgrad.analysis.stats import format_p

    return f"r = {_f(c.get('r'))} (p = {format_p(c.get('p'))}, {c.get('n')} entries)"


def report(result: dict[str, Any], uids: list[str]) -> str:
    """report.md: what was run, the transfer space, the collapse guard, FTGD vs unmasked, the
    first-order link, the hypothesis test with surface controls, and auxiliary-task ranking."""
    from lmgrad.analysis.stats import format_p, jsonable

    r = jsonable(result)
    o, s, st = r["options"], r["summary"], r["stats"]
    f, b = s["ftgd"], s["before"]
    lines = [
        "# Transfer-based task space (FTGD)", "",
        f"Model `{r['inputs']['model']}`, {len(uids)} tasks (`{r['inputs']['tasks']}`), "
        f"{sum(s['n_train'])} training and {sum(s['n_held_out'])} held-out pairs "
        f"({o['held_out']} held out per task, split seed {o['split_seed']}).", "",
        f"Tuning: objective **{o['objective']}**"
        + (f" (τ = {o['logistic_scale']})" if o["objective"] == "logistic" else "")
        + (f" (γ = {o['hinge_margin']})" if o["objective"] == "hinge" else "")
        + f", mask top-p = {o['top_p']} ({s['n_masked_params']:,} of {s['n_tuned_params']:,} parameters, global "
        f"ranking by |mean differential| on the task's training pairs), {o['optimizer']} lr {o['learning_rate']} "
        f"({o['schedule']}, warm-up {o['warmup_steps']}), {o['steps']} steps of {o['batch_size']} pairs, "
        f"{o['task_batch']} task(s) per vmapped step. Gradient inner products: {s['inner_products']}. "
        f"The plain objective is unbounded (it can be lowered by ruining the bad sentence); "
        f"Weber et al. (2024) do not say which variant they used, so it is a flag.", "",
        "## Own-task effect and the collapse guard", "",
        f"Neutral text: {s['neutral']['sentences']} sentences ({s['neutral']['tokens']} tokens), "
        f"{s['neutral']['source']}; perplexity before: {_f(b['perplexity'], '.2f')}.", "",
        "| tuning | mean own Δ accuracy | mean own Δ margin | mean off-diagonal Δ margin | median Δ perplexity |",
        "|---|---|---|---|---|",
        f"| FTGD (p = {o['top_p']}) | {_f(f['mean_own_accuracy_gain'])} | {_f(f['mean_own_margin_gain'])} | "
        f"{_f(f['mean_offdiag_margin_change'])} | {_f(f['median_perplexity_change'], '+.2%')} |",
    ]
    if "unmasked" in s:
        u = s["unmasked"]
        lines.append(f"| unmasked (p = 1) | {_f(u['mean_own_accuracy_gain'])} | {_f(u['mean_own_margin_gain'])} | "
                     f"{_f(u['mean_offdiag_margin_change'])} | {_f(u['median_perplexity_change'], '+.2%')} |")
    lines += ["", "Per task (held-out pairs of the tuned task itself):", "",
              "| task | acc before | acc after | Δ margin | Δ perplexity |"
              + (" unmasked Δ margin | unmasked Δ perplexity |" if "unmasked" in s else ""),
              "|---|---|---|---|---|" + ("---|---|" if "unmasked" in s else "")]
    for i, uid in enumerate(uids):
        row = (f"| {uid} | {_f(b['accuracy'][i], '.2f')} | {_f(f['own_accuracy_after'][i], '.2f')} | "
               f"{_f(f['own_margin_gain'][i], '+.3f')} | {_f(f['perplexity_change'][i], '+.2%')} |")
        if "unmasked" in s:
            row += f" {_f(s['unmasked']['own_margin_gain'][i], '+.3f')} | {_f(s['unmasked']['perplexity_change'][i], '+.2%')} |"
        lines.append(row)
    if s["failed"]:
        lines += ["", "**Failed (stopped, left out as NaN):** " + "; ".join(f"{k}: {v}" for k, v in s["failed"].items())]
    ag = st["agreement"]
    lines += ["", "## Does the gradient space predict the transfer space?", "",
              "Correlation over off-diagonal entries (i ≠ j) of T_margin with each predictor; p from a QAP "
              f"permutation of tasks ({o['n_perm']} permutations, one-sided).", "",
              "| predictor | vs Δ margin | vs Δ margin (Spearman) | vs Δ accuracy |", "|---|---|---|---|"]
    names = {"masked": "⟨h_j, M_i⊙∇L_i⟩ (masked)", "unmasked": "⟨h_j, ∇L_i⟩ (unmasked)",
             "cosine": "cosine of mean differentials", "mask_overlap": "mask Jaccard"}
    for k, v in ag.items():
        lines.append(f"| {names[k]} | {_corr(v['ftgd_margin'])} | {_corr(v['ftgd_margin_spearman'])} | "
                     f"{_corr(v['ftgd_accuracy'])} |")
    if st["one_step"]:
        lines += ["", "One SGD step on the full training set of i (the first-order regime, the same masks): "
                  "measured Δ margin of j vs η⟨h_j, M_i⊙∇L_i⟩.", "",
                  "| η | masked: r off-diag | masked: r incl. diagonal | slope measured/predicted | rel. error | "
                  "unmasked predictor: r off-diag |", "|---|---|---|---|---|---|"]
        for e in st["one_step"]:
            m, un = e["masked"], e["unmasked"]
            lines.append(f"| {e['lr']:g} | {_corr(m['offdiag'])} | {_corr(m['with_diagonal'])} | "
                         f"{_f(m['slope_measured_on_predicted'])} | {_f(m['relative_error'])} | {_corr(un['offdiag'])} |")
    hy = st["hypothesis"]
    lines += ["", f"## Hypothesis: tasks sharing a `{o['hypothesis']}` transfer more", ""]
    if "skipped" in hy:
        lines.append(f"Skipped: {hy['skipped']}.")
    else:
        lines += [f"Spaces symmetrised as (T + Tᵀ)/2, off-diagonal. MRQAP (Freedman–Lane) with surface controls "
                  f"{', '.join(hy['controls'])}.", "",
                  "| space | within | between | Mantel r (p) | MRQAP t (p) beyond surface |", "|---|---|---|---|---|"]
        for k, v in hy["spaces"].items():
            if "skipped" in v:
                lines.append(f"| {k} | n/a | n/a | {v['skipped']} | |")
                continue
            mq = v["mrqap"]
            mq_s = mq.get("skipped") or f"{_f(mq['statistic'], '.2f')} ({mq['p_text']})"
            lines.append(f"| {k} | {_f(v['within'])} | {_f(v['between'])} | {_f(v['mantel']['statistic'])} "
                         f"({format_p(v['mantel']['p_value'])}) | {mq_s} |")
    lines += ["", "## Auxiliary-task ranking", "",
              "For each target j, candidates i ≠ j ranked by the predictor; measured benefit T[i, j]. Mean "
              "Spearman over targets and precision at 3 (chance "
              f"{_f(st['ranking_margin']['chance_precision'], '.2f')}).", "",
              "| predictor | Spearman (margin) | P@3 (margin) | Spearman (accuracy) | P@3 (accuracy) |",
              "|---|---|---|---|---|"]
    for k, v in st["ranking_margin"]["predictors"].items():
        a = st["ranking_accuracy"]["predictors"][k]
        lines.append(f"| {k} | {_f(v['spearman_mean'])} | {_f(v['precision_at_k'], '.2f')} | "
                     f"{_f(a['spearman_mean'])} | {_f(a['precision_at_k'], '.2f')} |")
    if "ranking" in r:
        rk = r["ranking"]
        lines += ["", f"Ranking for target `{rk['target']}` (best first):", ""]
        for k, v in rk.items():
            if k != "target":
                lines.append(f"* {k}: {', '.join(v[:5])}")
    lines += ["", "Files: `transfer.npz` (T×T matrices, before/after per task), `stats.json`, `transfer.png`, "
              "`mask_overlap.png`" + (", `first_order.png`" if st["one_step"] else "") + ".",
              "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items()), ""]
    return "\n".join(lines)
