"""Tokenisation and length-bucketed batching: the contract scoring and gradients rely on.

Conventions
-----------
- A sequence is a 1-D int32 array of token ids, BOS first when the model has one.
- Batches are right-padded with id 0 to a bucket length T (a power of two), so a run
  compiles only a handful of shapes; padding rows are marked invalid and have all-zero
  masks.
- ``target_mask[b, t] == 1`` iff token t of row b is scored, i.e. its log-probability is
  read from the logits at position t-1. Column 0 is never scored: nothing predicts it.
  A sentence's log-prob is ``sum_t target_mask[b, t] * log p(ids[b, t] | ids[b, :t])``.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Any, Iterator, Sequence

import numpy as np

from lmgrad.tasks.pairs import Pair, TaskDataError

__all__ = [
    "PAD_ID", "Batch", "bos_id", "encode", "encode_pairs", "degenerate_pairs", "bucket_length",
    "first_difference", "make_batch", "iter_bucketed", "iter_pair_batches", "iter_packed", "PackedBatch",
    "packed_row_length", "PackedPairBatch", "iter_packed_pairs", "packed_pair_shape", "first_fit_rows",
]

PAD_ID = 0


def bos_id(tokenizer: Any, bos: str = "auto") -> int | None:
    """The id prepended to every sentence, or None.

    BLiMP compares full-sentence log-probabilities, so the first word must be scored too;
    it can only be scored if it is conditioned on something. Hence ``"auto"`` uses the
    tokenizer's BOS token and falls back to EOS (GPT-2 style models use
    ``<|endoftext|>`` as the document separator). ``"none"`` prepends nothing (the first
    token then goes unscored); any other string is looked up as a token.

    Raises:
      TaskDataError: "auto" with neither BOS nor EOS, or an unknown token string.
    """
    if bos == "none":
        return None
    if bos == "auto":
        for attr in ("bos_token_id", "eos_token_id"):
            tid = getattr(tokenizer, attr, None)
            if tid is not None:
                return int(tid)
        raise TaskDataError(
            "bos='auto': tokenizer has neither bos_token_id nor eos_token_id; "
            "pass bos='none' or a token string"
        )
    vocab = tokenizer.get_vocab()
    if bos not in vocab:
        raise TaskDataError(f"bos={bos!r}: token not in the tokenizer vocabulary")
    return int(vocab[bos])


def encode(
    tokenizer: Any, texts: Sequence[str], *, bos: str = "auto", max_length: int | None = None
) -> list[np.ndarray]:
    """Tokenise `texts` without special tokens, prepending `bos_id(tokenizer, bos)`.

    Returns:
      One int32 array per text; lengths include the BOS token.

    Raises:
      TaskDataError: a text that tokenises to nothing, or whose length (with BOS)
        exceeds `max_length`; the message names the sentence, its token count and limit.
    """
    texts = list(texts)
    if not texts:
        return []
    prefix = [] if (b := bos_id(tokenizer, bos)) is None else [b]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = []
    for text, row in zip(texts, ids):
        if not row:
            raise TaskDataError(f"sentence {_short(text)!r} tokenises to no tokens")
        seq = np.asarray(prefix + list(row), dtype=np.int32)
        if max_length is not None and len(seq) > max_length:
            raise TaskDataError(
                f"sentence {_short(text)!r} has {len(seq)} tokens (BOS included), "
                f"more than max_length={max_length}"
            )
        out.append(seq)
    return out


def encode_pairs(
    tokenizer: Any,
    pairs: Sequence[Pair],
    *,
    bos: str = "auto",
    max_length: int | None = None,
    from_first_difference: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Encode both sentences of every pair.

    Returns:
      ``(good, bad, score_from_good, score_from_bad)``: id arrays and int64 [N] first
      scored positions. By default every token after position 0 is scored (1). With
      `from_first_difference`, both sentences of a pair are scored from their first
      differing token (at least 1), so a shared prefix adds nothing to either log-prob.
      A pair whose sentences tokenise identically (BLiMP has 7) then scores nothing.
    """
    good = encode(tokenizer, [p.sentence_good for p in pairs], bos=bos, max_length=max_length)
    bad = encode(tokenizer, [p.sentence_bad for p in pairs], bos=bos, max_length=max_length)
    if from_first_difference:
        start = np.array([max(first_difference(g, b), 1) for g, b in zip(good, bad)], dtype=np.int64)
    else:
        start = np.ones(len(pairs), dtype=np.int64)
    return good, bad, start, start.copy()


