"""FTGD tuning of many tasks at once, and evaluation of the tuned models on held-out pairs.

One training step (`make_group_step`) is `jit(vmap(step))` over a *group* of G tasks: each task
has its own copy of the trainable parameters, its own optax state, its own top-p mask and its own
batch; the frozen parameters are shared (not copied). `tune_tasks` runs the tasks in groups of
`TuneSpec.task_batch`: G > 1 trades memory (G copies of parameters + optimiser state) for fewer,
larger programs; G = 1 is sequential tuning with the same single compiled step reused for every
task. The last group is padded with a repeat of its last task (results discarded), so every group
has one shape and the step compiles once. Each task's batches depend only on (seed, task uid), so a
task tuned in a group equals the task tuned alone (`tests/test_transfer.py`).

Masking: the gradient and the optimiser's update are both multiplied by the mask, so masked-out
parameters never move, whatever the optimiser (weight decay, momentum) would do.

Devices: with a `mesh`, every batch's rows are split over its data axis (`on_rows`) and the
parameters are wherever the caller placed them (replicated, or sharded over fsdp by
`lmgrad.sharding.place`); XLA partitions each compiled step accordingly and sums the gradients over
the data axis. Packed batches get their rows padded to a multiple of the data axis; bucketed ones
need a batch size that is one.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Callable, Container, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmgrad.grads.differential import pair_loss_diff
from lmgrad.params import split as split_params, unflatten
from lmgrad.sharding import DATA, data_size, rows_for
from lmgrad.scoring import token_logprobs
from lmgrad.tasks import (PAD_ID, Pair, PackedPairBatch, degenerate_pairs, encode_pairs, first_fit_rows, iter_bucketed,
                          iter_packed, iter_packed_pairs, make_batch, packed_pair_shape, packed_row_length)
from lmgrad.tasks.batching import bucket_length
from lmgrad.transfer.objective import OBJECTIVES, margin_loss

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")


# ----------------------------------------------------------------------------------- devices
def on_rows(arrays: Mapping[str, Any], mesh: Any, axis: int = 0) -> dict[str, Any]:
    """`arrays` with their rows (`axis`) split over `mesh`'s data axis and replicated over its other
    axes; unchanged without a mesh."""
    if mesh is None:
        return dict(arrays)
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA))
    return {k: jax.device_put(v, sharding) for k, v in arrays.items()}


def check_rows(what: str, n: int, mesh: Any) -> None:
    """A bucketed batch of `n` rows must split evenly over the data axis (packed rows are padded)."""
    d = data_size(mesh)
    if n % d:
        raise ValueError(f"{what}={n} is not a multiple of the mesh's data axis ({d}; --mesh, default every "
                         "local device on data): bucketed batches (pack=False) are split evenly over it; "
                         "choose a multiple, or pack")


@dataclasses.dataclass(frozen=True)
class TuneSpec:
    """How each task is tuned (the defaults of `lmgrad.jobs.probe.ProbeOptions` come from here)."""

    objective: str = "logistic"
    logistic_scale: float = 1.0
    hinge_margin: float = 1.0
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    steps: int = 10
    batch_size: int = 8
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    task_batch: int = 4
    seed: int = 0
    pack: bool = True

    def __post_init__(self) -> None:
        for name, choices in (("objective", OBJECTIVES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid: {', '.join(choices)}")
        for name in ("steps", "batch_size", "task_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or not np.isfinite(self.learning_rate):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.warmup_steps < 0 or (self.warmup_steps and self.warmup_steps >= self.steps):
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")

    def optimizer_fn(self) -> optax.GradientTransformation:
        """The optax transformation (schedule included)."""
        lr = self.learning_rate
        decay_steps = max(self.steps - self.warmup_steps, 1)
        if self.schedule == "constant":
            main = optax.constant_schedule(lr)
        elif self.schedule == "linear":
            main = optax.linear_schedule(lr, 0.0, decay_steps)
        else:
            main = optax.cosine_decay_schedule(lr, decay_steps)
        sched = (optax.join_schedules([optax.linear_schedule(0.0, lr, self.warmup_steps), main],
                                      [self.warmup_steps]) if self.warmup_steps else main)
        if self.optimizer == "sgd":
            return optax.sgd(sched)
        if self.optimizer == "adam":
            return optax.adam(sched)
        return optax.adamw(sched, weight_decay=self.weight_decay)


# ----------------------------------------------------------------------------------- data
@dataclasses.dataclass
class EncodedPairs:
    """One task's pairs as token ids (BOS prepended) with their first scored positions."""

    uid: str
    pairs: tuple[Pair, ...]
    good: list[np.ndarray]
    bad: list[np.ndarray]
    score_from_good: np.ndarray
    score_from_bad: np.ndarray

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def max_len(self) -> int:
        return max((max(len(g), len(b)) for g, b in zip(self.good, self.bad)), default=1)


