"""The sketch stage (lmgrad.jobs.sketch) and launch/sketch.py end to end on a tiny random checkpoint: rows equal the exact differentials'
projection, 1 vs 4 devices agree, a SIGKILLed run resumes to the uninterrupted result, and bad
input is refused with a reason."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers_tokenizer import save_tiny_llama, tiny_tokenizer
from lmgrad import store as lstore
from lmgrad.grads import per_example_reference
from lmgrad.models import load_model, logits_fn
from lmgrad.params import flatten as flatten_params
from lmgrad.sketch import make_projector
from lmgrad.jobs.sketch import SketchOptions, sketch_pairs
from lmgrad.tasks import encode_pairs, iter_pair_batches, select_tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = "blimp:anaphor_gender_agreement,passive_1,wh_island"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(path, num_hidden_layers=2)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(str(ckpt))


def _launch(ckpt, workdir, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "launch/sketch.py"), f"--model={ckpt}", f"--tasks={TASKS}",
           "--max_pairs_per_task=6", "--projector=gaussian", "--k=64", "--batch_size=2", "--shard_rows=2",
           f"--workdir={workdir}", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_rows_are_projected_exact_differentials(model, tmp_path):
    tasks = select_tasks("blimp:passive_1", max_pairs_per_task=5)
    opts = SketchOptions(method="exact", projector="gaussian", k=32, projection_seed=3, batch_size=4, shard_rows=3)
    sketch_pairs(model, tasks, tmp_path / "s", opts)
    st = lstore.open(tmp_path / "s")
    assert st.complete and len(st) == 5

    pairs = list(tasks[0].pairs)
    good, bad, sg, sb = encode_pairs(model.tokenizer, pairs)
    names = list(flatten_params(model.params))
    shapes = {n: tuple(v.shape) for n, v in flatten_params(model.params).items()}
    proj = make_projector("gaussian", 32, 3)
    expect = {}
    for g, b in iter_pair_batches(good, bad, batch_size=8, score_from_good=sg, score_from_bad=sb):
        ref = per_example_reference(logits_fn(model), model.params, names, g, b)
        for row, i in enumerate(g.index):
            if i >= 0:
                vec = {n: ref[n][row:row + 1].astype(np.float64) for n in names}
                expect[pairs[i].pairID] = sum(
                    vec[n].reshape(1, -1) @ proj.dense_matrix(n, int(np.prod(shapes[n]))).T for n in names)[0]
    for row, pid in zip(st.sketches, st.meta["pairID"]):
        np.testing.assert_allclose(row, expect[pid], rtol=2e-4, atol=1e-5 * np.abs(expect[pid]).max())


# exact on 4 devices is also covered in-process by tests/test_mesh.py; the launcher run is heavy.
@pytest.mark.parametrize("method", [pytest.param("exact", marks=pytest.mark.heavy), "factored"])
def test_one_and_four_devices_agree(model, tmp_path, method):
    assert len(jax.devices()) == 4
    tasks = select_tasks(TASKS, max_pairs_per_task=3)
    opts = SketchOptions(method=method, projector="sjlt", k=128 if method == "exact" else None, projection_seed=1,
                         r_in=4, r_out=3, overrides=(), batch_size=5)
    sketch_pairs(model, tasks, tmp_path / "one", opts, num_devices=1)
    sketch_pairs(model, tasks, tmp_path / "four", opts, num_devices=4)
    a, b = lstore.open(tmp_path / "one"), lstore.open(tmp_path / "four")
    # float32 sums reordered by the batch split: an absolute floor relative to the rows' scale
    # (entries near zero carry the rounding of their larger neighbours).
    np.testing.assert_allclose(a.sketches, b.sketches, rtol=1e-5, atol=1e-6 * np.abs(a.sketches).max())
    assert a.meta_records() == b.meta_records()
    assert a.layout == b.layout
    if method == "factored":
        # The sharded job's rows are the unsharded factored sketch of each pair (whose identity
        # with the exact gradient's projection is tests/test_factored.py's business).
        from lmgrad.grads.factored import FactoredSpec, make_factored_sketch_fn

        fn = make_factored_sketch_fn(model, FactoredSpec(seed=1, r_in=4, r_out=3, overrides=()))
        pairs = [p for t in tasks for p in t.pairs]
        good, bad, sg, sb = encode_pairs(model.tokenizer, pairs)
        expect = {}
        for g, bb in iter_pair_batches(good, bad, batch_size=16, score_from_good=sg, score_from_bad=sb):
            rows, _ = fn(model.params, g, bb)
            expect.update({(pairs[i].UID, pairs[i].pairID): np.asarray(rows[r]) for r, i in enumerate(g.index) if i >= 0})
        assert len(a.layout) > 10  # one block per module
        for row, uid, pid in zip(b.sketches, b.meta["UID"], b.meta["pairID"]):
            ref = expect[(uid, pid)]
            np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_sigkill_then_resume_equals_uninterrupted(ckpt, model, tmp_path):
    # The same job as the launch flags, run in-process to completion as the reference.
    opts = SketchOptions(method="exact", projector="gaussian", k=64, projection_seed=0, batch_size=2, shard_rows=2)
    tasks = select_tasks(TASKS, max_pairs_per_task=6)
    sketch_pairs(model, tasks, tmp_path / "ref", opts)

    work = tmp_path / "killed"
    proc = _launch(ckpt, work, wait=False)
    deadline = time.time() + 240
    manifest = work / "manifest.json"
    # Kill once some shards are committed, while the run is still going.
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(lstore.open(work, verify=False).shards) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = lstore.open(work)
    assert not partial.complete and 0 < len(partial) < 18

    with pytest.raises(lstore.StoreExistsError, match="resume"):  # refuses to mix without --resume
        sketch_pairs(model, tasks, work, opts)
    sketch_pairs(model, tasks, work, opts, resume=True)
    a, b = lstore.open(tmp_path / "ref"), lstore.open(work)
    assert b.complete and len(b) == len(a) == 18
    np.testing.assert_array_equal(a.sketches, b.sketches)
    assert a.meta_records() == b.meta_records()


def test_resume_refuses_rows_batched_in_another_order(model, tmp_path, monkeypatch):
    # A store whose committed rows are not this run's leading pairs (here: batches reversed, as a
    # changed tokenizer or batching would do) is refused by name instead of repeating/skipping pairs.
    from lmgrad.jobs import sketch as sketch_mod

    opts = SketchOptions(projector="sjlt", k=16, batch_size=2)
    tasks = select_tasks("blimp:wh_island", max_pairs_per_task=6)
    sketch_pairs(model, tasks, tmp_path / "s", opts, max_batches=1)
    orig = sketch_mod.iter_pair_batches
    monkeypatch.setattr(sketch_mod, "iter_pair_batches", lambda *a, **k: list(reversed(list(orig(*a, **k)))))
    with pytest.raises(lstore.StoreMismatchError, match=r"committed row 0 is pair \('wh_island'"):
        sketch_pairs(model, tasks, tmp_path / "s", opts, resume=True)
    assert len(lstore.open(tmp_path / "s")) == 2  # nothing written


def test_checkpoints_of_one_architecture_share_the_sketcher(model, tmp_path):
    # A sweep's next checkpoint (same module and shapes, other weights) reuses the traced function;
    # its rows equal those of a freshly built one, so the reuse carries no stale weights.
    from lmgrad.jobs import sketch as sketch_mod

    opts = SketchOptions(method="factored", r_in=4, r_out=4, batch_size=4).resolve(model)
    other = dataclasses.replace(model, params=jax.tree.map(lambda x: x * 1.25, model.params))
    first = sketch_mod.build_sketcher(model, opts)
    assert sketch_mod.build_sketcher(other, opts) is first
    assert sketch_mod.build_sketcher(other, dataclasses.replace(opts, projection_seed=1)) is not first
    tasks = select_tasks("blimp:wh_island", max_pairs_per_task=4)
    sketch_pairs(other, tasks, tmp_path / "reused", opts)
    sketch_mod._SKETCHERS.clear()
    sketch_pairs(other, tasks, tmp_path / "fresh", opts)
    np.testing.assert_array_equal(lstore.open(tmp_path / "reused").sketches, lstore.open(tmp_path / "fresh").sketches)


def test_projection_seeds_share_the_compiled_factored_function(model, tmp_path):
    # The factored path's seed enters only through its factor matrices (an input), so a second
    # seed reuses the first's traced function (no new trace) and its rows equal a fresh build's.
    from lmgrad.jobs import sketch as sketch_mod

    sketch_mod._SKETCHERS.clear()
    opts = SketchOptions(method="factored", r_in=4, r_out=4, batch_size=4).resolve(model)
    tasks = select_tasks("blimp:wh_island", max_pairs_per_task=4)
    sketch_pairs(model, tasks, tmp_path / "s0", opts)
    first = sketch_mod.build_sketcher(model, opts)
    traces, factor_traces = first.fn.traces, first.fn.factored.factor_traces
    seed1 = dataclasses.replace(opts, projection_seed=1)
    sketch_pairs(model, tasks, tmp_path / "s1", seed1)
    second = sketch_mod.build_sketcher(model, seed1)
    assert second is not first and second.fn.traces == traces  # nothing traced for seed 1
    assert second.fn.factored.factor_traces == factor_traces == 1  # nor its factor generator
    # The factors come from the documented generator: gaussian_matrix(seed, "<weight>/in|out", r, n) / √r.
    from lmgrad.sketch.projectors import gaussian_matrix

    name, (p_out, p_in) = next((k, v) for k, v in second.fn.factored.factors().items() if v[1] is not None)
    w = second.fn.factored.modules[name].weight
    np.testing.assert_allclose(np.asarray(p_in), np.asarray(gaussian_matrix(1, f"{w}/in", *p_in.shape)) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p_out), np.asarray(gaussian_matrix(1, f"{w}/out", *p_out.shape)) / 2.0, rtol=1e-6)
    assert second.spec["factored"]["seed"] == 1 and second.layout == first.layout
    sketch_mod._SKETCHERS.clear()
    sketch_pairs(model, tasks, tmp_path / "fresh1", seed1)
    s0, s1 = lstore.open(tmp_path / "s0"), lstore.open(tmp_path / "s1")
    np.testing.assert_array_equal(s1.sketches, lstore.open(tmp_path / "fresh1").sketches)
    assert s1.config["sketch"] == lstore.open(tmp_path / "fresh1").config["sketch"]
    assert not np.allclose(s0.sketches, s1.sketches)
    sketch_mod._SKETCHERS.clear()


def test_bad_input(ckpt, model, tmp_path):
    with pytest.raises(ValueError, match="projector='nope'; valid: identity"):
        SketchOptions(projector="nope", k=8)
    with pytest.raises(ValueError, match="k must be"):
        SketchOptions(projector="gaussian", k=0)
    with pytest.raises(ValueError, match="method"):
        SketchOptions(method="magic")
    with pytest.raises(ValueError, match="global_k"):
        SketchOptions(method="factored", k=64)
    # A workdir holding another configuration is refused, saying what differs.
    tasks = select_tasks("blimp:passive_1", max_pairs_per_task=2)
    sketch_pairs(model, tasks, tmp_path / "b", SketchOptions(projector="gaussian", k=8, projection_seed=0))
    with pytest.raises(lstore.StoreMismatchError, match="seed"):
        sketch_pairs(model, tasks, tmp_path / "b", SketchOptions(projector="gaussian", k=8, projection_seed=1),
                     resume=True)


def test_nan_differential_names_the_pair(model, tmp_path):
    from lmgrad.grads import NonFiniteGradientError

    params = jax.tree.map(lambda x: x, model.params)
    w = params["model"]["layers_1"]["mlp"]["down_proj"]["weight"]
    params["model"]["layers_1"]["mlp"]["down_proj"]["weight"] = w.at[0, 0].set(np.nan)
    poisoned = type(model)(**{**model.__dict__, "params": params})
    tasks = select_tasks("blimp:passive_1", max_pairs_per_task=2)
    with pytest.raises(NonFiniteGradientError, match=r"UID='passive_1', pairID="):
        sketch_pairs(poisoned, tasks, tmp_path / "n", SketchOptions(projector="gaussian", k=8))
    st = lstore.open(tmp_path / "n")
    assert len(st) == 0


def _assert_same_rows(ref, got):
    """Row for row (order included), meta included, as an uninterrupted single-process run."""
    assert got.complete and len(got) == len(ref)
    np.testing.assert_allclose(got.sketches, ref.sketches, rtol=1e-5, atol=1e-6)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "process"} for r in recs]  # noqa: E731
    assert strip(got.meta_records()) == strip(ref.meta_records())


def test_two_processes_killed_resume_as_one_and_the_reverse(ckpt, model, tmp_path):
    # One process killed after a batch; resumed as two jax.distributed processes (127.0.0.1), both
    # killed after a batch each; resumed as one process. Every pair ends up exactly once, in the
    # order and with the values of an uninterrupted single-process run.
    import socket

    opts = SketchOptions(projector="sjlt", k=64, batch_size=2)
    tasks = select_tasks(TASKS, max_pairs_per_task=3)
    sketch_pairs(model, tasks, tmp_path / "single", opts)
    single = lstore.open(tmp_path / "single")
    assert len(single) == 9

    work = tmp_path / "multi"
    sketch_pairs(model, tasks, work, opts, max_batches=1)
    assert len(lstore.open(work)) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        cmd = [sys.executable, str(ROOT / "launch/sketch.py"), f"--model={ckpt}", f"--tasks={TASKS}",
               "--max_pairs_per_task=3", "--projector=sjlt", "--k=64", "--batch_size=2", "--distributed",
               "--resume", "--max_batches=1", f"--workdir={work}"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert sorted(d.name for d in work.iterdir() if d.is_dir()) == ["process-00000-g1", "process-00001-g1", "shards"]
    partial = lstore.open(work)
    assert isinstance(partial, lstore.MultiStore) and not partial.complete
    assert [len(p) for p in partial.parts] == [2, 2, 2] and partial.total_rows == 9

    sketch_pairs(model, tasks, work, opts, resume=True)  # one process again: generation 2
    _assert_same_rows(single, lstore.open(work))


def test_resume_on_other_process_counts_in_process(model, tmp_path):
    # The same deal without subprocesses: 2 processes killed → 3 → 1, and batches of another size
    # refused by name.
    opts = SketchOptions(projector="sjlt", k=32, batch_size=2)
    tasks = select_tasks("blimp:passive_1,wh_island", max_pairs_per_task=7)
    sketch_pairs(model, tasks, tmp_path / "single", opts)
    single = lstore.open(tmp_path / "single")
    work = tmp_path / "w"
    for i in range(2):
        sketch_pairs(model, tasks, work, opts, max_batches=1 + i, process_index=i, process_count=2)
    for i in range(3):
        sketch_pairs(model, tasks, work, opts, resume=True, max_batches=1, process_index=i, process_count=3)
    mid = lstore.open(work)
    assert not mid.complete and len(mid) == 12
    with pytest.raises(lstore.StoreMismatchError, match=r"process-0000\d.*batches"):
        sketch_pairs(model, tasks, work, dataclasses.replace(opts, batch_size=3), resume=True)
    with pytest.raises(lstore.StoreExistsError, match="resume"):
        sketch_pairs(model, tasks, work, opts)
    sketch_pairs(model, tasks, work, opts, resume=True)
    _assert_same_rows(single, lstore.open(work))
    # Finished: resuming again on any count adds nothing.
    sketch_pairs(model, tasks, work, opts, resume=True, process_index=1, process_count=2)
    _assert_same_rows(single, lstore.open(work))


def test_token_identical_pairs_are_dropped_and_recorded(model, tmp_path):
    # A tokenizer that lowercases makes "The cat ..." and "the cat ..." one token sequence: a pair
    # with an exactly-zero differential, which selection (comparing strings) cannot see.
    import json

    from tokenizers import normalizers

    from lmgrad.tasks import load_jsonl

    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    lower = type(model)(**{**model.__dict__, "tokenizer": tok})
    f = tmp_path / "pairs.jsonl"
    rows = [{"sentence_good": "The cat sat.", "sentence_bad": "the cat sat.", "UID": "case", "pairID": "0"},
            {"sentence_good": "The cats sat.", "sentence_bad": "The cats sits.", "UID": "case", "pairID": "1"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sketch_pairs(lower, load_jsonl(f), tmp_path / "s", SketchOptions(projector="gaussian", k=8))
    st = lstore.open(tmp_path / "s")
    assert st.complete and list(st.meta["pairID"]) == ["1"]
    assert st.config["loss"]["dropped_token_identical"] == [["case", "0"]]
    assert [t["n_token_identical_dropped"] for t in st.config["tasks"]] == [1]
    assert np.abs(st.sketches).sum() > 0


def test_packed_factored_killed_and_resumed_on_other_process_counts(model, tmp_path):
    # The factored default packs pairs into rows: a run stopped after a batch, resumed as two
    # processes (each stopped after a batch), then as one, ends with the rows, order and metadata
    # of an uninterrupted run; the store says how its rows were batched.
    opts = SketchOptions(method="factored", r_in=4, r_out=4, overrides=(), batch_size=3)
    tasks = select_tasks("blimp:passive_1,wh_island", max_pairs_per_task=7)
    sketch_pairs(model, tasks, tmp_path / "single", opts)
    single = lstore.open(tmp_path / "single")
    assert single.config["batching"] == "packed" and single.complete
    work = tmp_path / "w"
    sketch_pairs(model, tasks, work, opts, max_batches=1)
    for i in range(2):
        sketch_pairs(model, tasks, work, opts, resume=True, max_batches=1, process_index=i, process_count=2)
    mid = lstore.open(work)
    assert not mid.complete and 0 < len(mid) < len(single)
    sketch_pairs(model, tasks, work, opts, resume=True)
    _assert_same_rows(single, lstore.open(work))


def test_packed_and_bucketed_stores_hold_the_same_rows(model, tmp_path):
    # The same job packed and bucketed (scored from the first differing token: targets start inside
    # each sentence): the same pairs, each with the same row up to float32 rounding; only the order
    # and the recorded batching differ.
    tasks = select_tasks("blimp:passive_1,wh_island,anaphor_number_agreement", max_pairs_per_task=5)
    opts = SketchOptions(method="factored", r_in=3, r_out=5, overrides=(), batch_size=4, from_first_difference=True)
    sketch_pairs(model, tasks, tmp_path / "packed", opts)
    sketch_pairs(model, tasks, tmp_path / "bucketed", dataclasses.replace(opts, pack=False))
    a, b = lstore.open(tmp_path / "packed"), lstore.open(tmp_path / "bucketed")
    assert (a.config["batching"], b.config["batching"]) == ("packed", "bucketed")
    assert {k: v for k, v in a.config.items() if k != "batching"} == {k: v for k, v in b.config.items() if k != "batching"}
    keys = lambda st: list(zip(st.meta["UID"], st.meta["pairID"]))  # noqa: E731
    assert sorted(keys(a)) == sorted(keys(b)) and len(a) == 15
    where = {k: i for i, k in enumerate(keys(b))}
    order = [where[k] for k in keys(a)]
    ref = np.asarray(b.sketches)[order]
    np.testing.assert_allclose(np.asarray(a.sketches), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
