"""The evaluate stage (launch/evaluate.py, in-process) end to end on a tiny random GPT-2 with a real (tiny) tokenizer, vs torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from helpers_launch import run_launcher
from helpers_tokenizer import tiny_tokenizer
from lmgrad.models import load_model
from lmgrad.tasks import TaskDataError, encode, select_tasks


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tok = tiny_tokenizer(bos=False)  # GPT-2 style: EOS doubles as the sentence prefix
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _torch_logprob(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits[:-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None])
    return float(lp.sum())


def test_evaluate_launch_matches_torch(tiny_ckpt, tmp_path):
    path, torch_model, tok = tiny_ckpt
    out = tmp_path / "eval"
    run_launcher("evaluate", [f"--model={path}", "--tasks=blimp:anaphor_gender_agreement,passive_1",
                              "--max_pairs_per_task=6", "--batch_size=4", f"--workdir={out}"])
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 12
    assert summary["overall"]["n_pairs"] == 12
    assert set(summary["per_uid"]) == {"anaphor_gender_agreement", "passive_1"}
    assert summary["model"]["weights"][0]["sha256"]
    assert summary["scoring"]["bos_token"] == tok.eos_token

    tasks = select_tasks("blimp:anaphor_gender_agreement,passive_1", max_pairs_per_task=6)
    pairs = {(p.UID, p.pairID): p for t in tasks for p in t.pairs}
    correct = []
    for r in rows:
        p = pairs[(r["UID"], r["pairID"])]
        [g, b] = encode(tok, [p.sentence_good, p.sentence_bad])
        ref_g, ref_b = _torch_logprob(torch_model, list(g)), _torch_logprob(torch_model, list(b))
        np.testing.assert_allclose([r["logprob_good"], r["logprob_bad"]], [ref_g, ref_b], rtol=1e-5)
        correct.append(ref_g > ref_b)
        assert r["correct"] == (ref_g > ref_b)
    assert summary["overall"]["accuracy"] == pytest.approx(np.mean(correct))
    for uid, acc in summary["per_uid"].items():
        ref = np.mean([c for r, c in zip(rows, correct) if r["UID"] == uid])
        assert acc["accuracy"] == pytest.approx(ref)


def test_sentence_longer_than_context_is_named(tiny_ckpt, tmp_path):
    from lmgrad.jobs.evaluate import evaluate
    from lmgrad.tasks import load_jsonl

    path, _, _ = tiny_ckpt
    long = "the cat " * 40
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"sentence_good": "A cat sat.", "sentence_bad": "A cat sit."}) + "\n"
                 + json.dumps({"sentence_good": long, "sentence_bad": long + "x"}) + "\n")
    model = load_model(str(path))
    with pytest.raises(TaskDataError, match=r"the cat the cat.*32"):
        evaluate(model, load_jsonl(f))


def test_empty_selection_is_an_error(tiny_ckpt, tmp_path, capsys):
    path, _, _ = tiny_ckpt
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(SystemExit) as exit_:
        run_launcher("evaluate", [f"--model={path}", f"--tasks=file:{f}", f"--workdir={tmp_path / 'o'}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    # The message alone, naming the file, without a traceback.
    assert err.startswith("error: ") and str(f) in err and "Traceback" not in err
    assert "empty" in err.lower() or "no pairs" in err.lower()
    assert not (tmp_path / "o" / "summary.json").exists()
