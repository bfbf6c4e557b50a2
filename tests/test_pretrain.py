"""The pretrain stage: tokenizer + memory-mapped token file, packed windows and data order, training
(Llama and GPT-NeoX), bit-exact resume, Hugging Face exports that transformers and lmgrad load with
the same logits, the per-checkpoint metrics log, and clean errors for bad corpora.

Tiny models (2 layers, width 32) on the first ~120 KB of tinyshakespeare (from ../shared/data,
written gzipped into tmp_path); BLiMP (two paradigms, four pairs each) from $LMGRAD_BLIMP_DIR.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib

import numpy as np
import pytest

from helpers_launch import run_launcher
from lmgrad.jobs.pretrain import PretrainOptions, run
from lmgrad.pretrain import data as pdata
from lmgrad.pretrain.train import checkpoint_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "corpora" / "tinyshakespeare.txt"
BLIMP = "blimp:anaphor_gender_agreement,determiner_noun_agreement_1"
STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not found")
    text = SHAKESPEARE.read_text()[:120_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


def tiny(corpus: pathlib.Path, data_dir: pathlib.Path, **kw) -> PretrainOptions:
    base = dict(corpus=(str(corpus),), data_dir=str(data_dir), vocab_size=384, hidden_size=32, num_layers=2,
                num_heads=2, intermediate_size=64, seq_len=48, batch_size=8, steps=STEPS, lr=1e-2, warmup_steps=2,
                val_fraction=0.05, val_sequences=16, blimp_tasks=BLIMP, blimp_pairs_per_task=4, eval_batch_size=32,
                log_every=1, resume_every=0)
    base.update(kw)
    return PretrainOptions(**base)


@pytest.fixture(scope="module")
def llama_run(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    opts = tiny(corpus, root / "data")
    return opts, root / "run", run(opts, root / "run", progress=False)


# ---------------------------------------------------------------------------- data


def test_tokenizer_token_file_and_packing(corpus, tmp_path):
    tok = pdata.train_tokenizer([corpus], 300)
    assert len(tok) == 300 and tok.bos_token == tok.eos_token == pdata.EOT
    assert tok.convert_tokens_to_ids(pdata.EOT) == 0
    meta = pdata.tokenize_corpora(tok, [corpus], tmp_path, fingerprint={"k": 1})
    assert meta["dtype"] == "uint16" and meta["segments"][0]["end"] == meta["n_tokens"]
    mtime = (tmp_path / pdata.TOKENS).stat().st_mtime_ns
    assert pdata.tokenize_corpora(tok, [corpus], tmp_path, fingerprint={"k": 1}) == meta  # reused as is
    assert (tmp_path / pdata.TOKENS).stat().st_mtime_ns == mtime

    # Round trip: the token stream decodes to the documents, each followed by <|endoftext|>.
    docs = list(pdata.iter_documents(corpus))
    data = pdata.TokenData.open(tmp_path, seq_len=32, val_fraction=0.1)
    stream = np.asarray(data.tokens)
    ends = np.flatnonzero(stream == 0)
    assert len(ends) == len(docs)
    assert tok.decode(stream[:ends[0]].tolist()) == docs[0]
    assert tok.decode(stream[ends[2] + 1:ends[3]].tolist()) == docs[3]

    # Packed windows: seq_len + 1 tokens, end to end; training never touches the validation slice.
    (part,) = data.parts
    assert part["val"][0] == part["train"][1] and part["val"][1] == meta["n_tokens"]
    assert np.all(np.diff(data.train_offsets) == 33) and data.train_offsets.max() + 33 <= part["train"][1]
    assert data.val_offsets.min() >= part["val"][0] and data.val_offsets.max() + 33 <= part["val"][1]
    b = data.batch(seed=3, step=5, batch_size=4)
    offs = data.batch_offsets(3, 5, 4)
    assert b.shape == (4, 33) and b.dtype == np.int32
    np.testing.assert_array_equal(b[1], stream[offs[1]:offs[1] + 33])

    # Data order: a pure function of (seed, step); one epoch visits every window once.
    n, bs = len(data.train_offsets), 4
    pdata._PERMS.clear()
    np.testing.assert_array_equal(data.batch_offsets(3, 5, bs), offs)
    epoch = np.concatenate([data.batch_offsets(3, s, bs) for s in range(n // bs)])
    assert len(set(epoch.tolist())) == len(epoch)
    assert not np.array_equal(data.batch_offsets(4, 5, bs), offs)
    val = np.concatenate(list(data.val_batches(5)))
    assert val.shape == (len(data.val_offsets), 33)


def test_checkpoint_steps():
    assert checkpoint_steps(12) == [0, 1, 2, 4, 8, 12]
    assert checkpoint_steps(8) == [0, 1, 2, 4, 8]
    assert checkpoint_steps(20, every=6) == [0, 1, 2, 4, 6, 8, 12, 16, 18, 20]


def test_missing_and_too_small_corpus(tmp_path, corpus):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(pdata.CorpusError, match="corpus file not found: .*nope.txt.gz"):
        run(tiny(missing, tmp_path / "d"), tmp_path / "r1", progress=False)
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question.\n" * 30)
    with pytest.raises(pdata.CorpusError, match="small.txt: .* too few .* validation"):
        run(tiny(small, tmp_path / "d2", seq_len=256), tmp_path / "r2", progress=False)
    with pytest.raises(pdata.CorpusError, match="too few"):
        pdata.TokenData.from_tokens(np.zeros(100, np.uint16), [{"corpus": "c", "start": 0, "end": 100}], 48, 0.1)


# ---------------------------------------------------------------------------- training, metrics, exports


def test_llama_trains_and_logs_each_checkpoint(llama_run):
    opts, work, summary = llama_run
    train = [json.loads(l) for l in (work / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert np.mean([r["loss"] for r in train[-3:]]) < train[0]["loss"] - 0.5
    rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == checkpoint_steps(STEPS) == summary["checkpoint_steps"]
    for r in rows:
        assert np.isfinite(r["val_ppl"]) and r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]))
        assert 0.0 <= r["blimp_accuracy"] <= 1.0 and r["blimp_pairs"] == 8
        assert (work / "hf" / f"step_{r['step']:06d}" / "model.safetensors").exists()
        assert (work / "blimp" / f"step_{r['step']:06d}.json").exists()
    assert rows[0]["val_ppl"] == pytest.approx(384, rel=0.1)  # the initialisation predicts ~uniformly
    assert rows[-1]["val_ppl"] < rows[0]["val_ppl"] / 2
    assert summary["complete"] and summary["num_params"] == opts.num_params()


def _logits_match(export: pathlib.Path, text: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmgrad.models import load_model

    ref = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(export))
    ids = [tok.bos_token_id] + tok(text)["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    model = load_model(str(export))
    x = np.asarray([ids], np.int32)
    got = np.asarray(model.apply(model.params, x, np.ones_like(x)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_llama_export_loads_in_transformers_and_lmgrad(llama_run):
    _, work, _ = llama_run
    _logits_match(work / "hf" / f"step_{STEPS:06d}", "Shall I compare thee to a summer's day?")


def test_gpt_neox_trains_and_exports(corpus, tmp_path, llama_run):
    opts = tiny(corpus, pathlib.Path(llama_run[0].data_dir), family="gpt_neox", steps=8, blimp_tasks="",
                log_every=1)
    summary = run(opts, tmp_path, progress=False)
    train = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert [m["step"] for m in summary["metrics"]] == [0, 1, 2, 4, 8]
    assert "blimp_accuracy" not in summary["metrics"][0]
    cfg = json.loads((tmp_path / "hf" / "step_000008" / "config.json").read_text())
    assert cfg["model_type"] == "gpt_neox"
    _logits_match(tmp_path / "hf" / "step_000008", "Now is the winter of our discontent")


def test_killed_run_resumes_bitwise(llama_run, tmp_path):
    """A run stopped at step 7 (logged checkpoints 0, 1, 2, 4; rolling one at 6) and run again ends with the parameters,
    exports and metrics of the uninterrupted run, bit for bit (same machine, CPU)."""
    opts, work, summary = llama_run
    # BLiMP, the rolling-checkpoint interval and the log interval do not change the numbers.
    killed = dataclasses.replace(opts, blimp_tasks="", resume_every=3)
    first = run(killed, tmp_path, max_steps=7, progress=False)
    assert not first["complete"] and [m["step"] for m in first["metrics"]] == [0, 1, 2, 4]
    assert sorted(int(p.name) for p in (tmp_path / "resume").iterdir() if p.name.isdigit()) == [6]
    second = run(killed, tmp_path, progress=False)
    assert second["complete"] and second["timing"]["steps_this_session"] == STEPS - 6
    for step in checkpoint_steps(STEPS):
        name = f"hf/step_{step:06d}/model.safetensors"
        assert (tmp_path / name).read_bytes() == (work / name).read_bytes(), name
    ref = {m["step"]: m for m in summary["metrics"]}
    for m in second["metrics"]:
        assert m["val_loss"] == ref[m["step"]]["val_loss"]
    train = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # rows past the checkpoint replaced

    with pytest.raises(ValueError, match=r"other options \(lr: 0.01 → 0.02\)"):
        run(dataclasses.replace(killed, lr=0.02), tmp_path, progress=False)


def test_launcher_and_configs(corpus, tmp_path, llama_run, capsys):
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    from lmgrad.jobs.schema import from_dict

    cfg = load("pretrain")
    n_cpu = [from_dict(PretrainOptions, cfg.get_config(s).to_dict()).num_params() for s in ("cpu_s", "cpu_m", "cpu_l")]
    assert n_cpu[2] >= 8 * n_cpu[0]
    n_gpu = [from_dict(PretrainOptions, cfg.get_config(s).to_dict()).num_params() for s in ("gpu_27m", "gpu_70m", "gpu_203m")]
    assert np.allclose(n_gpu, [27e6, 70e6, 203e6], rtol=0.02)
    for arg in (None, "tiny", "smoke", "smoke,gpt_neox", "cpu_l,gpt_neox", "gpu_27m"):
        from_dict(PretrainOptions, cfg.get_config(arg).to_dict())
    for bad in ("no_such_variant", "cpu_s,mamba"):
        with pytest.raises(ValueError, match="variant"):
            cfg.get_config(bad)

    # The fixture's options as flags (so the compiled step is reused), stopped after step 2.
    opts = llama_run[0]
    argv = [f"--corpus={corpus}", f"--data_dir={opts.data_dir}", "--vocab_size=384", "--hidden_size=32",
            "--num_layers=2", "--num_heads=2", "--intermediate_size=64", "--seq_len=48", "--batch_size=8",
            f"--steps={STEPS}", "--lr=0.01", "--warmup_steps=2", "--val_fraction=0.05", "--val_sequences=16",
            "--blimp_tasks=", "--max_steps=2", "--noprogress", f"--workdir={tmp_path / 'run'}"]
    run_launcher("pretrain", argv)
    assert "pretrained" in capsys.readouterr().out
    assert (tmp_path / "run" / "hf" / "step_000002" / "config.json").exists()
    with pytest.raises(SystemExit):
        run_launcher("pretrain", [f"--corpus={tmp_path / 'missing.txt'}", f"--workdir={tmp_path / 'r2'}"])
    assert "error: corpus file not found" in capsys.readouterr().err