def degenerate_pairs(good_ids: Sequence[np.ndarray], bad_ids: Sequence[np.ndarray]) -> list[int]:
    """Indices of pairs whose good and bad token sequences are identical.

    Such a pair has a log-prob and gradient differential of exactly zero. Selection already
    drops pairs with identical sentences (`lmgrad.tasks.drop_degenerate`); this catches
    the rest, sentences that differ only in ways the tokenizer erases, e.g. on
    `encode_pairs` output: ``keep = set(range(n)) - set(degenerate_pairs(good, bad))``.
    """
    if len(good_ids) != len(bad_ids):
        raise ValueError(f"{len(good_ids)} good sequences for {len(bad_ids)} bad ones")
    return [i for i, (g, b) in enumerate(zip(good_ids, bad_ids)) if np.array_equal(g, b)]


def bucket_length(n: int, *, min_len: int = 8, max_len: int | None = None) -> int:
    """Smallest power of two >= max(n, min_len), clipped to `max_len`."""
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    if max_len is not None and n > max_len:
        raise ValueError(f"sequence length {n} exceeds max_len={max_len}")
    t = 1 << (max(n, min_len) - 1).bit_length()
    return t if max_len is None else min(t, max_len)


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """Index of the first position where `a` and `b` differ (len of the shorter if one
    is a prefix of the other, so identical sequences give their length)."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(diff[0]) if diff.size else m


@dataclasses.dataclass
class Batch:
    """A fixed-shape batch; see the module docstring for the mask convention.

    Attributes:
      input_ids: int32 [B, T], right-padded with `PAD_ID`.
      attention_mask: int32 [B, T], 1 on real tokens.
      target_mask: float32 [B, T], 1 where a token is scored; column 0 always 0.
      index: int64 [B], row -> item index in the caller's list; -1 for padding rows.
      valid: bool [B], False for padding rows.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    index: np.ndarray
    valid: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape


def make_batch(
    seqs: Sequence[np.ndarray],
    *,
    length: int,
    batch_size: int,
    score_from: Sequence[int] | None = None,
    index: Sequence[int] | None = None,
) -> Batch:
    """Pad `seqs` (at most `batch_size`) into a [batch_size, length] Batch.

    Args:
      seqs: id arrays, each at most `length` long.
      score_from: first scored position per sequence. Default 1: every token after
        position 0, which is BOS when there is one; without BOS the first word cannot be
        scored either, since no logits predict position 0. Values below 1 act as 1.
      index: caller's item index per sequence (default 0..len(seqs)-1).
    """
    n = len(seqs)
    if n > batch_size:
        raise ValueError(f"{n} sequences do not fit batch_size={batch_size}")
    if score_from is not None and len(score_from) != n:
        raise ValueError(f"score_from has {len(score_from)} entries for {n} sequences")
    if index is not None and len(index) != n:
        raise ValueError(f"index has {len(index)} entries for {n} sequences")
    ids = np.full((batch_size, length), PAD_ID, dtype=np.int32)
    attn = np.zeros((batch_size, length), dtype=np.int32)
    tgt = np.zeros((batch_size, length), dtype=np.float32)
    idx = np.full(batch_size, -1, dtype=np.int64)
    idx[:n] = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
    valid = np.zeros(batch_size, dtype=bool)
    valid[:n] = True
    for r, seq in enumerate(seqs):
        L = len(seq)
        if L > length:
            raise ValueError(f"sequence {int(idx[r])} has length {L} > batch length {length}")
        ids[r, :L] = seq
        attn[r, :L] = 1
        start = 1 if score_from is None else max(int(score_from[r]), 1)
        tgt[r, start:L] = 1.0
    return Batch(input_ids=ids, attention_mask=attn, target_mask=tgt, index=idx, valid=valid)