def encode_task_pairs(tokenizer: Any, uid: str, pairs: Sequence[Pair], *, bos: str = "auto",
                      max_length: int | None = None, from_first_difference: bool = False) -> EncodedPairs:
    """Encodes `pairs`, dropping those whose sentences tokenise identically (no signal)."""
    pairs = tuple(pairs)
    if not pairs:
        return EncodedPairs(uid, (), [], [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    g, b, sg, sb = encode_pairs(tokenizer, pairs, bos=bos, max_length=max_length,
                                from_first_difference=from_first_difference)
    same = set(degenerate_pairs(g, b))
    keep = [i for i in range(len(pairs)) if i not in same]
    if same:
        log.warning("%s: dropping %d pair(s) that tokenise identically", uid, len(same))
    return EncodedPairs(uid, tuple(pairs[i] for i in keep), [g[i] for i in keep], [b[i] for i in keep],
                        sg[keep], sb[keep])


def split_pairs(uid: str, pairs: Sequence[Pair], n_held_out: int, *, seed: int = 0,
                min_train: int = 1) -> tuple[list[Pair], list[Pair]]:
    """Seeded (train, held-out) split of one task's pairs: `n_held_out` pairs held out.

    The permutation depends only on (seed, uid), so a task's split does not change when other
    tasks are added or removed.

    Raises:
      ValueError: fewer than n_held_out + min_train pairs (the message names the task).
    """
    if n_held_out < 1:
        raise ValueError(f"n_held_out must be >= 1, got {n_held_out}")
    pairs = list(pairs)
    if len(pairs) < n_held_out + min_train:
        raise ValueError(f"task {uid!r} has {len(pairs)} pair(s): too few for a held-out split of {n_held_out} "
                         f"plus at least {min_train} training pair(s); lower held_out or raise max_pairs_per_task")
    perm = np.random.default_rng([seed, zlib.crc32(uid.encode())]).permutation(len(pairs))
    held = sorted(perm[:n_held_out].tolist())
    train = sorted(perm[n_held_out:].tolist())
    return [pairs[i] for i in train], [pairs[i] for i in held]


def train_length(tasks: Sequence[EncodedPairs], max_len: int | None = None) -> int:
    """The one padded length T of every training batch (a power of two over all tasks)."""
    return bucket_length(max(t.max_len for t in tasks), max_len=max_len)


def _step_pairs(task: EncodedPairs, *, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The pair indices of each step: epochs of a seeded permutation (depending only on (seed, uid))."""
    n = len(task)
    if n == 0:
        raise ValueError(f"task {task.uid!r}: empty training split (no pairs to tune on)")
    rng = np.random.default_rng([seed, zlib.crc32(task.uid.encode()), 1])
    per = min(batch_size, n)
    order: list[int] = []
    while len(order) < steps * per:
        order.extend(rng.permutation(n).tolist())
    return [order[s * per: (s + 1) * per] for s in range(steps)]


def step_batches(task: EncodedPairs, *, steps: int, batch_size: int, length: int,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(good, bad) batch arrays with a leading step axis: {field: [steps, B, T]}.

    Epochs of a seeded permutation of the training pairs (depending only on (seed, uid)); a task
    with fewer than `batch_size` pairs fills each batch with all its pairs plus padding rows.

    Raises:
      ValueError: the task has no training pairs (names the task).
    """
    good, bad = [], []
    for idx in _step_pairs(task, steps=steps, batch_size=batch_size, seed=seed):
        good.append(make_batch([task.good[i] for i in idx], length=length, batch_size=batch_size,
                               score_from=[task.score_from_good[i] for i in idx], index=idx))
        bad.append(make_batch([task.bad[i] for i in idx], length=length, batch_size=batch_size,
                              score_from=[task.score_from_bad[i] for i in idx], index=idx))
    fields = ("input_ids", "attention_mask", "target_mask", "valid")
    return ({f: np.stack([getattr(b, f) for b in good]) for f in fields},
            {f: np.stack([getattr(b, f) for b in bad]) for f in fields})


@dataclasses.dataclass(frozen=True)
class PairPacking:
    """One shape for every packed pair batch of a run (so each function compiles once): `rows` rows
    of `row_len` tokens, each holding at most `slots` pairs (a pair's good then bad sentence)."""

    rows: int
    row_len: int
    slots: int

    def batches(self, task: EncodedPairs, index: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """`task`'s pairs (those in `index`, default all) as packed batch arrays: input_ids,
        attention_mask (segments), signed target_mask, slot [R, L] and valid [R, Q]."""
        idx = list(range(len(task))) if index is None else list(index)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        for b in iter_packed_pairs(pick(task.good), pick(task.bad), rows=self.rows, row_len=self.row_len,
                                   slots=self.slots, score_from_good=pick(task.score_from_good),
                                   score_from_bad=pick(task.score_from_bad)):
            yield _pad_rows(b, self.rows)

    def for_mesh(self, mesh: Any) -> "PairPacking":
        """This shape with its rows per batch rounded up to a multiple of `mesh`'s data axis (the
        packer fills them, or leaves the last batch's extra rows empty)."""
        return dataclasses.replace(self, rows=rows_for(self.rows, mesh))


def _pad_rows(b: PackedPairBatch, rows: int) -> dict[str, np.ndarray]:
    """Device arrays of a packed batch, padded with empty rows to `rows` (one shape for the run)."""
    extra = rows - b.shape[0]

    def pad(a: np.ndarray, value: Any) -> np.ndarray:
        return np.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1), constant_values=value)

    return {"input_ids": pad(b.input_ids, PAD_ID), "attention_mask": pad(b.attention_mask, 0),
            "target_mask": pad(b.target_mask, 0.0), "slot": pad(b.slot, -1), "valid": pad(b.valid, False)}


def _pair_lengths(tasks: Sequence[EncodedPairs]) -> list[int]:
    return [len(g) + len(b) for t in tasks for g, b in zip(t.good, t.bad)]


def pair_packing(tasks: Sequence[EncodedPairs], pairs_per_batch: int) -> PairPacking:
    """The packed shape for batches of about `pairs_per_batch` pairs of any of `tasks` (rows as many
    as that many average pairs fill; a task with more pairs takes several batches)."""
    lengths = _pair_lengths(tasks)
    if not lengths:
        raise ValueError("no pairs to pack")
    row_len, rows = packed_pair_shape(lengths, pairs_per_batch)
    return PairPacking(rows, row_len, max(1, row_len // min(lengths)))


def step_packing(tasks: Sequence[EncodedPairs], spec: TuneSpec) -> PairPacking:
    """The packed shape of every tuning step of `tasks` under `spec`: rows enough for the step whose
    pairs need the most (each step is one batch), at most as many slots as the shortest pairs fit."""
    lengths = _pair_lengths(tasks)
    if not lengths:
        raise ValueError("no pairs to pack")
    row_len = packed_pair_shape(lengths, 1)[0]
    rows = max(first_fit_rows([len(t.good[i]) + len(t.bad[i]) for i in idx], row_len)
               for t in tasks for idx in _step_pairs(t, steps=spec.steps, batch_size=spec.batch_size, seed=spec.seed))
    return PairPacking(rows, row_len, max(1, row_len // min(lengths)))


def packed_step_batches(task: EncodedPairs, *, steps: int, batch_size: int, packing: PairPacking,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """The same steps' pairs as `step_batches`, packed: {field: [steps, R, ...]} (see `PairPacking`)."""
    out = []
    for s, idx in enumerate(_step_pairs(task, steps=steps, batch_size=batch_size, seed=seed)):
        (b, *more) = list(packing.batches(task, idx))
        if more:
            raise ValueError(f"task {task.uid!r}: step {s}'s pairs need more than {packing.rows} rows of "
                             f"{packing.row_len} tokens (a packing made for other tasks?)")
        out.append(b)
    return {f: np.stack([b[f] for b in out]) for f in out[0]}


# ----------------------------------------------------------------------------------- step
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def batch_margins(apply_fn: ApplyFn, trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array],
                  good: Mapping[str, jax.Array], bad: Mapping[str, jax.Array]) -> jax.Array:
    """Margins log p(good) − log p(bad) [B] (0 on padding rows) under trainable ∪ frozen."""
    return -pair_loss_diff(apply_fn, unflatten({**frozen, **trainable}), good, bad)


def packed_margins(apply_fn: ApplyFn, trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array],
                   batch: Mapping[str, jax.Array]) -> jax.Array:
    """Margins log p(good) − log p(bad) [R, Q] of a packed batch (`PairPacking`; 0 in empty slots):
    the signed target mask makes each pair's token sum the difference of its two sentences."""
    ids = batch["input_ids"]
    lp = token_logprobs(apply_fn(unflatten({**frozen, **trainable}), ids, batch["attention_mask"]), ids)
    slots = batch["slot"][..., None] == jnp.arange(batch["valid"].shape[-1])
    return jnp.einsum("rl,rlq->rq", lp * batch["target_mask"], slots.astype(lp.dtype))


def margins_and_valid(apply_fn: ApplyFn, trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array],
                      *batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(margins, valid) as flat [P] arrays of one batch: `(good, bad)` bucketed or `(packed,)`."""
    if len(batch) == 1:
        return packed_margins(apply_fn, trainable, frozen, batch[0]).reshape(-1), batch[0]["valid"].reshape(-1)
    good, bad = batch
    return batch_margins(apply_fn, trainable, frozen, good, bad), good["valid"]


def make_group_step(apply_fn: ApplyFn, spec: TuneSpec) -> Callable[..., Any]:
    """jit(vmap) step over G tasks: (trainable_G, opt_state_G, mask_G, frozen, *batch_G) →
    (trainable_G, opt_state_G, loss_G), the batch `(packed_G,)` with `spec.pack`, else `(good_G, bad_G)`.
    Leaves of *_G have a leading task axis; `frozen` is shared. `.traces` counts compilations."""
    opt = spec.optimizer_fn()

    def one(trainable, opt_state, mask, frozen, *batch):
        def loss_fn(tr):
            m, valid = margins_and_valid(apply_fn, tr, frozen, *batch)
            return margin_loss(m, valid, spec.objective, scale=spec.logistic_scale, hinge_margin=spec.hinge_margin)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, mask)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, mask)
        return optax.apply_updates(trainable, updates), opt_state, loss

    vstep = jax.vmap(one, in_axes=(0, 0, 0, None) + (0,) * (1 if spec.pack else 2))

    class Step:
        traces = 0
        packed = spec.pack

        def __init__(self) -> None:
            def counted(*args):
                Step.traces += 1
                return vstep(*args)

            self.fn = jax.jit(counted, donate_argnums=(0, 1))
            self.init = jax.jit(jax.vmap(opt.init))

        def __call__(self, *args):
            return self.fn(*args)

    return Step()


@dataclasses.dataclass
class TunedGroup:
    """One group's tuned parameters: `trainable` {name: [G, *shape]} for `uids` (padding dropped),
    training losses [G, steps], and the tasks of the group that failed (uid → reason)."""

    uids: list[str]
    trainable: dict[str, jax.Array]
    losses: np.ndarray
    failed: dict[str, str]
    index: int = 0          # the group's position among `tune_tasks`' groups


def stack(trees: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
    return {n: jnp.stack([jnp.asarray(t[n]) for t in trees]) for n in trees[0]}


def tune_tasks(apply_fn: ApplyFn, params: Any, selected: Sequence[str], tasks: Sequence[EncodedPairs],
               masks: Sequence[Mapping[str, np.ndarray] | None], spec: TuneSpec, *,
               length: int | None = None, max_len: int | None = None,
               step: Any = None, progress: Callable[[int], None] | None = None,
               mesh: Any = None, skip: Container[int] = ()) -> Iterator[TunedGroup]:
    """Tunes every task from `params` (each on its own training pairs, with its own mask: a
    {name: bool} over `selected`, or None = all selected parameters), `spec.task_batch` at a time.

    Yields one `TunedGroup` per group, so a caller can evaluate and drop each group's parameter
    copies before the next group is tuned. A task whose loss (or final parameters) turns
    non-finite stops counting: it is named in `failed` with the step, and left out of `uids`;
    the other tasks of its group, and the finished groups, are kept.

    Batches: with `spec.pack` each step's pairs are packed into rows of one shape shared by every
    task and step (`step_packing`); otherwise good and bad sentences are padded to `length`
    (default `train_length`). Both take the same pairs at each step. `step` (default: made from
    `spec`) must be made for the same `spec.pack`. With `mesh`, each step's rows are split over its
    data axis (module docstring). Groups whose index is in `skip` (a resumed run's finished ones) are
    neither tuned nor yielded; the others are tuned exactly as without it.

    Raises:
      ValueError: a task with an empty training split (named), a sentence longer than `max_len`,
        masks/tasks of unequal length, or a step made for the other batching.
    """
    if len(masks) != len(tasks):
        raise ValueError(f"{len(masks)} masks for {len(tasks)} tasks")
    for t in tasks:
        if len(t) == 0:
            raise ValueError(f"task {t.uid!r}: empty training split (no pairs to tune on)")
    trainable0, frozen = split_params(params, list(selected))
    frozen = {n: jnp.asarray(v) for n, v in frozen.items()}
    step = step or make_group_step(apply_fn, spec)
    if getattr(step, "packed", spec.pack) != spec.pack:
        raise ValueError(f"the step was made for pack={step.packed}, the spec says pack={spec.pack}")
    too_long = [t.uid for t in tasks if max_len is not None and t.max_len > max_len]
    if too_long:
        raise ValueError(f"task(s) {too_long}: a sentence is longer than max_len={max_len}")
    if spec.pack:
        packing = step_packing(tasks, spec).for_mesh(mesh)
    else:
        check_rows("batch_size", spec.batch_size, mesh)
        length = length or train_length(tasks, max_len)
    g_size = spec.task_batch
    for index, lo in enumerate(range(0, len(tasks), g_size)):
        group = list(range(lo, min(lo + g_size, len(tasks))))
        real = len(group)
        if index in skip:
            if progress is not None:
                progress(real)
            continue
        group += [group[-1]] * (g_size - real)           # pad: one shape for every group
        if spec.pack:
            data = [packed_step_batches(tasks[i], steps=spec.steps, batch_size=spec.batch_size, packing=packing,
                                        seed=spec.seed) for i in group]
            batches = ({f: np.stack([d[f] for d in data]) for f in data[0]},)   # [G, S, R, ...]
        else:
            data = [step_batches(tasks[i], steps=spec.steps, batch_size=spec.batch_size, length=length,
                                 seed=spec.seed) for i in group]
            batches = tuple({f: np.stack([d[k][f] for d in data]) for f in data[0][k]} for k in (0, 1))  # [G, S, B, T]
        mask = stack([{n: (np.ones(np.shape(trainable0[n]), bool) if masks[i] is None else masks[i][n])
                       for n in selected} for i in group])
        tr = stack([trainable0] * g_size)
        state = step.init(tr)
        losses = np.full((g_size, spec.steps), np.nan)
        failed: dict[str, str] = {}
        for s in range(spec.steps):
            tr, state, loss = step(tr, state, mask, frozen,
                                   *(on_rows({f: v[:, s] for f, v in b.items()}, mesh, axis=1) for b in batches))
            losses[:, s] = np.asarray(loss)
            for g in range(real):
                uid = tasks[group[g]].uid
                if uid not in failed and not np.isfinite(losses[g, s]):
                    failed[uid] = f"non-finite loss ({losses[g, s]}) at step {s}"
                    log.error("task %s: %s; its tuning stops, the other tasks go on", uid, failed[uid])
        # Entries that were already non-finite in the base model are not this tuning's doing.
        finite = np.asarray(jnp.stack([jnp.all((jnp.isfinite(v) | ~jnp.isfinite(jnp.asarray(trainable0[n])))
                                               .reshape(g_size, -1), axis=1)
                                       for n, v in tr.items()]).all(axis=0))
        for g in range(real):
            uid = tasks[group[g]].uid
            if uid not in failed and not finite[g]:
                failed[uid] = f"non-finite parameters after step {spec.steps - 1}"
                log.error("task %s: %s", uid, failed[uid])
        keep = [g for g in range(real) if tasks[group[g]].uid not in failed]
        sel = jnp.asarray(keep, jnp.int32)
        yield TunedGroup([tasks[group[g]].uid for g in keep], {n: v[sel] for n, v in tr.items()},
                         losses[keep], failed, index)
        if progress is not None:
            progress(real)


# ----------------------------------------------------------------------------------- evaluation
def make_group_scorer(apply_fn: ApplyFn) -> Callable[..., jax.Array]:
    """jit: (trainable_G, frozen, input_ids, attention_mask, target_mask) → target_mask · log p per
    token [G, B, T] (summed per sentence on the host, for packed rows and padded rows alike)."""

    def one(trainable, frozen, ids, attn, tgt):
        logits = apply_fn(unflatten({**frozen, **trainable}), ids, attn)
        return token_logprobs(logits, ids) * tgt

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None)))


def score_models(scorer: Callable[..., jax.Array], trainable_g: Mapping[str, jax.Array],
                 frozen: Mapping[str, jax.Array], seqs: Sequence[np.ndarray], score_from: Sequence[int], *,
                 batch_size: int = 16, max_len: int | None = None, pack: bool = True,
                 mesh: Any = None) -> np.ndarray:
    """float64 [G, N]: log-prob of every sequence under each of G stacked models.

    `pack`: sentences back to back in rows of one shape (`lmgrad.tasks.iter_packed`, `batch_size` × 32
    tokens per batch); otherwise `batch_size` right-padded sentences per batch in length buckets.
    `mesh`: rows split over its data axis (module docstring)."""

    def score(b: Any) -> np.ndarray:
        n = b.input_ids.shape[0]
        pad = ((0, rows_for(n, mesh) - n), (0, 0))    # empty rows, so that the rows split evenly
        rows = on_rows({"ids": np.pad(b.input_ids, pad, constant_values=PAD_ID),
                        "attn": np.pad(b.attention_mask, pad), "tgt": np.pad(b.target_mask, pad)}, mesh)
        return np.asarray(scorer(trainable_g, frozen, rows["ids"], rows["attn"], rows["tgt"]), np.float64)[:, :n]

    g = jax.tree.leaves(trainable_g)[0].shape[0]
    out = np.full((g, len(seqs)), np.nan)
    if not len(seqs):
        return out
    if pack:
        row_len = packed_row_length([len(s) for s in seqs], max_len=max_len)
        out[:] = 0.0
        for b in iter_packed(seqs, rows=max(1, batch_size * 32 // row_len), row_len=row_len, score_from=score_from):
            lp = score(b)
            held = b.owner >= 0
            for m in range(g):
                np.add.at(out[m], b.owner[held], lp[m][held])
        return out
    for b in iter_bucketed(seqs, batch_size=batch_size, score_from=score_from, max_len=max_len):
        lp = score(b)
        out[:, b.index[b.valid]] = lp.sum(axis=-1)[:, b.valid]
    return out


@dataclasses.dataclass
class EvalSet:
    """Everything each tuned model is scored on, as one list of sequences: every task's held-out
    good and bad sentences, then the neutral sentences."""

    uids: list[str]
    seqs: list[np.ndarray]
    score_from: np.ndarray
    good_index: list[np.ndarray]    # per task: positions of its good sentences in `seqs`
    bad_index: list[np.ndarray]
    neutral_index: np.ndarray
    neutral_tokens: int             # scored tokens of the neutral text

    @staticmethod
    def build(held: Sequence[EncodedPairs], neutral: Sequence[np.ndarray]) -> "EvalSet":
        seqs: list[np.ndarray] = []
        sf: list[int] = []
        gi, bi = [], []
        for t in held:
            n0 = len(seqs)
            seqs += list(t.good) + list(t.bad)
            sf += list(t.score_from_good) + list(t.score_from_bad)
            gi.append(np.arange(n0, n0 + len(t)))
            bi.append(np.arange(n0 + len(t), n0 + 2 * len(t)))
        n0 = len(seqs)
        seqs += list(neutral)
        sf += [1] * len(neutral)
        return EvalSet([t.uid for t in held], seqs, np.asarray(sf), gi, bi, np.arange(n0, len(seqs)),
                       int(sum(len(s) - 1 for s in neutral)))


@dataclasses.dataclass
class Evaluation:
    """Per model (rows) and task (columns): held-out accuracy and mean margin; neutral perplexity."""

    accuracy: np.ndarray    # [G, T]
    margin: np.ndarray      # [G, T]
    perplexity: np.ndarray  # [G] (NaN without neutral text)


def evaluate(scorer: Callable[..., jax.Array], trainable_g: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array],
             ev: EvalSet, *, batch_size: int = 16, max_len: int | None = None, pack: bool = True,
             mesh: Any = None) -> Evaluation:
    """Scores the G models on the held-out pairs of every task and on the neutral text (`score_models`)."""
    lp = score_models(scorer, trainable_g, frozen, ev.seqs, ev.score_from, batch_size=batch_size, max_len=max_len,
                      pack=pack, mesh=mesh)
    margins = [lp[:, g] - lp[:, b] for g, b in zip(ev.good_index, ev.bad_index)]
    acc = np.stack([(m > 0).mean(axis=1) for m in margins], axis=1)
    mar = np.stack([m.mean(axis=1) for m in margins], axis=1)
    if len(ev.neutral_index):
        ppl = np.exp(-lp[:, ev.neutral_index].sum(axis=1) / max(ev.neutral_tokens, 1))
    else:
        ppl = np.full(lp.shape[0], np.nan)
    return Evaluation(acc, mar, ppl)
