"""lmgrad.tasks.batching against plain-Python references, with random lengths."""
import numpy as np
import pytest

from helpers_tokenizer import tiny_tokenizer
from lmgrad.tasks import (
    PAD_ID, TaskDataError, bos_id, bucket_length, encode, encode_pairs, first_difference,
    iter_bucketed, iter_pair_batches, load_blimp, make_batch,
)
from lmgrad.tasks.pairs import Pair


# ---------------------------------------------------------------- references


def ref_bucket(n, min_len=8, max_len=None):
    t = 1
    while t < max(n, min_len):
        t *= 2
    return t if max_len is None else min(t, max_len)


def ref_first_difference(a, b):
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def ref_row(seq, length, score_from):
    """(ids, attention, target) for one row, as Python lists."""
    ids = [int(x) for x in seq] + [PAD_ID] * (length - len(seq))
    attn = [1] * len(seq) + [0] * (length - len(seq))
    tgt = [1.0 if (t >= 1 and t >= score_from and t < len(seq)) else 0.0 for t in range(length)]
    return ids, attn, tgt


def random_seqs(rng, n, lo=1, hi=100, vocab=50):
    return [rng.integers(1, vocab, size=int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def check_batch_rows(batch, seqs, score_from, batch_size):
    """Each valid row equals the reference; padding rows are all zero and invalid."""
    B, T = batch.input_ids.shape
    assert B == batch_size
    assert batch.input_ids.dtype == np.int32 and batch.attention_mask.dtype == np.int32
    assert batch.target_mask.dtype == np.float32 and batch.index.dtype == np.int64
    assert batch.valid.dtype == bool
    assert not batch.target_mask[:, 0].any()
    for r in range(B):
        if batch.valid[r]:
            i = int(batch.index[r])
            ids, attn, tgt = ref_row(seqs[i], T, 1 if score_from is None else score_from[i])
            assert batch.input_ids[r].tolist() == ids
            assert batch.attention_mask[r].tolist() == attn
            assert batch.target_mask[r].tolist() == tgt
        else:
            assert batch.index[r] == -1
            assert not batch.input_ids[r].any() and not batch.attention_mask[r].any()
            assert not batch.target_mask[r].any()
    # valid rows come first (padding only fills the tail)
    assert list(batch.valid) == sorted(batch.valid, reverse=True)


# ---------------------------------------------------------------- pure helpers


def test_bucket_length_matches_reference():
    for n in range(1, 300):
        assert bucket_length(n) == ref_bucket(n)
        assert bucket_length(n, min_len=1) == ref_bucket(n, min_len=1)
        if n <= 200:
            assert bucket_length(n, max_len=200) == ref_bucket(n, max_len=200)
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17, 64, 65)] == [8, 8, 16, 16, 32, 64, 128]
    with pytest.raises(ValueError):
        bucket_length(0)
    with pytest.raises(ValueError, match="max_len"):
        bucket_length(201, max_len=200)