def _buckets(lengths: Sequence[int], *, min_len: int, max_len: int | None) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i, L in enumerate(lengths):
        if max_len is not None and L > max_len:
            raise TaskDataError(f"item {i} has {L} tokens, more than max_len={max_len}")
        groups[bucket_length(L, min_len=min_len, max_len=max_len)].append(i)
    return dict(sorted(groups.items()))


def iter_bucketed(
    seqs: Sequence[np.ndarray],
    *,
    batch_size: int,
    score_from: Sequence[int] | None = None,
    max_len: int | None = None,
    min_len: int = 8,
) -> Iterator[Batch]:
    """Fixed-size batches grouped by `bucket_length`, shortest bucket first.

    Every item appears in exactly one valid row (`Batch.index` maps back); the last
    batch of each bucket is filled with invalid rows. Order is deterministic: buckets
    ascending, items in input order within a bucket.
    """
    for length, items in _buckets([len(s) for s in seqs], min_len=min_len, max_len=max_len).items():
        for lo in range(0, len(items), batch_size):
            chunk = items[lo: lo + batch_size]
            yield make_batch(
                [seqs[i] for i in chunk], length=length, batch_size=batch_size, index=chunk,
                score_from=None if score_from is None else [score_from[i] for i in chunk],
            )


@dataclasses.dataclass
class PackedBatch:
    """Sentences packed back to back into fixed-shape rows (`iter_packed`).

    Attributes:
      input_ids: int32 [R, L], `PAD_ID` after the last sentence of a row.
      attention_mask: int32 [R, L], the segment of each token: 1, 2, … for the row's sentences in
        order, 0 on padding (the models attend within a segment and restart positions at each).
      target_mask: float32 [R, L], 1 where a token is scored (never a sentence's first token).
      owner: int64 [R, L], the caller's index of the sentence a token belongs to; -1 on padding.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    owner: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape


def packed_row_length(lengths: Sequence[int], *, max_len: int | None = None, min_row: int = 64) -> int:
    """The row length `iter_packed` uses: the longest sentence's bucket, at least `min_row` (so short
    sentences share rows), clipped to `max_len`."""
    longest = max(lengths)
    if max_len is not None and longest > max_len:
        i = int(np.argmax(lengths))
        raise TaskDataError(f"item {i} has {longest} tokens, more than max_len={max_len}")
    t = max(bucket_length(longest), min_row)
    return t if max_len is None else min(t, max_len)


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Items (indices into `lengths`) placed by decreasing length, each into the first row with room
    for it; rows in order of opening. Rows are kept in a min-heap of indices per free capacity, so
    each placement looks at `capacity` heap tops instead of every open row (all of BLiMP is 134k
    sentences in ~30k rows)."""
    free: list[list[int]] = [[] for _ in range(capacity + 1)]  # free capacity → heap of row indices
    members: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        tops = [(free[c][0], c) for c in range(n, capacity + 1) if free[c]]
        if tops:
            r, c = min(tops)
            heapq.heappop(free[c])
        else:
            r, c = len(members), capacity
            members.append([])
        members[r].append(i)
        heapq.heappush(free[c - n], r)
    return members


def first_fit_rows(lengths: Sequence[int], capacity: int) -> int:
    """How many rows of `capacity` tokens the packers' first-fit fills with items of `lengths`."""
    return len(_first_fit(lengths, capacity))


