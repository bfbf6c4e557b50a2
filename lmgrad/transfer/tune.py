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
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmgrad.grads.differential import pair_loss_diff
from lmgrad.params import split as split_params, unflatten
from lmgrad.scoring import sequence_logprob
from lmgrad.tasks import Pair, degenerate_pairs, encode_pairs, iter_bucketed, make_batch
from lmgrad.tasks.batching import bucket_length
from lmgrad.transfer.objective import OBJECTIVES, margin_loss

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")


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


def step_batches(task: EncodedPairs, *, steps: int, batch_size: int, length: int,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(good, bad) batch arrays with a leading step axis: {field: [steps, B, T]}.

    Epochs of a seeded permutation of the training pairs (depending only on (seed, uid)); a task
    with fewer than `batch_size` pairs fills each batch with all its pairs plus padding rows.

    Raises:
      ValueError: the task has no training pairs (names the task).
    """
    n = len(task)
    if n == 0:
        raise ValueError(f"task {task.uid!r}: empty training split (no pairs to tune on)")
    rng = np.random.default_rng([seed, zlib.crc32(task.uid.encode()), 1])
    per = min(batch_size, n)
    order: list[int] = []
    while len(order) < steps * per:
        order.extend(rng.permutation(n).tolist())
    good, bad = [], []
    for s in range(steps):
        idx = order[s * per: (s + 1) * per]
        good.append(make_batch([task.good[i] for i in idx], length=length, batch_size=batch_size,
                               score_from=[task.score_from_good[i] for i in idx], index=idx))
        bad.append(make_batch([task.bad[i] for i in idx], length=length, batch_size=batch_size,
                              score_from=[task.score_from_bad[i] for i in idx], index=idx))
    fields = ("input_ids", "attention_mask", "target_mask", "valid")
    return ({f: np.stack([getattr(b, f) for b in good]) for f in fields},
            {f: np.stack([getattr(b, f) for b in bad]) for f in fields})


# ----------------------------------------------------------------------------------- step
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def batch_margins(apply_fn: ApplyFn, trainable: Mapping[str, jax.Array], frozen: Mapping[str, jax.Array],
                  good: Mapping[str, jax.Array], bad: Mapping[str, jax.Array]) -> jax.Array:
    """Margins log p(good) − log p(bad) [B] (0 on padding rows) under trainable ∪ frozen."""
    return -pair_loss_diff(apply_fn, unflatten({**frozen, **trainable}), good, bad)


def make_group_step(apply_fn: ApplyFn, spec: TuneSpec) -> Callable[..., Any]:
    """jit(vmap) step over G tasks: (trainable_G, opt_state_G, mask_G, frozen, good_G, bad_G) →
    (trainable_G, opt_state_G, loss_G). Leaves of *_G have a leading task axis; `frozen` is shared.
    `.traces` counts compilations."""
    opt = spec.optimizer_fn()

    def one(trainable, opt_state, mask, frozen, good, bad):
        def loss_fn(tr):
            m = batch_margins(apply_fn, tr, frozen, good, bad)
            return margin_loss(m, good["valid"], spec.objective, scale=spec.logistic_scale,
                               hinge_margin=spec.hinge_margin)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, mask)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, mask)
        return optax.apply_updates(trainable, updates), opt_state, loss

    vstep = jax.vmap(one, in_axes=(0, 0, 0, None, 0, 0))

    class Step:
        traces = 0

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


def stack(trees: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
    return {n: jnp.stack([jnp.asarray(t[n]) for t in trees]) for n in trees[0]}


def tune_tasks(apply_fn: ApplyFn, params: Any, selected: Sequence[str], tasks: Sequence[EncodedPairs],
               masks: Sequence[Mapping[str, np.ndarray] | None], spec: TuneSpec, *,
               length: int | None = None, max_len: int | None = None,
               step: Any = None, progress: Callable[[int], None] | None = None) -> Iterator[TunedGroup]:
    """Tunes every task from `params` (each on its own training pairs, with its own mask: a
    {name: bool} over `selected`, or None = all selected parameters), `spec.task_batch` at a time.

    Yields one `TunedGroup` per group, so a caller can evaluate and drop each group's parameter
    copies before the next group is tuned. A task whose loss (or final parameters) turns
    non-finite stops counting: it is named in `failed` with the step, and left out of `uids`;
    the other tasks of its group, and the finished groups, are kept.

    Raises:
      ValueError: a task with an empty training split (named), or masks/tasks of unequal length.
    """
    if len(masks) != len(tasks):
        raise ValueError(f"{len(masks)} masks for {len(tasks)} tasks")
    for t in tasks:
        if len(t) == 0:
            raise ValueError(f"task {t.uid!r}: empty training split (no pairs to tune on)")
    trainable0, frozen = split_params(params, list(selected))
    frozen = {n: jnp.asarray(v) for n, v in frozen.items()}
    length = length or train_length(tasks, max_len)
    step = step or make_group_step(apply_fn, spec)
    g_size = spec.task_batch
    for lo in range(0, len(tasks), g_size):
        group = list(range(lo, min(lo + g_size, len(tasks))))
        real = len(group)
        group += [group[-1]] * (g_size - real)           # pad: one shape for every group
        data = [step_batches(tasks[i], steps=spec.steps, batch_size=spec.batch_size, length=length,
                             seed=spec.seed) for i in group]
        good = {f: np.stack([d[0][f] for d in data]) for f in data[0][0]}   # [G, S, B, T]
        bad = {f: np.stack([d[1][f] for d in data]) for f in data[0][1]}
        mask = stack([{n: (np.ones(np.shape(trainable0[n]), bool) if masks[i] is None else masks[i][n])
                       for n in selected} for i in group])
        tr = stack([trainable0] * g_size)
        state = step.init(tr)
        losses = np.full((g_size, spec.steps), np.nan)
        failed: dict[str, str] = {}
        for s in range(spec.steps):
            tr, state, loss = step(tr, state, mask, frozen, {f: v[:, s] for f, v in good.items()},
                                   {f: v[:, s] for f, v in bad.items()})
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
                         losses[keep], failed)
        if progress is not None:
            progress(real)


# ----------------------------------------------------------------------------------- evaluation
def make_group_scorer(apply_fn: ApplyFn) -> Callable[..., jax.Array]:
    """jit: (trainable_G, frozen, input_ids, attention_mask, target_mask) → log-probs [G, B]."""

    def one(trainable, frozen, ids, attn, tgt):
        logits = apply_fn(unflatten({**frozen, **trainable}), ids, attn)
        return sequence_logprob(logits, ids, tgt)

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, None, None)))


def score_models(scorer: Callable[..., jax.Array], trainable_g: Mapping[str, jax.Array],
                 frozen: Mapping[str, jax.Array], seqs: Sequence[np.ndarray], score_from: Sequence[int], *,
                 batch_size: int = 16, max_len: int | None = None) -> np.ndarray:
    """float64 [G, N]: log-prob of every sequence under each of G stacked models."""
    g = jax.tree.leaves(trainable_g)[0].shape[0]
    out = np.full((g, len(seqs)), np.nan)
    for b in iter_bucketed(seqs, batch_size=batch_size, score_from=score_from, max_len=max_len):
        lp = np.asarray(scorer(trainable_g, frozen, b.input_ids, b.attention_mask, b.target_mask))
        out[:, b.index[b.valid]] = lp[:, b.valid]
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
             ev: EvalSet, *, batch_size: int = 16, max_len: int | None = None) -> Evaluation:
    """Scores the G models on the held-out pairs of every task and on the neutral text."""
    lp = score_models(scorer, trainable_g, frozen, ev.seqs, ev.score_from, batch_size=batch_size, max_len=max_len)
    margins = [lp[:, g] - lp[:, b] for g, b in zip(ev.good_index, ev.bad_index)]
    acc = np.stack([(m > 0).mean(axis=1) for m in margins], axis=1)
    mar = np.stack([m.mean(axis=1) for m in margins], axis=1)
    if len(ev.neutral_index):
        ppl = np.exp(-lp[:, ev.neutral_index].sum(axis=1) / max(ev.neutral_tokens, 1))
    else:
        ppl = np.full(lp.shape[0], np.nan)
    return Evaluation(acc, mar, ppl)
