"""The probe stage (lmgrad.jobs.probe, launch/probe.py, configs/probe.py) on a tiny random Llama:
the smoke config runs end to end and writes what the README promises; tuned parameters are saved
only when asked; bad input is refused with one line naming the cause."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import numpy as np
import pytest

from helpers_launch import run_launcher
from helpers_tokenizer import save_tiny_llama
from lmgrad.jobs import probe as job
from lmgrad.models import load_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_probe")
    save_tiny_llama(path, num_hidden_layers=1)
    return path


def smoke_options(ckpt):
    spec = importlib.util.spec_from_file_location("probe_config", ROOT / "configs" / "probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    opts = mod.options("smoke")
    inputs, probe = opts.inputs, opts.probe
    assert mod.get_config("smoke").probe.steps == probe.steps and mod.get_config().inputs.model == "smollm2"
    return dataclasses.replace(inputs, model=str(ckpt)), probe


def test_smoke_job_writes_the_transfer_space(ckpt, tmp_path):
    inputs, probe = smoke_options(ckpt)
    probe = dataclasses.replace(probe, save_tuned=True, n_perm=20)
    res = job.run(inputs, probe, tmp_path, model=load_model(str(ckpt)), progress=False, target="passive_1")
    for name in ("transfer.npz", "stats.json", "report.md", "transfer.png", "mask_overlap.png", "first_order.png"):
        assert (tmp_path / name).is_file(), name
    z = np.load(tmp_path / "transfer.npz")
    t = len(z["tasks"])
    assert t == 4 and z["transfer_margin"].shape == (t, t) and z["transfer_accuracy"].shape == (t, t)
    np.testing.assert_allclose(z["transfer_margin"], z["after_margin"] - z["before_margin"][None])
    assert z["mask_jaccard"].shape == (t, t) and np.allclose(np.diag(z["mask_jaccard"]), 1.0)
    assert np.isfinite(z["after_perplexity"]).all() and z["one_step_transfer_margin"].shape == (1, t, t)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["options"]["objective"] == "logistic" and stats["summary"]["failed"] == {}
    assert "unmasked" in stats["summary"] and stats["stats"]["one_step"][0]["lr"] == 1e-3
    # The first-order regime: one small SGD step is predicted by ⟨h_j, M_i ⊙ ∇L_i⟩.
    assert stats["stats"]["one_step"][0]["masked"]["with_diagonal"]["r"] > 0.99
    assert set(res["ranking"]) >= {"target", "gradient_alignment_masked", "mask_overlap", "measured_margin"}
    assert "passive_1" not in res["ranking"]["mask_overlap"]
    report = (tmp_path / "report.md").read_text()
    assert "objective **logistic**" in report and "Auxiliary-task ranking" in report
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == sorted(z["tasks"].tolist())


def test_probe_on_a_device_mesh_equals_one_device(ckpt, tmp_path, monkeypatch):
    """Rows split over a data axis (and parameters over fsdp) change nothing but float32 summation
    order: every array of the job agrees with the one-device run (4 simulated CPU devices), and every
    batch the job computed on (gradients, tuning steps, evaluation) was split over the data axis."""
    from lmgrad.transfer import predict, tune

    split: dict[tuple[str, int], set[int]] = {}   # (caller, row axis) → ways each batch was split

    def recording(who, real):
        def on_rows(arrays, mesh, axis=0):
            out = real(arrays, mesh, axis)
            for v in out.values():
                split.setdefault((who, axis), set()).add(v.shape[axis] // v.sharding.shard_shape(v.shape)[axis])
            return out
        return on_rows

    monkeypatch.setattr(tune, "on_rows", recording("tune", tune.on_rows))
    monkeypatch.setattr(predict, "on_rows", recording("predict", tune.on_rows))
    inputs, probe = smoke_options(ckpt)
    probe = dataclasses.replace(probe, n_perm=20)
    model = load_model(str(ckpt))
    out = {}
    for mesh, ways in (("data:1,fsdp:1", 1), ("data:4", 4), ("data:2,fsdp:2", 2)):
        split.clear()
        job.run(dataclasses.replace(inputs, mesh=mesh), probe, tmp_path / mesh, model=model, progress=False)
        out[mesh] = np.load(tmp_path / mesh / "transfer.npz")
        # Task gradients (predict), evaluation (tune, rows on axis 0), tuning steps (tune, axis 1):
        # every batch of each split as many ways as the data axis.
        assert split == {("predict", 0): {ways}, ("tune", 0): {ways}, ("tune", 1): {ways}}, (mesh, split)
    for mesh in ("data:4", "data:2,fsdp:2"):
        _assert_same_job(tmp_path / mesh, out[mesh], out["data:1,fsdp:1"])


def _assert_same_job(workdir, got, ref):
    stats = json.loads((workdir / "stats.json").read_text())
    assert stats["inputs"]["mesh"] == workdir.name and stats["summary"]["failed"] == {}
    for k in ref.files:
        if ref[k].dtype.kind == "f":   # margins are differences of log-probs of ~30 nats: 1e-5 of it
            scale = max(float(np.nanmax(np.abs(ref[k]))), 1.0)
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=5e-4 * scale, err_msg=f"{workdir.name} {k}")
        else:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{workdir.name} {k}")


def test_bucketed_probe_on_a_device_mesh_equals_one_device(ckpt, tmp_path):
    inputs, probe = smoke_options(ckpt)
    probe = dataclasses.replace(probe, n_perm=20, pack=False, batch_size=4, eval_batch_size=4,
                                compare_unmasked=False)
    model = load_model(str(ckpt))
    out = {}
    for mesh in ("data:1,fsdp:1", "data:4"):
        job.run(dataclasses.replace(inputs, mesh=mesh), probe, tmp_path / mesh, model=model, progress=False)
        out[mesh] = np.load(tmp_path / mesh / "transfer.npz")
    _assert_same_job(tmp_path / "data:4", out["data:4"], out["data:1,fsdp:1"])


def test_bucketed_probe_needs_batches_that_split_over_the_mesh(ckpt, tmp_path):
    inputs, probe = smoke_options(ckpt)
    probe = dataclasses.replace(probe, pack=False, batch_size=6)
    with pytest.raises(ValueError, match=r"--batch_size=6 is not a multiple of the mesh's data axis \(4; --mesh"):
        job.run(dataclasses.replace(inputs, mesh="data:4"), probe, tmp_path, model=load_model(str(ckpt)),
                progress=False)


def test_launcher_refuses_bad_input(ckpt, tmp_path, capsys):
    base = [f"--model={ckpt}", "--tasks=blimp:passive_1,passive_2", f"--workdir={tmp_path}"]
    with pytest.raises(SystemExit) as e:
        run_launcher("probe", base + ["--top_p=1.5", "--max_pairs_per_task=6"])
    assert e.value.code == 1 and "top_p must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_launcher("probe", base + ["--max_pairs_per_task=3", "--held_out=4"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "too few for a held-out split" in err and "passive_1" in err


def test_killed_probe_resumes_to_the_same_outputs(ckpt, tmp_path, monkeypatch):
    """A run killed mid-tuning resumes from WORKDIR/progress/: finished task gradients, the evaluation
    before tuning and finished groups are loaded, not recomputed, and the outputs equal an
    uninterrupted run's; a rerun with other settings is refused while the unfinished run is there."""
    inputs, probe = smoke_options(ckpt)
    probe = dataclasses.replace(probe, n_perm=20)
    model = load_model(str(ckpt))
    job.run(inputs, probe, tmp_path / "whole", model=model, progress=False)
    assert not (tmp_path / "whole" / "progress").exists()

    real_evaluate, real_gradient = job.ttune.evaluate, job.tpred.task_gradient
    evaluations, gradients = [], []

    def killed_at_third_evaluation(*a, **k):   # before, then tuned groups: dies in the tuning phases
        evaluations.append(1)
        if len(evaluations) == 3:
            raise RuntimeError("killed")
        return real_evaluate(*a, **k)

    monkeypatch.setattr(job.ttune, "evaluate", killed_at_third_evaluation)
    with pytest.raises(RuntimeError, match="killed"):
        job.run(inputs, probe, tmp_path / "resumed", model=model, progress=False)
    assert (tmp_path / "resumed" / "progress" / "before.npz").is_file()
    monkeypatch.setattr(job.ttune, "evaluate", real_evaluate)
    with pytest.raises(job.ProbeResumeError, match=r"options\.top_p"):
        job.run(inputs, dataclasses.replace(probe, top_p=0.1), tmp_path / "resumed", model=model, progress=False)

    monkeypatch.setattr(job.tpred, "task_gradient", lambda *a, **k: gradients.append(1) or real_gradient(*a, **k))
    res = job.run(inputs, probe, tmp_path / "resumed", model=model, progress=False)
    assert gradients == []
    assert res["resumed"]["gradients"] == 4 and res["resumed"]["before"] == 1
    assert sum(v for s, v in res["resumed"].items() if s not in ("gradients", "before")) == 1   # one group
    assert not (tmp_path / "resumed" / "progress").exists()
    whole, resumed = np.load(tmp_path / "whole" / "transfer.npz"), np.load(tmp_path / "resumed" / "transfer.npz")
    assert sorted(whole.files) == sorted(resumed.files)
    for k in whole.files:
        if whole[k].dtype.kind == "f":
            np.testing.assert_allclose(resumed[k], whole[k], rtol=1e-6, atol=1e-7, err_msg=k)
        else:
            np.testing.assert_array_equal(resumed[k], whole[k], err_msg=k)