def packed_pair_shape(pair_lengths: Sequence[int], pairs_per_batch: int, *, min_row: int = 64) -> tuple[int, int]:
    """(row length, rows per batch) for packed pair batches: rows one power-of-two bucket long (at
    least `min_row` tokens) holding the longest pair, and as many as `pairs_per_batch` average pairs fill."""
    row_len = max(min_row, bucket_length(max(pair_lengths)))
    return row_len, max(1, -(-pairs_per_batch * int(sum(pair_lengths)) // (len(pair_lengths) * row_len)))


def _even_rows(n: int, rows: int) -> int:
    """Rows per batch for `n` rows: as few batches of at most `rows` rows as possible, with the rows
    spread evenly over them (one shape for the run, and the last batch not left mostly empty)."""
    return -(-n // -(-n // rows))


def iter_packed(
    seqs: Sequence[np.ndarray],
    *,
    rows: int,
    row_len: int | None = None,
    score_from: Sequence[int] | None = None,
    max_len: int | None = None,
) -> Iterator[PackedBatch]:
    """Batches of at most `rows` rows of `row_len` tokens holding every sentence once, packed first-fit
    by decreasing length (deterministic), so padding is only what is left at the end of a row. All
    batches have one shape: the fewest batches that hold the rows, with the rows spread evenly over
    them (the last may have empty rows). `row_len` defaults to `packed_row_length`.

    A packed row computes each sentence as if alone (attention within its segment, positions from
    0), so per-token log-probs summed by `owner` equal `iter_bucketed`'s per-row sums up to float
    rounding, for less padded work (BLiMP in power-of-two buckets is about 30% padding).
    """
    if not seqs:
        return
    lengths = [len(s) for s in seqs]
    if min(lengths) < 1:
        raise ValueError("empty sequence")
    L = packed_row_length(lengths, max_len=max_len) if row_len is None else int(row_len)
    if max(lengths) > L:
        raise TaskDataError(f"item {int(np.argmax(lengths))} has {max(lengths)} tokens, more than the row length {L}")
    members = _first_fit(lengths, L)
    rows = _even_rows(len(members), rows)
    for lo in range(0, len(members), rows):
        ids = np.full((rows, L), PAD_ID, dtype=np.int32)
        seg = np.zeros((rows, L), dtype=np.int32)
        tgt = np.zeros((rows, L), dtype=np.float32)
        owner = np.full((rows, L), -1, dtype=np.int64)
        for r, row in enumerate(members[lo: lo + rows]):
            pos = 0
            for k, i in enumerate(row, start=1):
                n = lengths[i]
                ids[r, pos: pos + n] = seqs[i]
                seg[r, pos: pos + n] = k
                owner[r, pos: pos + n] = i
                start = 1 if score_from is None else max(int(score_from[i]), 1)
                tgt[r, pos + start: pos + n] = 1.0
                pos += n
        yield PackedBatch(input_ids=ids, attention_mask=seg, target_mask=tgt, owner=owner)


@dataclasses.dataclass
class PackedPairBatch:
    """Minimal pairs packed back to back into fixed-shape rows (`iter_packed_pairs`): each pair is its
    good sentence followed by its bad one, in one row, so a pair never straddles rows (or devices).

    Attributes:
      input_ids: int32 [R, L], `PAD_ID` after the last pair of a row.
      attention_mask: int32 [R, L], the segment of each token: 1, 2, … for the row's sentences in order
        (a pair's good sentence then its bad one), 0 on padding.
      target_mask: float32 [R, L], +1 where a good sentence's token is scored, −1 where a bad one's is,
        so Σ target_mask · log p over a pair's tokens is log p(good) − log p(bad).
      slot: int32 [R, L], the pair slot (0 … Q−1 within the row) of each token, −1 on padding.
      index: int64 [R, Q], the caller's pair index in each slot, −1 for an empty slot.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    slot: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape

    @property
    def valid(self) -> np.ndarray:
        """bool [R, Q]: slots holding a pair."""
        return self.index >= 0


def iter_packed_pairs(
    good: Sequence[np.ndarray],
    bad: Sequence[np.ndarray],
    *,
    rows: int,
    row_len: int | None = None,
    slots: int | None = None,
    score_from_good: Sequence[int] | None = None,
    score_from_bad: Sequence[int] | None = None,
    min_row: int = 64,
) -> Iterator[PackedPairBatch]:
    """Batches of `rows` rows of `row_len` tokens holding every pair once, each pair's two sentences
    side by side in one row, rows filled first-fit by decreasing pair length (deterministic). All
    batches have one shape: the fewest batches that hold the rows, rows spread evenly over them;
    `slots` (default: the most pairs any row holds) fixes Q. `row_len` defaults to the longest pair's
    power-of-two bucket, at least `min_row`; the models restart positions at every sentence, so a
    row may be longer than the model's context as long as each sentence fits it.

    Pair order is the order of (batch, row, slot): `index` maps back to the caller's pairs.
    """
    if len(good) != len(bad):
        raise ValueError(f"{len(good)} good sequences but {len(bad)} bad ones")
    if not good:
        return
    lg, lb = [len(s) for s in good], [len(s) for s in bad]
    if min(lg + lb) < 1:
        raise ValueError("empty sequence")
    lengths = [a + b for a, b in zip(lg, lb)]
    longest = max(lengths)
    L = max(bucket_length(longest), min_row) if row_len is None else int(row_len)
    if longest > L:
        i = int(np.argmax(lengths))
        raise TaskDataError(f"pair {i} has {longest} tokens (good {lg[i]} + bad {lb[i]}), more than the row length {L}")
    members = _first_fit(lengths, L)
    q = max(len(m) for m in members) if slots is None else int(slots)
    if any(len(m) > q for m in members):
        raise ValueError(f"a row holds {max(len(m) for m in members)} pairs, more than slots={q}")
    rows = _even_rows(len(members), rows)
    for lo in range(0, len(members), rows):
        ids = np.full((rows, L), PAD_ID, dtype=np.int32)
        seg = np.zeros((rows, L), dtype=np.int32)
        tgt = np.zeros((rows, L), dtype=np.float32)
        slot = np.full((rows, L), -1, dtype=np.int32)
        index = np.full((rows, q), -1, dtype=np.int64)
        for r, row in enumerate(members[lo: lo + rows]):
            pos = 0
            for j, i in enumerate(row):
                index[r, j] = i
                for k, (seq, sf, sign) in enumerate(((good[i], score_from_good, 1.0), (bad[i], score_from_bad, -1.0))):
                    n = len(seq)
                    ids[r, pos: pos + n] = seq
                    seg[r, pos: pos + n] = 2 * j + k + 1
                    slot[r, pos: pos + n] = j
                    start = 1 if sf is None else max(int(sf[i]), 1)
                    tgt[r, pos + start: pos + n] = sign
                    pos += n
        yield PackedPairBatch(input_ids=ids, attention_mask=seg, target_mask=tgt, slot=slot, index=index)


def iter_pair_batches(
    good: Sequence[np.ndarray],
    bad: Sequence[np.ndarray],
    *,
    batch_size: int,
    score_from_good: Sequence[int] | None = None,
    score_from_bad: Sequence[int] | None = None,
    max_len: int | None = None,
    min_len: int = 8,
) -> Iterator[tuple[Batch, Batch]]:
    """Like `iter_bucketed` over pairs: yields (good_batch, bad_batch) with the same
    length T (the bucket of the longer sentence) and the same `index` / `valid`, so row
    b of both batches is pair ``index[b]``."""
    if len(good) != len(bad):
        raise ValueError(f"{len(good)} good sequences but {len(bad)} bad ones")
    lengths = [max(len(g), len(b)) for g, b in zip(good, bad)]
    for length, items in _buckets(lengths, min_len=min_len, max_len=max_len).items():
        for lo in range(0, len(items), batch_size):
            chunk = items[lo: lo + batch_size]
            pick = lambda sf: None if sf is None else [sf[i] for i in chunk]  # noqa: E731
            yield (
                make_batch([good[i] for i in chunk], length=length, batch_size=batch_size,
                           index=chunk, score_from=pick(score_from_good)),
                make_batch([bad[i] for i in chunk], length=length, batch_size=batch_size,
                           index=chunk, score_from=pick(score_from_bad)),
            )


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
