"""lmgrad.transfer on a tiny random Llama: the FTGD step is a masked gradient step on the margin
objective, the top-p mask keeps exactly ⌈p·N⌉ entries, tuning in vmapped groups equals tuning each
task alone, tuning raises the tuned task's margin, the first-order prediction matches a tiny-step
finite difference, and bad input is refused with a reason."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_tokenizer import save_tiny_llama
from lmgrad.models import load_model, logits_fn
from lmgrad.params import flatten, split as split_params
from lmgrad.tasks import select_tasks
from lmgrad.transfer import (EvalSet, TuneSpec, encode_task_pairs, evaluate, first_order_matrix, make_group_scorer,
                             make_group_step, make_task_grad_fn, margin_loss, n_kept, pack_mask, packed_step_batches,
                             pair_packing, score_models, split_pairs, step_batches, step_packing, task_gradient,
                             top_p_mask, train_length, tune_tasks, unpack_mask, vectorize)
from lmgrad.transfer.tune import batch_margins, stack

UIDS = ("anaphor_gender_agreement", "passive_1", "wh_island")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_transfer")
    save_tiny_llama(path, num_hidden_layers=1)
    return load_model(str(path))


# Compiling a step costs ~15 s on a shared CPU: the tests share three specs and their steps.
SGD = TuneSpec(objective="plain", optimizer="sgd", learning_rate=1e-3, steps=1, batch_size=16, task_batch=3)
ADAM = TuneSpec(objective="logistic", optimizer="adam", learning_rate=1e-2, steps=4, batch_size=4, schedule="cosine",
                task_batch=2)
ADAM_ALONE = TuneSpec(**{**ADAM.__dict__, "task_batch": 1})


@pytest.fixture(scope="module")
def fns(model):
    apply_fn = logits_fn(model)
    return {"apply": apply_fn, "diff": make_task_grad_fn(apply_fn), "scorer": make_group_scorer(apply_fn),
            **{name: make_group_step(apply_fn, spec) for name, spec in
               (("sgd", SGD), ("adam", ADAM), ("adam_alone", ADAM_ALONE))}}


@pytest.fixture(scope="module")
def masks(model, data, fns):
    return [top_p_mask(task_gradient(fns["diff"], model.params, names_of(model), t), 0.25) for t in data[0]]


@pytest.fixture(scope="module")
def data(model):
    tasks = select_tasks("blimp:" + ",".join(UIDS), max_pairs_per_task=10)
    train, held = [], []
    for t in tasks:
        tr, he = split_pairs(t.uid, t.pairs, 4, seed=0)
        train.append(encode_task_pairs(model.tokenizer, t.uid, tr))
        held.append(encode_task_pairs(model.tokenizer, t.uid, he))
    return train, held


def names_of(model):
    return sorted(flatten(model.params))


def test_margin_losses():
    m = jnp.array([-2.0, 0.5, 3.0, 9.0])
    v = jnp.array([True, True, True, False])
    assert float(margin_loss(m, v, "plain")) == pytest.approx(-(-2 + 0.5 + 3) / 3)
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731
    assert float(margin_loss(m, v, "logistic")) == pytest.approx((sp(-2) + sp(0.5) + sp(3)) / 3, rel=1e-6)
    assert float(margin_loss(m, v, "hinge", hinge_margin=1.0)) == pytest.approx((3 + 0.5 + 0) / 3)
    assert float(margin_loss(m, jnp.zeros(4, bool), "plain")) == 0.0


def test_mask_keeps_exactly_top_p_with_ties():
    rng = np.random.default_rng(0)
    score = {"b": rng.integers(-3, 4, size=(7, 5)).astype(np.float32),   # many ties
             "a": rng.normal(size=(11,)).astype(np.float32)}
    n = 7 * 5 + 11
    for p in (0.01, 0.1, 0.3, 0.5, 0.999, 1.0):
        mask = top_p_mask(score, p)
        kept = sum(int(m.sum()) for m in mask.values())
        assert kept == math.ceil(p * n - 1e-9) == n_kept(n, p)
        a = np.concatenate([np.abs(score[k]).ravel() for k in sorted(score)])
        m = np.concatenate([mask[k].ravel() for k in sorted(score)])
        if not m.all():
            assert a[m].min() >= a[~m].max()
        assert {k: v.shape for k, v in mask.items()} == {k: v.shape for k, v in score.items()}
    assert all(v.all() for v in top_p_mask(score, 1.0).values())
    packed = pack_mask(mask := top_p_mask(score, 0.3))
    back = unpack_mask(packed, {k: v.shape for k, v in score.items()})
    assert all(np.array_equal(back[k], mask[k]) for k in mask)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_top_p_outside_unit_interval_is_refused(p):
    with pytest.raises(ValueError, match="top_p must be in"):
        top_p_mask({"a": np.ones(3)}, p)


def test_one_step_is_masked_gradient_step(model, data, fns, masks):
    train, _ = data
    apply_fn, names = fns["apply"], names_of(model)
    (group,) = list(tune_tasks(apply_fn, model.params, names, train[:1], masks[:1], SGD, step=fns["sgd"]))
    # By hand: the same first batch, jax.grad of the objective, masked, one SGD step.
    good, bad = step_batches(train[0], steps=1, batch_size=SGD.batch_size, length=train_length(train[:1]), seed=0)
    good = {k: jnp.asarray(v[0]) for k, v in good.items()}
    bad = {k: jnp.asarray(v[0]) for k, v in bad.items()}
    tr, fr = split_params(model.params, names)
    grad = jax.grad(lambda t: margin_loss(batch_margins(apply_fn, t, fr, good, bad), good["valid"], "plain"))(tr)
    mask = masks[0]
    for n in names:
        expect = np.asarray(tr[n]) - SGD.learning_rate * np.where(mask[n], np.asarray(grad[n]), 0.0)
        got = np.asarray(group.trainable[n][0])
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7, err_msg=n)
        assert np.array_equal(got[~mask[n]], np.asarray(tr[n])[~mask[n]]), n   # masked-out never move
        assert not np.array_equal(got[mask[n]], np.asarray(tr[n])[mask[n]]) or not mask[n].any(), n


@pytest.fixture(scope="module")
def adam_groups(model, data, fns, masks):
    return list(tune_tasks(fns["apply"], model.params, names_of(model), data[0], masks, ADAM, step=fns["adam"]))


def test_grouped_tuning_equals_each_task_alone(model, data, fns, masks, adam_groups):
    train, _ = data
    names = names_of(model)
    # Groups of 2 over 3 tasks: the second group is padded with a repeat of its task.
    assert [g.uids for g in adam_groups] == [[train[0].uid, train[1].uid], [train[2].uid]]
    step = fns["adam_alone"]
    alone = list(tune_tasks(fns["apply"], model.params, names, train, masks, ADAM_ALONE, step=step))
    assert step.traces == 1    # one compiled step reused for every task
    together = [(g, i) for g in adam_groups for i in range(len(g.uids))]
    for a, (g, i) in zip(alone, together):
        assert a.uids == [g.uids[i]]
        np.testing.assert_allclose(a.losses[0], g.losses[i], rtol=1e-4, atol=1e-6)
        for n in names:
            np.testing.assert_allclose(np.asarray(a.trainable[n][0]), np.asarray(g.trainable[n][i]),
                                       rtol=1e-4, atol=1e-4, err_msg=n)   # Adam: 1% of a step


def test_tuning_raises_the_tuned_task_margin(model, data, fns, adam_groups):
    train, _ = data
    names = names_of(model)
    ev = EvalSet.build(train, [])
    tr, fr = split_params(model.params, names)
    before = evaluate(fns["scorer"], stack([tr]), fr, ev)
    own = []
    for g in adam_groups:
        after = evaluate(fns["scorer"], g.trainable, fr, ev)
        own += [after.margin[r, [t.uid for t in train].index(u)] for r, u in enumerate(g.uids)]
    gain = np.asarray(own) - before.margin[0]
    assert (gain > 0).all(), gain
    assert all((g.losses[:, -1] < g.losses[:, 0]).all() for g in adam_groups)


def test_first_order_prediction_matches_finite_difference(model, data, fns, masks):
    train, held = data
    apply_fn, names = fns["apply"], names_of(model)
    # For the plain objective ∇L_i is the mean differential, so the compiled differential serves.
    upd = [vectorize(task_gradient(fns["diff"], model.params, names, t), mask=m) for t, m in zip(train, masks)]
    tgt = [vectorize(task_gradient(fns["diff"], model.params, names, h)) for h in held]
    pred = SGD.learning_rate * first_order_matrix(upd, tgt)
    ev = EvalSet.build(held, [])
    tr, fr = split_params(model.params, names)
    before = evaluate(fns["scorer"], stack([tr]), fr, ev).margin[0]
    (group,) = list(tune_tasks(apply_fn, model.params, names, train, masks, SGD, step=fns["sgd"]))
    measured = evaluate(fns["scorer"], group.trainable, fr, ev).margin - before[None]
    np.testing.assert_allclose(measured, pred, rtol=0.05, atol=0.02 * np.abs(pred).max())
    assert np.corrcoef(measured.ravel(), pred.ravel())[0, 1] > 0.999


def test_packed_steps_hold_the_bucketed_steps_pairs(data):
    train, _ = data
    spec = TuneSpec(steps=5, batch_size=4)
    packing = step_packing(train, spec)
    length = train_length(train)
    for t in train:
        p = packed_step_batches(t, steps=spec.steps, batch_size=spec.batch_size, packing=packing, seed=spec.seed)
        good, bad = step_batches(t, steps=spec.steps, batch_size=spec.batch_size, length=length, seed=spec.seed)
        assert p["input_ids"].shape == (spec.steps, packing.rows, packing.row_len)
        assert p["valid"].shape == (spec.steps, packing.rows, packing.slots)
        for s in range(spec.steps):
            # The same pairs: the same tokens, each pair's good sentence scored +1 and its bad one -1.
            sent = lambda b, r: b["input_ids"][s, r][b["attention_mask"][s, r] > 0]  # noqa: E731
            want = sorted(np.concatenate([sent(good, r), sent(bad, r)]).tolist()
                          for r in range(spec.batch_size) if good["valid"][s, r])
            got = sorted(p["input_ids"][s, r][p["slot"][s, r] == q].tolist()
                         for r in range(packing.rows) for q in range(packing.slots) if p["valid"][s, r, q])
            assert got == want
            assert p["target_mask"][s].sum() == good["target_mask"][s].sum() - bad["target_mask"][s].sum()


def test_packed_equals_bucketed(model, data, fns):
    """Task gradients, evaluation and a tuning step on packed rows equal those on padded buckets."""
    train, held = data
    names, apply_fn = names_of(model), fns["apply"]
    packing = pair_packing(train + held, 16)
    bucketed = make_task_grad_fn(apply_fn, packed=False)
    for t in train + held:
        a = task_gradient(fns["diff"], model.params, names, t, packing=packing)
        b = task_gradient(bucketed, model.params, names, t)
        for n in names:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-5 * np.abs(b[n]).max(), err_msg=f"{t.uid} {n}")
    tr, fr = split_params(model.params, names)
    ev = EvalSet.build(held, [])
    lp = {pack: score_models(fns["scorer"], stack([tr, tr]), fr, ev.seqs, ev.score_from, pack=pack)
          for pack in (True, False)}
    assert np.isfinite(lp[True]).all()
    np.testing.assert_allclose(lp[True], lp[False], rtol=1e-5)
    spec = TuneSpec(**{**SGD.__dict__, "pack": False})
    (packed,) = list(tune_tasks(apply_fn, model.params, names, train, [None] * 3, SGD, step=fns["sgd"]))
    (padded,) = list(tune_tasks(apply_fn, model.params, names, train, [None] * 3, spec))
    # Each margin is a float32 difference of two log-probs of order -30: rounding ~1e-5 absolute.
    np.testing.assert_allclose(packed.losses, padded.losses, rtol=1e-5, atol=3e-5)
    for n in names:
        np.testing.assert_allclose(np.asarray(packed.trainable[n]), np.asarray(padded.trainable[n]),
                                   rtol=1e-5, atol=1e-7, err_msg=n)
    with pytest.raises(ValueError, match="made for pack=True, the spec says pack=False"):
        list(tune_tasks(apply_fn, model.params, names, train, [None] * 3, spec, step=fns["sgd"]))


def test_too_few_pairs_for_a_held_out_split():
    task = select_tasks("blimp:passive_1", max_pairs_per_task=4)[0]
    with pytest.raises(ValueError, match="'passive_1' has 4 pair.*too few for a held-out split"):
        split_pairs(task.uid, task.pairs, 4)


def test_empty_training_split_is_refused(model, data):
    train, _ = data
    empty = encode_task_pairs(model.tokenizer, "nothing_here", [])
    with pytest.raises(ValueError, match="'nothing_here': empty training split"):
        list(tune_tasks(logits_fn(model), model.params, names_of(model), [train[0], empty], [None, None],
                        TuneSpec(steps=1)))


@pytest.mark.parametrize("pack", [True, False])
def test_sentence_over_max_len_is_refused_by_task(model, data, pack):
    train, _ = data
    cap = train[0].max_len - 1
    with pytest.raises(ValueError, match=rf"{train[0].uid!r}.*longer than max_len={cap}"):
        list(tune_tasks(logits_fn(model), model.params, names_of(model), train[:1], [None],
                        TuneSpec(steps=1, pack=pack), max_len=cap))


def test_non_finite_loss_stops_that_task_only(model, data, fns):
    train, _ = data
    names = names_of(model)
    # Poison the embedding row of a token that only wh_island's training sentences use: its loss
    # is NaN from step 0; the other tasks never read that row.
    used = [set(np.concatenate(t.good + t.bad).tolist()) for t in train]
    only = sorted(used[2] - used[0] - used[1])
    assert only, "fixture: no token unique to the third task"
    flat = dict(flatten(model.params))
    emb = next(n for n in flat if "embed_tokens" in n)
    flat[emb] = flat[emb].at[only[0]].set(jnp.nan)
    from lmgrad.params import unflatten

    groups = list(tune_tasks(fns["apply"], unflatten(flat), names, train, [None] * 3, ADAM, step=fns["adam"]))
    assert [g.uids for g in groups] == [[train[0].uid, train[1].uid], []]
    assert "non-finite loss" in groups[1].failed[train[2].uid] and "step 0" in groups[1].failed[train[2].uid]
