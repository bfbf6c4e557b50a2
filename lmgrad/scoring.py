"""Sentence log-probabilities (BLiMP's full-sentence method), batched with length bucketing.

A sentence's score is Σ_t log p(w_t | w_<t) over its scored tokens. The tokenizer's BOS token (or
its EOS where it has no BOS, as for GPT-2 and Pythia) is prepended so that the first word is
conditioned on something and is scored too; see `lmgrad.tasks.batching.bos_id`.

`score_sequences` packs sentences back to back into rows (`lmgrad.tasks.iter_packed`; the models
attend within each sentence and restart its positions), so no compute goes to padding beyond the
end of each row; ``pack=False`` scores one right-padded sentence per row in length buckets.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log p(token t | tokens < t) as [B, T] (column 0, which nothing predicts, is 0)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(lp, ((0, 0), (1, 0)))


def sequence_logprob(logits: jax.Array, input_ids: jax.Array, target_mask: jax.Array) -> jax.Array:
    """Σ_t target_mask[b, t] · log p(token t | < t), per row [B]."""
    return jnp.sum(token_logprobs(logits, input_ids) * target_mask, axis=-1)


@functools.lru_cache(maxsize=16)
def make_score_fn(apply_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """jit-compiled (params, input_ids, attention_mask, target_mask) → log-prob per row [B].

    Cached per `apply_fn`: with `lmgrad.models.logits_fn` (one function per architecture), models of
    one architecture share one jitted function and its compiled bucket shapes.
    """

    @jax.jit
    def score(params: Any, input_ids: jax.Array, attention_mask: jax.Array, target_mask: jax.Array) -> jax.Array:
        return sequence_logprob(apply_fn(params, input_ids, attention_mask), input_ids, target_mask)

    return score


@functools.lru_cache(maxsize=16)
def make_token_score_fn(apply_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """jit-compiled (params, input_ids, attention_mask, target_mask) → target_mask · log p per token
    [B, T], for packed rows whose sentences are summed on the host. Cached like `make_score_fn`."""

    @jax.jit
    def score(params: Any, input_ids: jax.Array, attention_mask: jax.Array, target_mask: jax.Array) -> jax.Array:
        return token_logprobs(apply_fn(params, input_ids, attention_mask), input_ids) * target_mask

    return score


def score_sequences(
    model: Any,
    seqs: Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    score_from: Sequence[int] | None = None,
    progress: Callable[[int], None] | None = None,
    pack: bool = True,
) -> np.ndarray:
    """Log-probabilities [N] (float64) of token sequences (BOS already prepended) under `model`.

    `pack` (default): sentences packed into rows of `packed_row_length` tokens, `batch_size` × 32
    tokens per batch (one compiled shape for a run); per-token log-probs are summed per sentence
    in float64. Otherwise `batch_size` sentences per batch, bucketed by length (one shape per bucket).
    """
    from lmgrad.models.loading import logits_fn
    from lmgrad.tasks.batching import iter_bucketed, iter_packed, packed_row_length

    out = np.full(len(seqs), np.nan, dtype=np.float64)
    if not len(seqs):
        return out
    if pack:
        # One jitted function per architecture (cached), so repeated calls and other checkpoints of
        # the same architecture reuse the compiled shape.
        score = make_token_score_fn(logits_fn(model))
        row_len = packed_row_length([len(s) for s in seqs], max_len=model.max_length)
        out[:] = 0.0
        for batch in iter_packed(seqs, rows=max(1, batch_size * 32 // row_len), row_len=row_len,
                                 score_from=score_from):
            lp = np.asarray(score(model.params, batch.input_ids, batch.attention_mask, batch.target_mask),
                            dtype=np.float64)
            held = batch.owner >= 0
            np.add.at(out, batch.owner[held], lp[held])
            if progress is not None:
                progress(len(np.unique(batch.owner[held])))
        return out
    score = make_score_fn(logits_fn(model))
    for batch in iter_bucketed(
        seqs, batch_size=batch_size, score_from=score_from, max_len=model.max_length
    ):
        lp = np.asarray(score(model.params, batch.input_ids, batch.attention_mask, batch.target_mask))
        out[batch.index[batch.valid]] = lp[batch.valid]
        if progress is not None:
            progress(int(batch.valid.sum()))
    return out
