"""lmgrad.store: round trips against independent oracles, crash/resume under SIGKILL, refusals."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import lmgrad.store as ls
from lmgrad import io as lio

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"id": "tiny", "revision": "abc123"}, "projector": {"seed": 0, "k": 12}, "token": "sum"}
LAYOUT = [{"name": "attn", "offset": 0, "size": 4, "shape": [2, 2]},
          {"name": "mlp", "offset": 4, "size": 6}]


def make_meta(start: int, stop: int) -> list[dict]:
    return [{"UID": f"task_{i % 3}", "pairID": i, "field": "syntax", "linguistics_term": "agreement"}
            for i in range(start, stop)]


def make_rows(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def snapshot(workdir: Path) -> dict[str, bytes]:
    """Every file under the run dir (except the lock) with its bytes."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------- round trips

def test_roundtrip_float32_meta_blocks(tmp_path):
    rows = make_rows(23, 12)
    store = ls.write_store(tmp_path / "run", rows, make_meta(0, 23), config=CONFIG, k=12,
                           layout=LAYOUT, shard_rows=5)
    assert len(store) == 23 and store.complete and len(store.shards) == 5
    assert store.config == CONFIG and store.k == 12 and store.blocks() == ["attn", "mlp"]
    np.testing.assert_array_equal(store.sketches, rows)
    assert all(isinstance(a, np.memmap) and a.dtype == np.float32 for a in store.shard_arrays())
    # rows() gathers shard by shard; the reference is plain indexing of the in-memory array.
    idx = np.array([22, 0, 5, 4, 5, -1, 13])
    np.testing.assert_array_equal(store.rows(idx), rows[idx])
    np.testing.assert_array_equal(store.rows(slice(3, 17, 4)), rows[3:17:4])
    np.testing.assert_array_equal(store.rows(7), rows[7])
    with pytest.raises(IndexError):
        store.rows([23])
    np.testing.assert_array_equal(store.block("attn"), rows[:, 0:4])
    np.testing.assert_array_equal(store.block("mlp"), rows[:, 4:10])
    assert store.block("attn", reshape=True).shape == (23, 2, 2)
    with pytest.raises(KeyError, match="attn"):
        store.block("nope")
    m = store.meta
    np.testing.assert_array_equal(m["row"], np.arange(23))
    np.testing.assert_array_equal(m["pairID"], np.arange(23))
    assert m["pairID"].dtype == np.int64 and list(m["UID"][:4]) == ["task_0", "task_1", "task_2", "task_0"]
    assert store.meta_records()[4] == {"row": 4, **make_meta(4, 5)[0]}


def test_single_shard_is_memmap(tmp_path):
    rows = make_rows(8, 12)
    store = ls.open(ls.write_store(tmp_path / "run", rows, make_meta(0, 8), config=CONFIG, k=12,
                                   layout=LAYOUT).workdir)
    assert isinstance(store.sketches, np.memmap) and not store.sketches.flags.writeable
    assert isinstance(store.block("mlp").base, np.memmap) or isinstance(store.block("mlp"), np.memmap)
    np.testing.assert_array_equal(store.sketches, rows)


