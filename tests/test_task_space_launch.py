"""The task-space stage (lmgrad.jobs.task_space, launch/task_space.py in-process) end to end on small
synthetic stores: planted category structure with sentences in meta, a planted surface-only effect
(the controlled test must not reject where the plain Mantel test does), and an old store without
sentences."""
import json
import os
import time

import numpy as np
import pytest

from helpers_launch import run_launcher
from lmgrad import store as lstore
from lmgrad.analysis import estimators as E
from lmgrad.analysis import surface as S
from lmgrad.jobs import task_space as job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = ["agr"] * 4 + ["island"] * 4 + ["npi"] * 4
K_BLOCK = 8
WORDS = ["dog", "cat", "bird", "fish", "tree", "house", "car", "road", "sun", "moon", "lamp",
         "book", "door", "cup", "shoe", "hat", "boat", "rock", "leaf", "star"]


def _layout(k_block=K_BLOCK):
    out, off = [{"name": "model.embed_tokens.weight", "offset": 0, "size": k_block}], k_block
    for layer in range(2):
        for m in ("input_layernorm", "self_attn.q_proj", "mlp.down_proj"):
            out.append({"name": f"model.layers.{layer}.{m}.weight", "offset": off,
                        "size": k_block})
            off += k_block
    return out


def _sentences(rng, t, i):
    """Pairs whose words are unrelated to the categories: one task-specific word changes."""
    subj = WORDS[(t * 3 + i) % len(WORDS)]
    verb = f"verb{t}x{i % 3}"
    n = 3 + (i % 4)
    filler = " ".join(rng.choice(WORDS, size=n))
    return f"the {subj} {verb}s {filler} .", f"the {subj} {verb} {filler} ."


def _make_store(path, *, seed=0, n=10, cats=CATS, sentences=True, layout=True, nan_row=None):
    """Tasks in categories: task mean = category vector + jitter, pairs = mean + noise."""
    rng = np.random.default_rng(seed)
    lay = _layout()
    k = sum(b["size"] for b in lay)
    cv = {c: rng.normal(size=k) for c in sorted(set(cats))}
    rows, meta = [], []
    for t, c in enumerate(cats):
        mu = cv[c] + 0.3 * rng.normal(size=k)
        for i in range(n):
            rows.append(mu + 1.0 * rng.normal(size=k))
            m = {"UID": f"task_{t:02d}", "pairID": i,
                 "field": "syntax" if c != "npi" else "semantics", "linguistics_term": c}
            if sentences:
                g, b = _sentences(rng, t, i)
                m.update(sentence_good=g, sentence_bad=b, n_tokens_good=len(g.split()) + 1,
                         n_tokens_bad=len(b.split()) + 1)
            meta.append(m)
    rows = np.array(rows, np.float32)
    if nan_row is not None:
        rows[nan_row, 0] = np.nan
    return lstore.write_store(str(path), rows, meta,
                              config={"model": "toy-llama", "projector": "gaussian", "seed": seed},
                              k=k, layout=lay if layout else None)


def _run(store, out, hypothesis="linguistics_term", **kw):
    return job.run(job.TaskSpaceOptions(hypothesis=hypothesis, **kw), store, out)


