"""The real SmolLM2-135M (GGUF, dequantised) through lmgrad's Flax Llama vs transformers' own GGUF
loading of the same file: logits on every batch and BLiMP decisions pair by pair. Slow (~1 min),
run in CI."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from lmgrad.models import load_model
from lmgrad.scoring import token_logprobs
from lmgrad.models.loading import logits_fn
from lmgrad.tasks import encode_pairs, iter_pair_batches, select_tasks

pytestmark = pytest.mark.slow


def test_logits_and_blimp_decisions_match_transformers(smollm2_path, smollm2_reference):
    jax.config.update("jax_default_matmul_precision", "highest")
    ref, _ = smollm2_reference
    ours = load_model(str(smollm2_path))
    apply = jax.jit(logits_fn(ours))
    tasks = select_tasks("blimp", max_pairs_per_task=1, seed=3)  # one pair of each of the 67 paradigms
    pairs = [p for t in tasks for p in t.pairs]
    good, bad, sg, sb = encode_pairs(ours.tokenizer, pairs)
    decisions = {}
    for g_batch, b_batch in iter_pair_batches(good, bad, batch_size=32, score_from_good=sg, score_from_bad=sb):
        lps = []
        for batch in (g_batch, b_batch):
            out = np.asarray(apply(ours.params, batch.input_ids, batch.attention_mask))
            with torch.no_grad():
                expect = ref(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
                             attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long)).logits.numpy()
            valid = batch.attention_mask.astype(bool)
            rel = np.max(np.abs(out[valid] - expect[valid])) / np.max(np.abs(expect[valid]))
            assert rel < 1e-4
            # Sentence log-probs from each framework's logits (float64 sums of float32 token terms).
            ours_lp = (np.asarray(token_logprobs(out, batch.input_ids), np.float64) * batch.target_mask).sum(-1)
            ref_lp = torch.log_softmax(torch.tensor(expect[:, :-1]).double(), -1).gather(
                -1, torch.tensor(batch.input_ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
            ref_lp = (ref_lp * batch.target_mask[:, 1:]).sum(-1)
            np.testing.assert_allclose(ours_lp[batch.valid], ref_lp[batch.valid], rtol=1e-4, atol=1e-3)
            lps.append((ours_lp, ref_lp))
        for row, i in enumerate(g_batch.index):
            if i >= 0:
                decisions[i] = (lps[0][0][row] > lps[1][0][row], lps[0][1][row] > lps[1][1][row])
    assert len(decisions) == 67
    disagree = [pairs[i].UID for i, (a, b) in decisions.items() if a != b]
    assert not disagree, disagree
    # The model is well above chance on BLiMP, as published for SmolLM2-135M (about 0.7-0.8).
    assert np.mean([a for a, _ in decisions.values()]) > 0.6
