"""The task-space stage (lmgrad.jobs.task_space, launch/task_space.py in-process) end to end on a small
synthetic store with planted category structure."""
import json
import os

import numpy as np
import pytest

from helpers_launch import run_launcher
from lmgrad import store as lstore
from lmgrad.jobs import task_space as job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = ["agr", "agr", "agr", "island", "island", "island", "npi", "npi", "npi"]
K_BLOCK = 8


def _layout():
    out, off = [], 0
    for layer in range(2):
        for m in ("self_attn.q_proj", "mlp.down_proj"):
            out.append({"name": f"model.layers.{layer}.{m}.weight", "offset": off,
                        "size": K_BLOCK})
            off += K_BLOCK
    return out


def _make_store(path, *, seed=0, n=10, cats=CATS, nan_row=None, layout=True):
    """9 tasks in 3 categories: task mean = category vector + jitter, pairs = mean + noise."""
    rng = np.random.default_rng(seed)
    k = 4 * K_BLOCK
    cv = {c: rng.normal(size=k) for c in sorted(set(cats))}
    rows, meta = [], []
    for t, c in enumerate(cats):
        mu = cv[c] + 0.3 * rng.normal(size=k)
        for i in range(n):
            rows.append(mu + 1.0 * rng.normal(size=k))
            meta.append({"UID": f"task_{t}", "pairID": i, "field": "syntax" if t < 6 else
                         "semantics", "linguistics_term": c})
    rows = np.array(rows, np.float32)
    if nan_row is not None:
        rows[nan_row, 0] = np.nan
    return lstore.write_store(str(path), rows, meta,
                              config={"model": "toy-llama", "projector": "gaussian", "seed": seed},
                              k=k, layout=_layout() if layout else None)


def _run(store, out, hypothesis="linguistics_term", **kw):
    return job.run(job.TaskSpaceOptions(hypothesis=hypothesis, **kw), store, out)


def test_launcher_end_to_end(tmp_path, capsys):
    _make_store(tmp_path / "store")
    _make_store(tmp_path / "store_b", seed=0)
    out = tmp_path / "out"
    run_launcher("task_space", [f"--store={tmp_path / 'store'}", "--hypothesis=linguistics_term",
                                f"--workdir={out}", "--n_boot=50", "--ci_method=bc", "--n_perm=299", "--n_splits=5",
                                f"--store_b={tmp_path / 'store_b'}"])
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    for f in ("task_space.npz", "stats.json", "heatmap.png", "layers.png", "hypothesis.png",
              "report.md"):
        assert (out / f).stat().st_size > 0, f
    z = np.load(out / "task_space.npz")
    tasks = list(z["tasks"])
    assert tasks == [f"task_{i}" for i in range(9)]
    assert z["similarity"].shape == (9, 9) == z["ci_low"].shape == z["ci_high"].shape
    assert list(z["groups"]) == ["layers.0", "layers.1"]
    assert z["layer_layers.0"].shape == (9, 9)
    iu = np.triu_indices(9, 1)
    # Intervals need not contain the estimate (a cosine near 1 can exceed every resample's);
    # stats.json counts such entries instead.
    assert np.all(z["ci_low"][iu] < z["ci_high"][iu])
    stats = json.load(open(out / "stats.json"))
    assert stats["bootstrap"]["method"] == "bc"
    assert 0 <= stats["bootstrap"]["n_estimate_outside"] <= 36
    assert stats["n_tasks"] == 9 and stats["pairs_per_task"]["min"] == 10
    assert stats["provenance"]["model"] == "toy-llama"
    mantel = stats["tests"]["mantel"]
    assert mantel["p_value"] < 0.01 and mantel["statistic"] > 0.5
    assert stats["tests"]["within_between"]["p_value"] < 0.01
    assert stats["tests"]["cluster_ari"]["statistic"] == pytest.approx(1.0)
    assert stats["reliability"]["spearman_brown"] > 0.7
    assert stats["sketch_check"]["statistic"] == pytest.approx(1.0)  # same seed: same store
    report = open(out / "report.md").read()
    assert "toy-llama" in report and "heatmap.png" in report
    assert "more similar than others" in report


def test_field_and_file_hypotheses(tmp_path):
    _make_store(tmp_path / "store")
    paths = _run(tmp_path / "store", tmp_path / "o1", "field", n_boot=20, n_perm=99, n_splits=3,
                 group_by="module_type")
    z = np.load(paths["npz"])
    assert sorted(z["groups"]) == ["mlp.down_proj", "self_attn.q_proj"]
    assert json.load(open(paths["stats"]))["hypothesis"]["n_categories"] == 2
    hyp = tmp_path / "h.json"
    hyp.write_text(json.dumps({f"task_{i}": CATS[i] for i in range(9)}))
    paths = _run(tmp_path / "store", tmp_path / "o2", str(hyp), n_boot=20, n_perm=99, n_splits=3)
    assert json.load(open(paths["stats"]))["tests"]["mantel"]["p_value"] < 0.05
    hyp.write_text(json.dumps({**{f"task_{i}": CATS[i] for i in range(9)}, "ghost": "x"}))
    with pytest.raises(ValueError, match="ghost"):
        _run(tmp_path / "store", tmp_path / "o3", str(hyp))


def test_global_layout_and_bad_stores(tmp_path, capsys):
    _make_store(tmp_path / "g", layout=False)
    paths = _run(tmp_path / "g", tmp_path / "og", n_boot=20, n_perm=99, n_splits=3)
    assert list(np.load(paths["npz"])["groups"]) == ["global"]
    assert "no per-layer" in open(paths["report"]).read()

    _make_store(tmp_path / "one", cats=["agr"], n=5)
    with pytest.raises(ValueError, match="needs >= 2 tasks"):
        _run(tmp_path / "one", tmp_path / "o1")
    # From the command line: the message alone, exit status 1.
    with pytest.raises(SystemExit) as exit_:
        run_launcher("task_space", [f"--store={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'o4'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: ") and "nowhere" in err and "Traceback" not in err

    # The store itself refuses NaN rows (naming them), so a NaN can only reach the analysis from
    # arrays; that path is covered in test_analysis.test_bad_inputs.
    with pytest.raises(ValueError, match=r"row 3 .*task_0"):
        _make_store(tmp_path / "nan", nan_row=3)