def test_launcher_end_to_end(tmp_path, capsys):
    _make_store(tmp_path / "store")
    _make_store(tmp_path / "store_b", seed=0)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    run_launcher("task_space", [f"--store={tmp_path / 'store'}", "--hypothesis=linguistics_term",
                                f"--workdir={out}", "--n_boot=50", "--n_perm=299", "--n_splits=5",
                                f"--store_b={tmp_path / 'store_b'}"])
    assert time.perf_counter() - t0 < 30
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    for f in ("task_space.npz", "stats.json", "heatmap.png", "layers.png", "hypothesis.png",
              "coclustering.png", "report.md"):
        assert (out / f).stat().st_size > 0, f
    z = np.load(out / "task_space.npz")
    t = len(CATS)
    assert list(z["tasks"]) == [f"task_{i:02d}" for i in range(t)]
    assert str(z["kind"]) == "unbiased" and str(z["interval"]) == "jackknife"
    for key in ("similarity", "similarity_raw", "similarity_pair", "similarity_unbiased", "ci_low",
                "ci_high", "coclustering", "surface_diff_words", "surface_bow",
                "surface_length_tokens"):
        assert z[key].shape == (t, t), key
    np.testing.assert_array_equal(z["similarity"], z["similarity_unbiased"])
    assert list(z["groups"]) == ["embed", "layers.0", "layers.1"]
    iu = np.triu_indices(t, 1)
    assert np.all(z["ci_low"][iu] <= z["similarity"][iu] + 1e-12)
    assert np.all(z["similarity"][iu] <= z["ci_high"][iu] + 1e-12)
    # The unbiased cosine is not pulled toward 0 by the noise the raw cosine of means carries.
    same = z["hypothesis"][iu] == 1
    assert z["similarity"][iu][same].mean() > z["similarity_raw"][iu][same].mean()
    stats = json.load(open(out / "stats.json"))
    assert stats["n_tasks"] == t and stats["pairs_per_task"]["min"] == 10
    assert stats["provenance"]["model"] == "toy-llama"
    assert stats["similarity"]["undefined"] == {}
    # Planted category structure, surface unrelated to it: the controlled test leads and rejects.
    assert stats["headline"]["test"] == "controlled"
    ctrl = stats["controlled"]
    assert ctrl["method"] == "freedman_lane" and "Dekker" in ctrl["reference"]
    assert ctrl["p_value"] < 0.01 and ctrl["n"] == t * (t - 1) // 2
    assert set(stats["surface"]["fits"]) == {"diff_words", "bow", "length", "length_tokens"}
    assert stats["tests"]["mantel"]["p_value"] < 0.01
    assert stats["tests"]["within_between"]["p_value"] < 0.01
    assert stats["tests"]["cluster_ari"]["statistic"] == pytest.approx(1.0)
    rob = {row["name"]: row for row in stats["robustness"]}
    assert list(rob) == ["euclidean", "equal_blocks", "no_norms", "no_embed_head",
                         "preconditioned"]
    assert all(row["available"] for row in rob.values())
    for row in rob.values():
        assert row["tests"]["mantel"]["p_value"] < 0.05, row["name"]
        assert row["controlled"]["p_value"] < 0.05, row["name"]
    assert stats["preconditioner"]["damping"] == 0.1
    assert "own differential sketches" in stats["preconditioner"]["reference"]
    cat_blocks = {b["block"]: b for b in stats["stability"]["categories"]}
    assert set(cat_blocks) == {"agr", "island", "npi"}
    assert all(b["verdict"] == "stable" and b["within"] > 0.9 for b in cat_blocks.values())
    assert stats["reliability"]["spearman_brown"] > 0.7
    assert stats["sketch_check"]["statistic"] == pytest.approx(1.0)  # same seed: same store
    assert stats["sketch_check"]["extra"]["unbiased"]["r"] == pytest.approx(1.0)
    assert set(stats["timings_s"]) >= {"gram_pass", "interval", "tests", "robustness", "stability"}
    report = open(out / "report.md").read()
    assert report.index("## Headline") < report.index("## Robustness") \
        < report.index("## Stability") < report.index("## Provenance")
    assert "Freedman–Lane" in report and "Dekker" in report
    assert "p ≤ 0.0033" in report  # 299 permutations: the floor 1/300 is a bound, not a value
    assert "**robust**" in report and "toy-llama" in report and "coclustering.png" in report
    assert "significant at 0.05 under all 5 geometries" in report


def _surface_only_store(path, seed=3):
    """16 tasks in 4 categories. Each pair changes one word, drawn from its category's pool with
    probability 1/2, else from the task's own; the gradient task space's population cosines ARE
    the overlap of those words, so the categories act only through the surface."""
    rng = np.random.default_rng(seed)
    pairs, cats = {}, {}
    for c in range(4):
        for j in range(4):
            name = f"c{c}t{j}"
            cats[name] = f"cat{c}"
            pairs[name] = []
            for _ in range(12):
                w = (f"cat{c}w" if rng.random() < 0.5 else f"{name}w") + str(rng.integers(0, 5))
                subj = "the dog" if rng.random() < 0.5 else "a cat"
                pairs[name].append((f"{subj} {w} here .", f"{subj} {w}s here ."))
    surf = S.surface_spaces(pairs).spaces["diff_words"]
    names = sorted(pairs)
    lay = [{"name": "model.embed_tokens.weight", "offset": 0, "size": 128}] + [
        {"name": f"model.layers.0.{m}.weight", "offset": 128 * (i + 1), "size": 128}
        for i, m in enumerate(("input_layernorm", "self_attn.q_proj", "mlp.down_proj"))]
    sim = E.simulate_task_space(len(names), 12, 512, true_cos=surf, coherence=0.2, seed=seed)
    meta = [{"UID": name, "pairID": i, "field": "syntax", "linguistics_term": cats[name],
             "sentence_good": g, "sentence_bad": b, "n_tokens_good": 5, "n_tokens_bad": 5}
            for name in names for i, (g, b) in enumerate(pairs[name])]
    lstore.write_store(str(path), sim.x_nk, meta, config={"model": "toy"}, k=512, layout=lay)


