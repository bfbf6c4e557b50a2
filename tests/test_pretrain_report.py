"""The checkpoint-series table: its BLiMP interval against a simulation, files, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmgrad import io as lio
from lmgrad.jobs.pretrain import PretrainOptions
from lmgrad.jobs.schema import to_dict
from lmgrad.pretrain.report import Z95, read_run, stratified_se, write_report


def test_stratified_se_matches_simulated_spread():
    """Paradigms of different difficulty, pairs sampled within each: the formula's SE equals the
    spread of the pooled accuracy over many simulated samples (within 10%), and its 95% interval
    covers the true pooled accuracy at about the nominal rate."""
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.3, 0.95, size=30)
    n = 20
    truth = p_true.mean()
    accs, covered = [], 0
    for _ in range(2000):
        k = rng.binomial(n, p_true)
        per_uid = {f"u{i}": {"accuracy": k[i] / n, "n": n} for i in range(len(p_true))}
        acc = k.sum() / (n * len(p_true))
        se = stratified_se(per_uid)
        covered += abs(acc - truth) <= Z95 * se
        accs.append(acc)
    expected = np.sqrt(np.sum(p_true * (1 - p_true) / n)) / len(p_true)
    assert np.std(accs) == pytest.approx(expected, rel=0.1)
    per_uid = {f"u{i}": {"accuracy": p, "n": n} for i, p in enumerate(p_true)}
    assert stratified_se(per_uid) == pytest.approx(expected * np.sqrt(n / (n - 1)), rel=1e-9)
    assert abs(covered / 2000 - 0.95) < 4 * np.sqrt(0.95 * 0.05 / 2000)


def _fake_run(path, steps):
    opts = PretrainOptions(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    path.mkdir(parents=True)
    lio.write_json(path / "options.json", to_dict(opts))
    rows = []
    for i, s in enumerate(steps):
        per_uid = {"a": {"accuracy": 0.5 + 0.05 * i, "n": 10}, "b": {"accuracy": 0.6, "n": 10}}
        (path / "blimp").mkdir(parents=True, exist_ok=True)
        lio.write_json(path / "blimp" / f"step_{s:06d}.json", {"per_uid": per_uid})
        rows.append({"step": s, "tokens_seen": 64 * s, "val_ppl": 300.0 / (1 + s),
                     "blimp_accuracy": (1.1 + 0.05 * i) / 2, "blimp_pairs": 20})
    lio.write_jsonl(path / "metrics.jsonl", rows)
    return opts


def test_report_files_and_errors(tmp_path):
    opts = _fake_run(tmp_path / "s", [0, 1, 2, 4])
    _fake_run(tmp_path / "m", [0, 1, 2, 4])
    paths = write_report([tmp_path / "s", tmp_path / "m"], tmp_path / "out", command="cmd")
    table = paths["table"].read_text()
    assert table.count("\n| s |") == 4 and "Command: `cmd`" in table
    data = json.loads(paths["json"].read_text())
    assert len(data["points"]) == 8 and data["points"][0]["num_params"] == opts.num_params()
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_run(tmp_path / "nothing")
    first = (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0]
    (tmp_path / "s" / "metrics.jsonl").write_text(first + "\nnot json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_run(tmp_path / "s")