def test_first_difference_matches_reference():
    rng = np.random.default_rng(0)
    assert first_difference(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
    assert first_difference(np.array([1, 2]), np.array([1, 2, 4])) == 2
    assert first_difference(np.array([1, 2]), np.array([1, 2])) == 2
    assert first_difference(np.array([5]), np.array([1, 2])) == 0
    for _ in range(300):
        a = rng.integers(0, 3, size=int(rng.integers(0, 8)))
        b = rng.integers(0, 3, size=int(rng.integers(0, 8)))
        assert first_difference(a, b) == ref_first_difference(a, b)


def test_make_batch_masks_and_padding():
    rng = np.random.default_rng(1)
    for _ in range(30):
        seqs = random_seqs(rng, int(rng.integers(1, 6)), hi=20)
        sf = [int(rng.integers(0, len(s) + 2)) for s in seqs]
        b = make_batch(seqs, length=20, batch_size=6, score_from=sf, index=[10 + i for i in range(len(seqs))])
        assert b.shape == (6, 20)
        check_batch_rows(b, {10 + i: s for i, s in enumerate(seqs)}, {10 + i: v for i, v in enumerate(sf)}, 6)
    b = make_batch(seqs, length=20, batch_size=6)  # defaults: index 0.., score from 1
    check_batch_rows(b, seqs, None, 6)
    with pytest.raises(ValueError, match="batch_size"):
        make_batch(seqs * 7, length=20, batch_size=6)
    with pytest.raises(ValueError, match="length"):
        make_batch([np.ones(21, np.int32)], length=20, batch_size=1)


# ---------------------------------------------------------------- iterators


@pytest.mark.parametrize("seed", range(6))
def test_iter_bucketed_property(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    seqs = random_seqs(rng, n, hi=int(rng.choice([10, 60, 130])))
    sf = None if seed % 2 else [int(rng.integers(0, len(s) + 1)) for s in seqs]
    bs = int(rng.integers(1, 9))
    batches = list(iter_bucketed(seqs, batch_size=bs, score_from=sf))
    seen = []
    for b in batches:
        check_batch_rows(b, seqs, sf, bs)
        T = b.shape[1]
        for r in np.flatnonzero(b.valid):
            seen.append(int(b.index[r]))
            assert T == ref_bucket(len(seqs[b.index[r]]))  # grouped by its own bucket
        assert b.valid.any()
    assert sorted(seen) == list(range(n))  # every item exactly once
    Ts = [b.shape[1] for b in batches]
    assert Ts == sorted(Ts)  # shortest bucket first
    assert len(set(Ts)) <= 1 + int(np.log2(max(ref_bucket(max(map(len, seqs))) // 8, 1)))
    # padding only in the last batch of each bucket
    for T in set(Ts):
        group = [b for b in batches if b.shape[1] == T]
        assert all(b.valid.all() for b in group[:-1])
    # deterministic
    again = list(iter_bucketed(seqs, batch_size=bs, score_from=sf))
    assert all((a.input_ids == b.input_ids).all() and (a.index == b.index).all() for a, b in zip(batches, again))


def test_iter_bucketed_max_len():
    seqs = [np.arange(1, n + 1, dtype=np.int32) for n in (3, 40, 90, 100)]
    Ts = {b.shape[1] for b in iter_bucketed(seqs, batch_size=2, max_len=100)}
    assert Ts == {8, 64, 100}
    with pytest.raises(TaskDataError, match="item 1 has 40 tokens"):
        list(iter_bucketed(seqs, batch_size=2, max_len=32))


@pytest.mark.parametrize("seed", range(4))
def test_iter_pair_batches_property(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 60))
    good = random_seqs(rng, n, hi=70)
    bad = random_seqs(rng, n, hi=70)
    sfg = [int(rng.integers(1, len(s) + 1)) for s in good]
    sfb = [int(rng.integers(1, len(s) + 1)) for s in bad]
    bs = int(rng.integers(1, 7))
    seen = []
    for bg, bb in iter_pair_batches(good, bad, batch_size=bs, score_from_good=sfg, score_from_bad=sfb):
        assert bg.shape == bb.shape
        assert (bg.index == bb.index).all() and (bg.valid == bb.valid).all()
        check_batch_rows(bg, good, sfg, bs)
        check_batch_rows(bb, bad, sfb, bs)
        for i in bg.index[bg.valid]:
            seen.append(int(i))
            assert bg.shape[1] == ref_bucket(max(len(good[i]), len(bad[i])))
    assert sorted(seen) == list(range(n))
    with pytest.raises(ValueError):
        next(iter_pair_batches(good, bad[:-1] if n > 1 else [], batch_size=2))


def test_target_mask_scores_the_right_tokens():
    """Oracle for the mask convention: under a bigram model the masked sum of log-probs
    gathered from a Batch equals a per-sentence Python loop over p(x_t | x_{t-1})."""
    rng = np.random.default_rng(7)
    V = 30
    logp = np.log(rng.dirichlet(np.ones(V), size=V))  # logp[prev, next]
    seqs = random_seqs(rng, 25, lo=1, hi=20, vocab=V)
    sf = [int(rng.integers(1, len(s) + 1)) for s in seqs]
    want = [sum(logp[s[t - 1], s[t]] for t in range(max(f, 1), len(s))) for s, f in zip(seqs, sf)]
    got = np.zeros(len(seqs))
    for b in iter_bucketed(seqs, batch_size=4, score_from=sf):
        # "logits at position t-1 predict token t": shift right by one.
        tok_logp = np.zeros(b.shape, np.float64)
        tok_logp[:, 1:] = logp[b.input_ids[:, :-1], b.input_ids[:, 1:]]
        scores = (tok_logp * b.target_mask).sum(1)
        got[b.index[b.valid]] = scores[b.valid]
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------- tokenizer


def test_bos_id_variants():
    tok = tiny_tokenizer()
    assert bos_id(tok) == tok.bos_token_id == 1
    assert bos_id(tok, "none") is None
    assert bos_id(tok, "<eos>") == 2
    assert bos_id(tiny_tokenizer(bos=False)) == 2  # falls back to EOS, GPT-2 style
    with pytest.raises(TaskDataError, match="neither"):
        bos_id(tiny_tokenizer(bos=False, eos=False))
    with pytest.raises(TaskDataError, match="<nope>"):
        bos_id(tok, "<nope>")


def test_encode_prepends_bos_without_other_specials():
    tok = tiny_tokenizer()
    texts = ["Who should Derek hug after shocking Richard?", "Zyx quux!"]
    raw = [tok.encode(t, add_special_tokens=False) for t in texts]
    got = encode(tok, texts)
    assert all(g.dtype == np.int32 for g in got)
    assert [g.tolist() for g in got] == [[1] + r for r in raw]
    assert [g.tolist() for g in encode(tok, texts, bos="none")] == raw
    assert encode(tok, []) == []
    assert tok.decode(got[0][1:]) == texts[0]


def test_encode_too_long_names_sentence():
    tok = tiny_tokenizer()
    long = "Derek " * 40 + "hugged Richard."
    n = len(tok.encode(long, add_special_tokens=False)) + 1
    with pytest.raises(TaskDataError) as e:
        encode(tok, ["A cat.", long], max_length=16)
    msg = str(e.value)
    assert long[:77] + "..." in msg and long not in msg
    assert f"{n} tokens" in msg and "max_length=16" in msg
    assert len(encode(tok, [long], max_length=n)[0]) == n


def test_encode_pairs_first_difference():
    tok = tiny_tokenizer()
    pairs = [Pair(p.sentence_good, p.sentence_bad, p.UID, p.pairID)
             for t in load_blimp(["passive_1", "adjunct_island"]) for p in t.pairs[:20]]
    pairs.append(Pair("Same here.", "Same here.", "u", "x"))  # BLiMP has 7 such pairs
    g, b, sg, sb = encode_pairs(tok, pairs)
    assert (sg == 1).all() and (sb == 1).all() and sg.dtype == np.int64
    g2, b2, sg2, sb2 = encode_pairs(tok, pairs, from_first_difference=True)
    assert all((x == y).all() for x, y in zip(g, g2)) and all((x == y).all() for x, y in zip(b, b2))
    assert (sg2 == sb2).all()
    for x, y, s in zip(g2, b2, sg2):
        assert s == max(ref_first_difference(x, y), 1)
        assert (x[:s] == y[:s]).all()
    assert sg2[-1] == len(g2[-1])  # identical pair: nothing scored
    bg, bb = next(iter_pair_batches(g2[-1:], b2[-1:], batch_size=1, score_from_good=sg2[-1:],
                                    score_from_bad=sb2[-1:]))
    assert not bg.target_mask.any() and not bb.target_mask.any()
    # passive_1 changes the verb, not the first word: the shared prefix is skipped.
    assert (sg2[:20] > 1).all()


def test_blimp_end_to_end_few_shapes():
    tok = tiny_tokenizer()
    pairs = [p for t in load_blimp(["adjunct_island", "principle_A_case_2"]) for p in t.pairs[:200]]
    g, b, sg, sb = encode_pairs(tok, pairs, max_length=128)
    batches = list(iter_pair_batches(g, b, batch_size=16, score_from_good=sg, score_from_bad=sb))
    assert len({bg.shape for bg, _ in batches}) <= 3
    rebuilt = {}
    for bg, bb in batches:
        for r in np.flatnonzero(bg.valid):
            L = int(bg.attention_mask[r].sum())
            rebuilt[int(bg.index[r])] = bg.input_ids[r, :L]
    assert sorted(rebuilt) == list(range(len(pairs)))
    assert all((rebuilt[i] == g[i]).all() for i in range(len(pairs)))


def test_iter_packed_holds_every_sentence_once_within_rows():
    from lmgrad.tasks import iter_packed, packed_row_length

    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, n) for n in rng.integers(1, 20, 57)]
    score_from = [int(rng.integers(1, 3)) for _ in seqs]
    L = packed_row_length([len(s) for s in seqs])
    assert L == 64
    batches = list(iter_packed(seqs, rows=3, score_from=score_from))
    R = batches[0].shape[0]
    assert R <= 3 and all(b.shape == (R, 64) for b in batches)
    seen = {}
    for b in batches:
        for r in range(R):
            segs = b.attention_mask[r]
            n = int((segs > 0).sum())
            assert np.all(segs[:n] > 0) and np.all(segs[n:] == 0)  # padding only at the row's end
            assert np.all(np.diff(segs[:n]) >= 0)  # segments numbered in order
            for k in np.unique(segs[:n]):
                cols = np.flatnonzero(segs == k)
                (i,) = set(b.owner[r, cols])
                assert i not in seen
                seen[i] = True
                np.testing.assert_array_equal(b.input_ids[r, cols], seqs[i])
                start = max(score_from[i], 1)
                np.testing.assert_array_equal(b.target_mask[r, cols], (np.arange(len(cols)) >= start).astype(np.float32))
    assert sorted(seen) == list(range(len(seqs)))
    total = sum(len(s) for s in seqs)
    rows_used = sum(int((b.attention_mask[:, 0] > 0).sum()) for b in batches)
    assert rows_used * 64 < 1.1 * total  # first-fit leaves little padding in the rows
    assert len(batches) * R - rows_used < len(batches)  # empty rows: fewer than one per batch
    again = list(iter_packed(seqs, rows=3, score_from=score_from))
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(batches, again))


def test_iter_packed_names_an_overlong_sentence():
    from lmgrad.tasks import iter_packed

    seqs = [np.ones(5, np.int64), np.ones(40, np.int64)]
    with pytest.raises(TaskDataError, match="item 1 has 40 tokens, more than max_len=32"):
        list(iter_packed(seqs, rows=2, max_len=32))


def test_iter_packed_pairs_keeps_each_pair_in_one_row():
    from lmgrad.tasks import iter_packed_pairs

    rng = np.random.default_rng(1)
    n = 61
    good = [rng.integers(1, 50, k) for k in rng.integers(2, 18, n)]
    bad = [rng.integers(1, 50, k) for k in rng.integers(2, 18, n)]
    sg = [int(rng.integers(1, 3)) for _ in range(n)]
    sb = [int(rng.integers(1, 3)) for _ in range(n)]
    batches = list(iter_packed_pairs(good, bad, rows=4, score_from_good=sg, score_from_bad=sb))
    R, L = batches[0].shape
    Q = batches[0].index.shape[1]
    assert L == 64 and R <= 4 and all(b.shape == (R, L) and b.index.shape == (R, Q) for b in batches)
    seen = []
    for b in batches:
        for r in range(R):
            segs, slot = b.attention_mask[r], b.slot[r]
            used = int((segs > 0).sum())
            assert np.all(segs[:used] > 0) and np.all(segs[used:] == 0) and np.all(slot[used:] == -1)
            pairs_here = [int(i) for i in b.index[r] if i >= 0]
            assert list(b.index[r, :len(pairs_here)]) == pairs_here  # filled slots first
            for q, i in enumerate(pairs_here):
                seen.append(i)
                # good then bad, two consecutive segments, both in slot q
                g_cols, b_cols = np.flatnonzero(segs == 2 * q + 1), np.flatnonzero(segs == 2 * q + 2)
                assert np.all(slot[g_cols] == q) and np.all(slot[b_cols] == q)
                assert b_cols[0] == g_cols[-1] + 1
                np.testing.assert_array_equal(b.input_ids[r, g_cols], good[i])
                np.testing.assert_array_equal(b.input_ids[r, b_cols], bad[i])
                # signed targets: + on the good sentence's scored tokens, − on the bad one's
                np.testing.assert_array_equal(b.target_mask[r, g_cols], (np.arange(len(good[i])) >= sg[i]) * 1.0)
                np.testing.assert_array_equal(b.target_mask[r, b_cols], (np.arange(len(bad[i])) >= sb[i]) * -1.0)
            assert np.all(slot[:used] < len(pairs_here))
    assert sorted(seen) == list(range(n))
    tokens = sum(len(g) + len(b) for g, b in zip(good, bad))
    rows_used = sum(int((b.index[:, 0] >= 0).sum()) for b in batches)
    assert rows_used * L < 1.1 * tokens  # whole pairs still pack tightly
    again = list(iter_packed_pairs(good, bad, rows=4, score_from_good=sg, score_from_bad=sb))
    assert all(np.array_equal(a.index, b.index) for a, b in zip(batches, again))


def test_iter_packed_pairs_names_an_overlong_pair():
    from lmgrad.tasks import iter_packed_pairs

    good, bad = [np.ones(5, np.int64), np.ones(20, np.int64)], [np.ones(6, np.int64), np.ones(15, np.int64)]
    with pytest.raises(TaskDataError, match=r"pair 1 has 35 tokens \(good 20 \+ bad 15\), more than the row length 32"):
        list(iter_packed_pairs(good, bad, rows=2, row_len=32))
    with pytest.raises(ValueError, match="slots=1"):
        list(iter_packed_pairs(good[:1] * 3, bad[:1] * 3, rows=2, row_len=32, slots=1))
