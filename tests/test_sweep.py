"""The sweep job (lmgrad.jobs.sweep) and the cross-run analysis (lmgrad.analysis.cross_run).

One tiny random Llama series (three checkpoints of one architecture, so the sketch programs compile
once: every sweep here shares one persistent compilation cache) runs through the smoke config end to
end; a sweep killed in the middle of its second run and resumed must end with the same store rows,
task spaces and cross-run statistics. The cross-run RSA interval is checked against a planted
population RSA in simulation, and the joint-bootstrap task spaces against
`estimators.resampled_spaces` (same weights, an independent implementation).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest

from helpers_launch import run_launcher
from helpers_tokenizer import save_tiny_llama
from lmgrad import store as lstore
from lmgrad.analysis import cross_run
from lmgrad.analysis.estimators import resampled_spaces, task_similarity
from lmgrad.jobs import pipeline as pipeline_job
from lmgrad.jobs import sweep
from lmgrad.jobs.schema import from_dict

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = (0, 4, 16)


def _config():
    spec = importlib.util.spec_from_file_location("sweep_config", ROOT / "configs" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save_step(path: pathlib.Path, step: int, *, layers: int = 1) -> None:
    """A tiny Llama whose weights drift from the seeded init as `step` grows (a stand-in for a
    pre-training series: later checkpoints differ more from the first)."""
    from safetensors.numpy import load_file, save_file

    save_tiny_llama(path, num_hidden_layers=layers)
    f = path / "model.safetensors"
    w = load_file(f)
    rng = np.random.default_rng(step)
    save_file({k: (v + 0.01 * np.sqrt(step) * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in w.items()},
              f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    for s in STEPS:
        _save_step(root / "tiny" / "hf" / f"step_{s:06d}", s)
    return root


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def _smoke(series, jax_cache) -> sweep.SweepOptions:
    return dataclasses.replace(_config().options("smoke"), pretrain_root=str(series), compile_cache=jax_cache)


@pytest.fixture(scope="module")
def full(series, jax_cache, tmp_path_factory):
    """The smoke sweep, uninterrupted, through the launcher."""
    work = tmp_path_factory.mktemp("full")
    run_launcher("sweep", [f"--config={ROOT / 'configs/sweep.py'}:smoke", f"--config.pretrain_root={series}",
                           f"--config.compile_cache={jax_cache}", "--noprogress", f"--workdir={work}"])
    return work


def _outputs(work: pathlib.Path, names: list[str]) -> dict:
    out = {}
    for name in names:
        d = work / "runs" / name
        st = lstore.open(d / "sketches")
        out[name, "rows"] = np.asarray(st.sketches)
        out[name, "keys"] = list(zip(st.meta["UID"], st.meta["pairID"]))
        with np.load(d / "task_space" / "task_space.npz") as z:
            out.update({(name, "npz", k): z[k] for k in z.files})
        out[name, "scores"] = (d / "eval" / "scores.jsonl").read_text()
    return out


def test_sweep_end_to_end(full):
    record = json.loads((full / sweep.SWEEP_JSON).read_text())
    names = [f"tiny@step_{s:06d}" for s in STEPS]
    assert list(record["runs"]) == names
    assert all(r["status"] == "done" for r in record["runs"].values())
    for n in names:
        assert (full / "runs" / n / "pipeline.json").exists()
    stats = json.loads((full / "cross_run" / "stats.json").read_text())
    assert stats["rsa"]["names"] == names
    rsa = np.array(stats["rsa"]["matrix"], float)
    assert rsa.shape == (3, 3) and np.allclose(rsa, rsa.T, equal_nan=True)
    # Each run's controlled fit is read from its own task-space stats, not recomputed.
    for p in stats["runs"]:
        own = json.loads((full / "runs" / p["name"] / "task_space" / "stats.json").read_text())
        want = (own.get("controlled") or {}).get("coef")
        assert (p["controlled_fit"] or {}).get("coef") == want
        acc = json.loads((full / "runs" / p["name"] / "eval" / "summary.json").read_text())["overall"]["accuracy"]
        assert p["accuracy"] == acc
    claims = stats["claims"]
    assert list(claims["distributed_over_training"]) == ["tiny"]
    assert [c["to"] for c in claims["stability_over_training"]["tiny"]["consecutive"]] == names[1:]
    for f in ("report.md", "rsa_heatmap.png", "metrics_over_step.png"):
        assert (full / "cross_run" / f).stat().st_size > 0
    # Checkpoints of one architecture reuse compiled programs: the first run compiles the scorer,
    # the later ones find it (same model object) and the sketch programs (persistent cache).
    t = [record["runs"][n]["timings_s"] for n in names]
    assert t[1]["pipeline:evaluate"] < t[0]["pipeline:evaluate"] / 2
    assert t[1]["pipeline:sketch:sketches"] < t[0]["pipeline:sketch:sketches"] / 2


def test_finished_runs_are_skipped(full, series, jax_cache):
    def never(*a, **k):
        raise AssertionError("a finished run was run again")

    before = (full / "cross_run" / "stats.json").read_text()
    record = sweep.run(_smoke(series, jax_cache), full, progress=False, run_pipeline=never)
    assert all(r["status"].startswith("skipped") for r in record["runs"].values())
    assert (full / "cross_run" / "stats.json").read_text() == before


def test_killed_sweep_resumes_to_the_same_outputs(full, series, jax_cache, tmp_path, monkeypatch):
    # A two-checkpoint sweep killed in the middle of its second run (rows committed), resumed: its
    # runs end with the rows, scores and task spaces of the uninterrupted sweep's same runs, and
    # its cross-run statistics equal the analysis of those uninterrupted runs.
    from lmgrad.store.writer import StoreWriter

    opts = dataclasses.replace(_smoke(series, jax_cache), series_steps=f"{STEPS[0]},{STEPS[1]}")
    names = [f"tiny@step_{s:06d}" for s in STEPS[:2]]
    work = tmp_path / "sweep"
    calls = {"run": 0, "writes": 0}
    write = StoreWriter.write

    def crashing_write(self, *a, **k):
        calls["writes"] += 1
        if calls["run"] == 2 and calls["writes"] == 2:
            raise RuntimeError("killed")
        return write(self, *a, **k)

    def pipeline(*a, **k):
        calls["run"] += 1
        calls["writes"] = 0
        return pipeline_job.run(*a, **k)

    monkeypatch.setattr(StoreWriter, "write", crashing_write)
    with pytest.raises(RuntimeError, match="killed"):
        sweep.run(opts, work, progress=False, run_pipeline=pipeline)
    st = lstore.open(work / "runs" / names[1] / "sketches", verify=False)
    assert 0 < len(st) < st.total_rows and not (work / "runs" / names[1] / "pipeline.json").exists()
    monkeypatch.setattr(StoreWriter, "write", write)
    record = sweep.run(opts, work, progress=False)
    assert record["runs"][names[0]]["status"].startswith("skipped")
    assert record["runs"][names[1]]["status"] == "done"
    a, b = _outputs(full, names), _outputs(work, names)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
        else:
            assert a[k] == b[k], k
    uninterrupted = json.loads((full / sweep.SWEEP_JSON).read_text())["runs"]
    co = opts.cross_run
    cross_run.analyze([cross_run.RunRecord(n, str(full / "runs" / n), "tiny", uninterrupted[n]["num_params"], s)
                       for n, s in zip(names, STEPS)], tmp_path / "reference", n_boot=co.n_boot, seed=co.seed,
                      alpha=co.alpha, rsa=co.rsa, interval=co.interval, n_splits=co.n_splits, category=co.category)
    # Compared as text: NaN entries (undefined statistics) compare equal there.
    assert (work / "cross_run" / "stats.json").read_text() == (tmp_path / "reference" / "stats.json").read_text()


def test_options_differing_from_a_run_are_an_error(full, series, jax_cache):
    opts = _smoke(series, jax_cache)
    other = dataclasses.replace(opts, pipeline=dataclasses.replace(
        opts.pipeline, inputs=dataclasses.replace(opts.pipeline.inputs, pair_seed=1)))
    with pytest.raises(sweep.SweepMismatchError, match=r"tiny@step_000000.*inputs\.pair_seed"):
        sweep.run(other, full, progress=False)


def test_another_architecture_in_a_resumed_run_is_an_error(tmp_path, jax_cache):
    root = tmp_path / "pretrain"
    ckpt = root / "tiny" / "hf" / "step_000000"
    _save_step(ckpt, 0)
    opts = dataclasses.replace(_config().options("smoke"), pretrain_root=str(root), compile_cache=jax_cache)

    def killed(*a, **k):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        sweep.run(opts, tmp_path / "sweep", progress=False, run_pipeline=killed)
    # A run recorded with another execution-only setting (scanned layers) resumes: same architecture.
    rec = next((tmp_path / "sweep" / "runs").glob("*/sweep_run.json"))
    recorded = json.loads(rec.read_text())
    recorded["architecture"]["scan_layers"] = True
    rec.write_text(json.dumps(recorded))
    with pytest.raises(RuntimeError, match="killed"):
        sweep.run(opts, tmp_path / "sweep", progress=False, run_pipeline=killed)
    shutil.rmtree(ckpt)
    _save_step(ckpt, 0, layers=2)
    with pytest.raises(sweep.SweepMismatchError, match=r"tiny@step_000000.*num_layers"):
        sweep.run(opts, tmp_path / "sweep", progress=False, run_pipeline=killed)


def test_joint_bootstrap_spaces_match_the_estimators_bootstrap():
    # Same seed, same per-task multinomial draws: the gram-factor path must reproduce
    # estimators.resampled_spaces (which works on the raw rows), and all-ones weights the plain
    # unbiased estimator.
    sim = cross_run.planted_runs(n_tasks=5, n_pairs=9, k=200, seed=3)
    x, tasks = sim["x_a"], sim["tasks"]
    y = cross_run.gram_factor(x.astype(np.float32))
    assert y.shape[1] <= len(x) < x.shape[1]
    names, idx = np.unique(tasks, return_inverse=True)
    w = cross_run.joint_weights(idx, 30, seed=7)
    np.testing.assert_allclose(cross_run.weighted_spaces(y, idx, w), resampled_spaces(x, tasks, n_boot=30, seed=7)[1],
                               atol=1e-8, equal_nan=True)
    np.testing.assert_allclose(cross_run.weighted_spaces(y, idx, np.ones((1, len(idx))))[0],
                               task_similarity(x, tasks).sim, atol=1e-8, equal_nan=True)


def test_rsa_interval_covers_a_planted_rsa():
    # 90% basic-bootstrap intervals over 60 simulated pairs of runs (shared pairs, correlated
    # noise, 20 pairs per task at coherence 0.2): coverage within 3 binomial SDs of nominal, and
    # a truth shifted by 0.35 is covered far less often (the intervals are not merely wide).
    reps, hit, shifted = 60, 0, 0
    for s in range(reps):
        p = cross_run.planted_runs(n_tasks=10, n_pairs=20, k=64, coherence=0.2, noise_corr=0.5, seed=s)
        c = cross_run.compare([p["x_a"], p["x_b"]], p["tasks"], ["a", "b"], n_boot=100, seed=s, alpha=0.1,
                              n_splits=2)
        hit += c.rsa_low[0, 1] <= p["rsa"] <= c.rsa_high[0, 1]
        shifted += c.rsa_low[0, 1] <= p["rsa"] + 0.35 <= c.rsa_high[0, 1]
    sd = np.sqrt(0.9 * 0.1 / reps)
    assert hit / reps >= 0.9 - 3 * sd, hit / reps
    assert shifted / reps <= 0.5, shifted / reps


def test_rsa_point_estimates_recover_a_planted_rsa_under_shared_noise():
    # One population space seen by two runs (planted RSA 1) through noisy pairs whose noise the
    # runs share (correlation 0.9), at low coherence: the raw RSA is attenuated far below 1; the
    # bias-corrected estimate removes much of that, and the cross-half disattenuated RSA (disjoint
    # pairs, so independent noise) recovers the truth within its simulation error. With a planted
    # RSA near 0.5 it is not pulled towards 1 by the shared noise.
    def run(mix, reps=16):
        out = {"raw": [], "corrected": [], "dis": [], "truth": []}
        for s in range(reps):
            p = cross_run.planted_runs(n_tasks=12, n_pairs=24, k=64, coherence=0.02, noise_corr=0.9, mix=mix,
                                       seed=100 + s)
            c = cross_run.compare([p["x_a"], p["x_b"]], p["tasks"], ["a", "b"], n_boot=40, seed=s, alpha=0.1,
                                  n_splits=8)
            out["raw"].append(c.rsa_raw[0, 1])
            out["corrected"].append(c.rsa[0, 1])
            out["dis"].append(c.disattenuated[0, 1])
            out["truth"].append(p["rsa"])
        return {k: np.array(v) for k, v in out.items()}

    same = run(0.0)
    bias = {k: float(np.mean(same[k] - same["truth"])) for k in ("raw", "corrected", "dis")}
    se = float(np.std(same["dis"]) / np.sqrt(len(same["dis"])))
    assert bias["raw"] < -0.1, bias
    assert abs(bias["corrected"]) < 0.6 * abs(bias["raw"]), bias
    assert abs(bias["dis"]) < max(3 * se, 0.05), (bias, se)
    half = run(0.5)
    assert abs(np.mean(half["dis"] - half["truth"])) < 0.15, half


def test_sharing_interval_covers_a_planted_block_structure():
    # 24 tasks in 6 categories, planted within-category cosine 0.4 and 0 between, 24 pairs per task
    # at coherence 0.01 (noisier than the CPU series): the raw sharing estimate is unbiased within
    # its simulation error and its 90% percentile interval covers the planted value near nominally.
    from lmgrad.analysis.estimators import simulate_task_space

    cats = np.repeat(np.arange(6), 4)
    iu = np.triu_indices(24, 1)
    same = cats[iu[0]] == cats[iu[1]]
    errs, hit, reps = [], 0, 30
    for s in range(reps):
        sim = simulate_task_space(24, 24, 128, coherence=0.01, seed=s, blocks=[4] * 6, within=0.4,
                                  dtype=np.float64)
        truth = sim.true_cos[iu][same].mean() - sim.true_cos[iu][~same].mean()
        _, idx = np.unique(sim.tasks, return_inverse=True)
        y = cross_run.gram_factor(sim.x_nk)
        est = cross_run.sharing(cross_run.weighted_spaces(y, idx, np.ones((1, len(idx)))), cats)[0]
        boot = cross_run.sharing(cross_run.weighted_spaces(y, idx, cross_run.joint_weights(idx, 100, s)), cats)
        lo, hi = cross_run.interval(est, boot, 0.1, "percentile")
        hit += lo <= truth <= hi
        errs.append(est - truth)
    assert abs(np.mean(errs)) < 3 * np.std(errs) / np.sqrt(reps) + 0.01, np.mean(errs)
    assert hit / reps >= 0.9 - 3 * np.sqrt(0.09 / reps), hit / reps


def test_config_variants(tmp_path):
    mod = _config()
    for arg in (None, "cpu_sizes", "cpu_steps", "real", "hub_zoo", "smoke"):
        opts = mod.options(arg)
        assert from_dict(sweep.SweepOptions, mod.get_config(arg).to_dict()) == opts
    assert {r.model for r in mod.options("real").runs} == {"smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"}
    assert all(r.step is not None for r in mod.options("hub_zoo").runs if "@step" in r.name)
    # cpu_steps against a pretrain root laid out as configs/pretrain.py exports it.
    steps = [0] + [2 ** i for i in range(10)] + [600]
    for name in mod.CPU_SERIES:
        for s in steps:
            d = tmp_path / name / "hf" / f"step_{s:06d}"
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
            (d / "model.safetensors").write_bytes(b"")
    runs = dataclasses.replace(mod.options("cpu_steps"), pretrain_root=str(tmp_path)).expand()
    by = {n: [r.step for r in runs if r.size == n] for n in mod.CPU_SERIES}
    for n, got in by.items():
        assert got[0] == 0 and got[-1] == 600 and len(got) >= 6 and got == sorted(set(got))
        # log-spaced: consecutive picks are roughly evenly spread in log(1 + step)
        gaps = np.diff(np.log1p(got))
        assert gaps.max() < 3 * gaps.min() + 1.0
    assert runs[0].name == "cpu_s@step_000000" and runs[0].model == str(tmp_path / "cpu_s/hf/step_000000")
    last = dataclasses.replace(mod.options("cpu_sizes"), pretrain_root=str(tmp_path)).expand()
    assert [r.name for r in last] == [f"{n}@step_000600" for n in mod.CPU_SERIES]
    with pytest.raises(ValueError, match="not among the exported steps"):
        sweep.select_steps(steps, "0,3")
    with pytest.raises(ValueError, match="series_steps"):
        sweep.SweepOptions(series_steps="log:x")


def test_probe_batches_the_mesh_cannot_split_are_refused_before_any_run(series, jax_cache, tmp_path):
    opts = _smoke(series, jax_cache)
    opts = dataclasses.replace(opts, probe=True, probe_options=dataclasses.replace(
        opts.probe_options, pack=False, batch_size=6))
    opts = dataclasses.replace(opts, pipeline=dataclasses.replace(
        opts.pipeline, inputs=dataclasses.replace(opts.pipeline.inputs, mesh="data:4")))

    def never(*a, **k):
        raise AssertionError("a run started")

    with pytest.raises(ValueError, match=r"--batch_size=6 is not a multiple of the mesh's data axis \(4"):
        sweep.run(opts, tmp_path / "sweep", progress=False, run_pipeline=never)
    assert not (tmp_path / "sweep" / "runs").exists()