def _nearest_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Oracle: nearest bfloat16 to each float64 by search over all finite bfloat16 values (ties to even).

    Independent of the store's bit tricks; note ml_dtypes' float64→bfloat16 cast rounds twice
    (through float32), so it is not a correct oracle for float64 input near ties.
    """
    pos = np.arange(0x7F80, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)  # ascending
    a = np.abs(x)
    lo = np.searchsorted(pos, a, side="right") - 1
    hi = np.minimum(lo + 1, len(pos) - 1)
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    return (pick.astype(np.uint16) | (np.signbit(x).astype(np.uint16) << 15)).astype(np.uint16)


def test_roundtrip_bfloat16_rounding(tmp_path):
    rng = np.random.default_rng(1)
    k = 12
    x = rng.standard_normal((30, k)) * np.exp(rng.uniform(-30, 30, (30, k)))
    # Ties and near-ties of bfloat16 that float64→float32→bfloat16 double rounding gets wrong.
    x[0, :6] = [1 + 2**-8 + 2**-40, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-40), 2**-130, -0.0]
    x[1, :3] = [1 + 2**-8 - 2**-40, 3.0e38, -1e-45]
    store = ls.write_store(tmp_path / "run", x, make_meta(0, 30), config=CONFIG, k=k,
                           dtype="bfloat16", shard_rows=7)
    want_bits = _nearest_bf16_bits(x)
    np.testing.assert_array_equal(np.concatenate(store.shard_arrays()), want_bits)
    want = want_bits.view(ml_dtypes.bfloat16).astype(np.float32)
    got = store.sketches
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit-exact, keeps -0.0
    np.testing.assert_array_equal(store.rows([29, 0]), want[[29, 0]])
    # float32 input (single rounding) agrees with ml_dtypes; bfloat16 input passes through bit-exact.
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(ls.to_bf16_bits(x32), x32.astype(ml_dtypes.bfloat16).view(np.uint16))
    xb = x32.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ls.to_bf16_bits(xb), xb.view(np.uint16))
    np.testing.assert_array_equal(ls.bf16_bits_to_f32(xb.view(np.uint16)), xb.astype(np.float32))


def test_meta_columns_with_missing_keys(tmp_path):
    meta = make_meta(0, 4)
    meta[1]["note"] = "odd"
    meta[2]["score"] = 0.5
    meta[3]["score"] = 2
    store = ls.write_store(tmp_path / "run", make_rows(4, 12), meta, config=CONFIG, k=12, shard_rows=3)
    assert list(store.meta["note"]) == [None, "odd", None, None]
    assert list(store.meta["score"]) == [None, None, 0.5, 2]
    assert store.meta_records()[1]["note"] == "odd" and "note" not in store.meta_records()[0]


def test_incomplete_store_opens_and_resumes(tmp_path):
    rows = make_rows(10, 12)
    w = ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12, total_rows=10)
    w.write(rows[:4], make_meta(0, 4))
    partial = ls.open(tmp_path / "run")  # while the writer is still live
    assert len(partial) == 4 and not partial.complete
    np.testing.assert_array_equal(partial.sketches, rows[:4])
    with pytest.warns(UserWarning, match="4 of 10"):
        w.close()
    w = ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12, total_rows=10, resume=True)
    assert w.rows_done == 4
    w.write(rows[4:], make_meta(4, 10))
    w.close()
    store = ls.open(tmp_path / "run")
    assert store.complete and len(store) == 10
    np.testing.assert_array_equal(store.sketches, rows)


def test_complete_without_total_rows(tmp_path):
    with ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12) as w:
        w.write(make_rows(3, 12), make_meta(0, 3))
    assert ls.open(tmp_path / "run").complete
    w = ls.StoreWriter(tmp_path / "run2", config=CONFIG, k=12)
    w.write(make_rows(3, 12), make_meta(0, 3))
    w.close(complete=False)
    assert not ls.open(tmp_path / "run2").complete


# ----------------------------------------------------------------------------- crash / resume

CRASH_SCRIPT = r'''
import os, signal, sys, time
import numpy as np
import lmgrad.store as ls
from lmgrad import io as lio

workdir, n, shard, k, sleep_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
die = os.environ.get("DIE_AT")  # "write:N" (half-way through the Nth write) or "replace:N" (after the Nth rename)
if die:
    what, at = die.split(":")
    at, calls = int(at), [0]
    def die_now():
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "write":
        real_write = lio.write_all
        def write_all(fd, data):
            calls[0] += 1
            if calls[0] == at:
                real_write(fd, memoryview(data)[: len(data) // 2])
                die_now()
            real_write(fd, data)
        lio.write_all = write_all
    else:
        real_replace = os.replace
        def replace(a, b):
            real_replace(a, b)
            calls[0] += 1
            if calls[0] == at:
                die_now()
        os.replace = replace

with ls.StoreWriter(workdir, config={"job": "crash"}, k=k, total_rows=n, resume=True) as w:
    for s in range(w.rows_done, n, shard):
        e = min(s + shard, n)
        rows = np.stack([np.random.default_rng([7, i]).standard_normal(k) for i in range(s, e)]).astype(np.float32)
        meta = [{"UID": "u%d" % (i % 5), "pairID": i, "field": "f", "linguistics_term": "t"} for i in range(s, e)]
        w.write(rows, meta)
        time.sleep(sleep_s)
'''


def _committed(workdir: Path) -> int:
    try:
        return sum(e["rows"] for e in json.loads((workdir / "manifest.json").read_text())["shards"])
    except FileNotFoundError:
        return -1


def _run_writer(script: Path, workdir: Path, *, n=360, shard=6, k=64, sleep_s=0.0, die_at=None,
                kill_after=None) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DIE_AT", None)
    if die_at:
        env["DIE_AT"] = die_at
    p = subprocess.Popen([sys.executable, str(script), str(workdir), str(n), str(shard), str(k), str(sleep_s)],
                         env=env, stderr=subprocess.PIPE)
    if kill_after is not None:
        # Wait for this process to commit a shard (machine speed varies), then kill at a random moment.
        start, deadline = _committed(workdir), time.monotonic() + 30
        while _committed(workdir) == start and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"writer failed ({p.returncode}):\n{err.decode()}")
    return p.returncode


def _assert_clean(workdir: Path) -> None:
    store = ls.open(workdir)
    listed = {Path(e[key]).name for e in store.shards for key in ("file", "meta_file")}
    assert set(os.listdir(workdir / "shards")) == listed
    assert not [n for n in os.listdir(workdir) if lio.is_temp_name(n)]


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(CRASH_SCRIPT)
    ref_dir, run = tmp_path / "ref", tmp_path / "run"
    assert _run_writer(script, ref_dir) == 0
    ref = ls.open(ref_dir)
    assert ref.complete and len(ref) == 360

    # Deterministic kills at each step of the commit protocol. Per process: write/replace call 1
    # is the initial manifest, then each shard does data, meta, manifest.
    stages = ["write:1", "replace:1", "write:2", "write:3", "write:4", "replace:5", "replace:6",
              "write:7", "replace:7"]
    # ...then kills at random moments while shards are being written with short sleeps.
    rnd = random.Random(0)
    kills = [(s, None) for s in stages] + [(None, rnd.uniform(0.0, 0.1)) for _ in range(5)]
    seen_rows, left_garbage = [], 0
    for die_at, kill_after in kills:
        rc = _run_writer(script, run, sleep_s=0.02, die_at=die_at, kill_after=kill_after)
        assert rc == -signal.SIGKILL or die_at is None
        if (run / "manifest.json").exists():
            part = ls.open(run)  # partial store is readable and a prefix of the reference
            np.testing.assert_array_equal(part.sketches, ref.sketches[: len(part)])
            assert part.meta_records() == ref.meta_records()[: len(part)]
            seen_rows.append(len(part))
            listed = {Path(e[key]).name for e in part.shards for key in ("file", "meta_file")}
            left_garbage += bool(set(os.listdir(run / "shards")) - listed)
    assert left_garbage >= 3, "kills mid-commit should have left unlisted files for resume to sweep"
    assert seen_rows[-1] < 360, f"the random kills came too late to test anything: {seen_rows}"
    assert _run_writer(script, run) == 0

    store = ls.open(run)
    assert store.complete and len(store) == 360
    np.testing.assert_array_equal(store.sketches, ref.sketches)
    assert store.meta_records() == ref.meta_records()
    assert [e["sha256"] for e in store.shards] == [e["sha256"] for e in ref.shards]
    _assert_clean(run)


def test_stale_unlisted_files_are_swept(tmp_path):
    run = tmp_path / "run"
    w = ls.StoreWriter(run, config=CONFIG, k=12)
    w.write(make_rows(3, 12), make_meta(0, 3))
    w.close(complete=False)
    (run / "shards" / "000001.npy").write_bytes(b"half a shard")
    (run / "shards" / ".000001.meta.jsonl.tmp-1-ab").write_bytes(b"{")
    (run / ".manifest.json.tmp-1-cd").write_bytes(b"{")
    assert len(ls.open(run)) == 3  # readers ignore unlisted files
    w = ls.StoreWriter(run, config=CONFIG, k=12, resume=True)
    _assert_clean(run)
    w.write(make_rows(2, 12, seed=5), make_meta(3, 5))
    w.close()
    np.testing.assert_array_equal(ls.open(run).rows([3, 4]), make_rows(2, 12, seed=5))


# ----------------------------------------------------------------------------- refusals

def test_existing_store_needs_resume(tmp_path):
    ls.write_store(tmp_path / "run", make_rows(2, 12), make_meta(0, 2), config=CONFIG, k=12)
    with pytest.raises(ls.StoreExistsError, match="resume"):
        ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12, total_rows=2)


def test_resume_with_other_config_lists_keys(tmp_path):
    ls.write_store(tmp_path / "run", make_rows(2, 12), make_meta(0, 2), config=CONFIG, k=12)
    other = json.loads(json.dumps(CONFIG))
    other["model"]["revision"] = "def456"
    with pytest.raises(ls.StoreMismatchError) as ei:
        ls.StoreWriter(tmp_path / "run", config=other, k=12, total_rows=2, resume=True)
    msg = str(ei.value)
    assert "config.model.revision" in msg and "'abc123'" in msg and "'def456'" in msg
    with pytest.raises(ls.StoreMismatchError, match=r"k \(stored 12, given 16\).*dtype"):
        ls.StoreWriter(tmp_path / "run", config=CONFIG, k=16, dtype="bfloat16", total_rows=2, resume=True)


def test_nonfinite_row_names_pair_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    w = ls.StoreWriter(run, config=CONFIG, k=12)
    w.write(make_rows(3, 12), make_meta(0, 3))
    before = snapshot(run)
    bad = make_rows(4, 12, seed=2)
    bad[2, 5] = np.nan
    with pytest.raises(ls.NonFiniteError, match=r"row 5 \(UID='task_2', pairID=5\)"):
        w.write(bad, make_meta(3, 7))
    big = make_rows(1, 12).astype(np.float64)
    big[0, 0] = 1e300  # finite in float64, Inf in float32
    with pytest.raises(ls.NonFiniteError, match="overflow"):
        w.write(big, make_meta(3, 4))
    assert snapshot(run) == before and w.rows_done == 3
    w.close()


def test_input_validation(tmp_path):
    w = ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12, total_rows=4)
    with pytest.raises(ValueError, match="shape"):
        w.write(make_rows(2, 11), make_meta(0, 2))
    with pytest.raises(ValueError, match="2 rows but 1"):
        w.write(make_rows(2, 12), make_meta(0, 1))
    with pytest.raises(ValueError, match="linguistics_term"):
        w.write(make_rows(1, 12), [{"UID": "a", "pairID": 0, "field": "x"}])
    with pytest.raises(ValueError, match="total_rows=4"):
        w.write(make_rows(5, 12), make_meta(0, 5))
    with pytest.raises(TypeError, match="JSON"):
        ls.StoreWriter(tmp_path / "run2", config={"f": object()}, k=12)
    with pytest.raises(ValueError, match="overlap"):
        ls.StoreWriter(tmp_path / "run3", config=CONFIG, k=12,
                       layout=[{"name": "a", "offset": 0, "size": 5}, {"name": "b", "offset": 4, "size": 2}])
    w.close(complete=False)


def test_second_live_writer_is_refused(tmp_path):
    w = ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12)
    with pytest.raises(ls.StoreLockedError):
        ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12, resume=True)
    w.close()
    ls.StoreWriter(tmp_path / "run", config=CONFIG, k=12, resume=True).close()


@pytest.mark.parametrize("how", ["sha", "missing"])
def test_corrupted_shard_is_named(tmp_path, how):
    run = tmp_path / "run"
    ls.write_store(run, make_rows(10, 12), make_meta(0, 10), config=CONFIG, k=12, shard_rows=4)
    shard = run / "shards" / "000001.npy"
    if how == "sha":
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
        match = r"000001\.npy: sha256"
    else:
        shard.unlink()
        match = r"000001\.npy: listed in .* but missing"
    with pytest.raises(ls.StoreCorruptError, match=match):
        ls.open(run)
    with pytest.raises(ls.StoreCorruptError, match=match):
        ls.StoreWriter(run, config=CONFIG, k=12, total_rows=10, resume=True)


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # shard data, shard metadata, manifest
def test_full_disk_leaves_store_unchanged(tmp_path, monkeypatch, fail_at):
    run = tmp_path / "run"
    rows = make_rows(9, 12)
    w = ls.StoreWriter(run, config=CONFIG, k=12, total_rows=9)
    w.write(rows[:3], make_meta(0, 3))
    before = snapshot(run)
    real, calls = lio.write_all, [0]

    def full_disk(fd, data):
        calls[0] += 1
        if calls[0] == fail_at:
            real(fd, memoryview(data)[: len(data) // 2])  # a partial write, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(lio, "write_all", full_disk)
    with pytest.raises(OSError) as ei:
        w.write(rows[3:6], make_meta(3, 6))
    assert ei.value.errno == errno.ENOSPC and str(run) in str(ei.value)
    assert snapshot(run) == before and w.rows_done == 3
    store = ls.open(run)
    assert len(store) == 3
    np.testing.assert_array_equal(store.sketches, rows[:3])
    monkeypatch.undo()

    w.write(rows[3:6], make_meta(3, 6))  # the same writer carries on once space is back...
    w.close(complete=False)
    w = ls.StoreWriter(run, config=CONFIG, k=12, total_rows=9, resume=True)  # ...and so does a resume
    w.write(rows[6:], make_meta(6, 9))
    w.close()
    store = ls.open(run)
    assert store.complete
    np.testing.assert_array_equal(store.sketches, rows)
    _assert_clean(run)


def test_reader_does_not_import_jax():
    code = "import sys, lmgrad.store; assert 'jax' not in sys.modules, 'lmgrad.store imported jax'"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