def test_surface_only_effect_is_controlled(tmp_path):
    _surface_only_store(tmp_path / "s")
    paths = _run(tmp_path / "s", tmp_path / "o", n_boot=30, n_perm=499, n_splits=4,
                 robustness=False)
    stats = json.load(open(paths["stats"]))
    assert stats["tests"]["mantel"]["p_value"] < 0.01  # the plain test is fooled
    assert stats["surface"]["fits"]["diff_words"]["p_value"] < 0.01
    assert stats["controlled"]["p_value"] > 0.05  # the controlled one is not
    assert stats["robustness"] == [{"name": "euclidean", **stats["robustness"][0]}]
    report = open(paths["report"]).read()
    assert "no evidence that the hypothesis explains gradient similarity beyond" in report
    assert "does not survive the surface controls" in report


def test_old_store_without_sentences(tmp_path):
    _make_store(tmp_path / "old", sentences=False)
    paths = _run(tmp_path / "old", tmp_path / "o", n_boot=20, n_perm=99, n_splits=3)
    stats = json.load(open(paths["stats"]))
    assert stats["controlled"] is None and not stats["surface"]["available"]
    assert stats["surface"]["note"] == "surface controls unavailable: store has no sentences"
    assert stats["headline"]["test"] == "uncontrolled_mantel"
    assert all(row["controlled"] is None for row in stats["robustness"])
    report = open(paths["report"]).read()
    head = report[report.index("## Headline"):report.index("## Robustness")]
    assert "surface controls unavailable: store has no sentences" in head
    assert "*not* controlled for surface similarity" in head


def test_field_and_file_hypotheses(tmp_path):
    _make_store(tmp_path / "store")
    paths = _run(tmp_path / "store", tmp_path / "o1", "field", n_boot=20, n_perm=99, n_splits=3,
                 group_by="module_type", robustness=False)
    z = np.load(paths["npz"])
    assert sorted(z["groups"]) == ["embed", "input_layernorm", "mlp.down_proj",
                                   "self_attn.q_proj"]
    assert json.load(open(paths["stats"]))["hypothesis"]["n_categories"] == 2
    hyp = tmp_path / "h.json"
    hyp.write_text(json.dumps({f"task_{i:02d}": CATS[i] for i in range(len(CATS))}))
    paths = _run(tmp_path / "store", tmp_path / "o2", str(hyp), n_boot=20, n_perm=99, n_splits=3,
                 similarity="raw", interval="percentile", n_clusters=2)
    stats = json.load(open(paths["stats"]))
    assert stats["tests"]["mantel"]["p_value"] < 0.05 and stats["settings"]["kind"] == "raw"
    assert stats["interval"]["method"] == "percentile" and stats["stability"]["k"] == 2
    hyp.write_text(json.dumps({**{f"task_{i:02d}": CATS[i] for i in range(len(CATS))},
                               "ghost": "x"}))
    with pytest.raises(ValueError, match="ghost"):
        _run(tmp_path / "store", tmp_path / "o3", str(hyp))
    with pytest.raises(ValueError, match="jackknife"):
        job.TaskSpaceOptions(similarity="raw")


def test_global_layout_and_bad_stores(tmp_path, capsys):
    _make_store(tmp_path / "store_b")
    _make_store(tmp_path / "g", layout=False)
    _make_store(tmp_path / "ref", layout=False, seed=1, n=4)  # a named reference set
    paths = _run(tmp_path / "g", tmp_path / "og", n_boot=20, n_perm=99, n_splits=3,
                 precondition_reference=str(tmp_path / "ref"), damping=0.5)
    assert list(np.load(paths["npz"])["groups"]) == ["global"]
    report = open(paths["report"]).read()
    assert "no per-layer" in report and "not applicable" in report
    stats = json.load(open(paths["stats"]))
    rob = {r["name"]: r for r in stats["robustness"]}
    assert not rob["no_norms"]["available"] and rob["preconditioned"]["available"]
    assert str(tmp_path / "ref") in stats["preconditioner"]["reference"]
    assert stats["preconditioner"]["n_reference"] == 48 and stats["preconditioner"]["damping"] == 0.5
    with pytest.raises(ValueError, match="layout differs"):
        _run(tmp_path / "store_b", tmp_path / "ob", precondition_reference=str(tmp_path / "ref"))

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
    with pytest.raises(ValueError, match=r"row 3 .*task_00"):
        _make_store(tmp_path / "nan", nan_row=3)
