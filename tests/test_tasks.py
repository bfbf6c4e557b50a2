"""lmgrad.tasks: JSONL loader, BLiMP from a directory or the download cache, selector language,
sampling and degenerate pairs."""
import collections
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest

from lmgrad.tasks import (
    BLIMP_UIDS, Pair, Task, TaskDataError, blimp_path, blimp_source_dir, blimp_taxonomy, blimp_uids,
    degenerate_pairs, drop_degenerate, load_blimp, load_jsonl, select_tasks, set_blimp_dir, subsample,
    task_provenance,
)
from lmgrad.tasks import blimp as blimp_mod

# conftest.py points LMGRAD_BLIMP_DIR at the team's shared copy (beside the checkout in CI).
SHARED_BLIMP = pathlib.Path(os.environ.get(
    "LMGRAD_BLIMP_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp"))
needs_blimp = pytest.mark.skipif(not SHARED_BLIMP.is_dir(), reason="no BLiMP copy at LMGRAD_BLIMP_DIR")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(**kw):
    base = {"sentence_good": "The cat sleeps.", "sentence_bad": "The cat sleep."}
    base.update(kw)
    return json.dumps(base)


# ---------------------------------------------------------------- loader


def test_load_jsonl_round_trip(tmp_path):
    rows = [
        {"sentence_good": "A b.", "sentence_bad": "B a.", "UID": "t1", "pairID": "7",
         "field": "syntax", "linguistics_term": "x", "one_prefix_method": True, "extra": [1, 2]},
        {"sentence_good": "C d.", "sentence_bad": "D c.", "UID": "t2", "pairID": "0"},
        {"sentence_good": "E f.", "sentence_bad": "F e.", "UID": "t1", "pairID": "8",
         "field": "syntax", "linguistics_term": "x"},
    ]
    p = _write(tmp_path / "mine.jsonl", [json.dumps(r) for r in rows[:2]] + ["", "   "] + [json.dumps(rows[2])])
    tasks = load_jsonl(p)
    assert [t.uid for t in tasks] == ["t1", "t2"]
    t1 = tasks[0]
    assert isinstance(t1, Task) and len(t1) == 2 and t1.source == str(p)
    assert t1.field == "syntax" and t1.linguistics_term == "x"
    assert t1.pairs[0] == Pair("A b.", "B a.", "t1", "7", "syntax", "x",
                               {"one_prefix_method": True, "extra": [1, 2]})
    assert [q.pairID for q in t1.pairs] == ["7", "8"]
    import hashlib
    assert t1.sha256 == tasks[1].sha256 == hashlib.sha256(p.read_bytes()).hexdigest()


def test_load_jsonl_defaults_and_gzip(tmp_path):
    lines = [_row(), _row(sentence_good="Dogs bark.", sentence_bad="Dogs barks.")]
    p = _write(tmp_path / "agree.jsonl", lines)
    (t,) = load_jsonl(p)
    assert t.uid == "agree" and [q.pairID for q in t.pairs] == ["0", "1"]
    assert t.field is None and t.pairs[0].meta == {}
    (t2,) = load_jsonl(p, default_uid="other")
    assert t2.uid == "other"
    gz = tmp_path / "agree.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    (t3,) = load_jsonl(gz)
    assert t3.pairs == t.pairs and t3.uid == "agree" and t3.sha256 == t.sha256


def test_pair_id_stays_string_and_field_normalised(tmp_path):
    p = _write(tmp_path / "x.jsonl", [_row(pairID="001", field="syntax/semantics"), _row(pairID=2)])
    (t,) = load_jsonl(p)
    assert [q.pairID for q in t.pairs] == ["001", "2"]
    assert all(isinstance(q.pairID, str) for q in t.pairs)
    assert t.field == "syntax_semantics"


@pytest.mark.parametrize("bad_line, field_word", [
    ('{"sentence_good": "a", "sentence_bad": ', "malformed JSON"),
    ('["sentence_good", "sentence_bad"]', "JSON object"),
    ('{"sentence_good": "The cat sleeps."}', "'sentence_bad'"),
    ('{"sentence_good": "", "sentence_bad": "x"}', "'sentence_good'"),
    ('{"sentence_good": "  ", "sentence_bad": "x"}', "'sentence_good'"),
    ('{"sentence_good": 3, "sentence_bad": "x"}', "'sentence_good'"),
    (_row(pairID="0"), "'pairID'"),  # duplicate of line 1
    (_row(pairID=[1]), "'pairID'"),
    (_row(UID=""), "'UID'"),
    (_row(pairID="5", field=3), "'field'"),
])
def test_load_jsonl_errors_name_file_line_and_field(tmp_path, bad_line, field_word):
    p = _write(tmp_path / "bad.jsonl", [_row(pairID="0"), "", bad_line])
    with pytest.raises(TaskDataError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert f"{p}:3" in msg, msg
    assert field_word in msg, msg


def test_load_jsonl_inconsistent_field_and_empty_file(tmp_path):
    p = _write(tmp_path / "f.jsonl", [_row(UID="u", field="syntax"), _row(UID="u", pairID="9", field="semantics")])
    with pytest.raises(TaskDataError, match=r"f\.jsonl:2.*'field'"):
        load_jsonl(p)
    empty = _write(tmp_path / "e.jsonl", ["", ""])
    with pytest.raises(TaskDataError, match="no pairs"):
        load_jsonl(empty)
    with pytest.raises(TaskDataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- BLiMP


def test_blimp_shape_and_taxonomy():
    uids = blimp_uids()
    assert len(uids) == 67 and uids == sorted(uids)
    tasks = load_blimp()
    assert [t.uid for t in tasks] == uids
    for t in tasks:
        assert len(t.pairs) == 1000 and t.source == "blimp" and len(t.sha256) == 64
        assert {p.UID for p in t.pairs} == {t.uid}
        assert len({p.pairID for p in t.pairs}) == 1000
    tax = blimp_taxonomy()
    assert set(tax) == set(uids)
    assert {v["field"] for v in tax.values()} == {"morphology", "syntax", "semantics", "syntax_semantics"}
    terms = collections.Counter(v["linguistics_term"] for v in tax.values())
    assert len(terms) == 13 and terms["island_effects"] == 8 and terms["s-selection"] == 2
    assert tax["principle_A_case_2"]["field"] == "syntax_semantics"
    assert {t.uid: (t.field, t.linguistics_term) for t in tasks} == {
        u: (v["field"], v["linguistics_term"]) for u, v in tax.items()}
    p = load_blimp(["principle_A_case_2"])[0].pairs[0]
    assert p.meta["one_prefix_prefix"] == "Eric imagines himself" and p.meta["one_prefix_method"] is True


def test_blimp_unknown_uid():
    with pytest.raises(TaskDataError, match="passive_1"):  # lists the valid UIDs
        load_blimp(["passive_9"])


@needs_blimp
def test_blimp_matches_source_copy():
    files = sorted(SHARED_BLIMP.glob("*.jsonl"))
    assert [f.name[:-6] for f in files] == blimp_uids() == list(BLIMP_UIDS)
    for f, task in zip(files, load_blimp()):
        # The shared copy is BLiMP at the pinned commit, so a download would pass its check.
        assert task.sha256 == hashlib.sha256(f.read_bytes()).hexdigest() == blimp_mod.BLIMP_SHA256[task.uid]
        src = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert len(src) == len(task.pairs)
        for r, p in zip(src, task.pairs):
            got = {"sentence_good": p.sentence_good, "sentence_bad": p.sentence_bad, "UID": p.UID,
                   "pairID": p.pairID, "field": p.field, "linguistics_term": p.linguistics_term, **p.meta}
            want = dict(r, field="syntax_semantics" if r["field"] == "syntax/semantics" else r["field"])
            assert got == want


# ------------------------------------------------ BLiMP: directory, env var, download cache


@pytest.fixture
def no_blimp_config(monkeypatch, tmp_path):
    """No directory configured and an empty cache under tmp_path; returns the cache dir."""
    monkeypatch.delenv("LMGRAD_BLIMP_DIR", raising=False)
    monkeypatch.setattr(blimp_mod, "_explicit_dir", None)
    monkeypatch.setenv("LMGRAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "blimp"


def _blimp_dir_copy(dest: pathlib.Path, skip=(), gz=()) -> pathlib.Path:
    """`dest` with every shared paradigm symlinked, except `skip`; `gz` ones gzip-compressed."""
    dest.mkdir()
    for uid in BLIMP_UIDS:
        if uid in gz:
            (dest / f"{uid}.jsonl.gz").write_bytes(gzip.compress((SHARED_BLIMP / f"{uid}.jsonl").read_bytes()))
        elif uid not in skip:
            (dest / f"{uid}.jsonl").symlink_to(SHARED_BLIMP / f"{uid}.jsonl")
    return dest


def test_blimp_uids_known_without_data(no_blimp_config, monkeypatch):
    def offline(*a, **k):
        raise AssertionError("no download expected")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert len(blimp_uids()) == 67 and blimp_uids() == sorted(BLIMP_UIDS)
    with pytest.raises(TaskDataError, match="passive_1"):  # still lists valid UIDs
        load_blimp(["passive_9"])


@needs_blimp
def test_blimp_from_env_var_setter_and_argument(tmp_path, monkeypatch, no_blimp_config):
    env_dir = _blimp_dir_copy(tmp_path / "env", gz={"passive_2"})
    monkeypatch.setenv("LMGRAD_BLIMP_DIR", str(env_dir))
    assert blimp_source_dir() == (env_dir, "$LMGRAD_BLIMP_DIR")
    assert blimp_path("passive_1") == env_dir / "passive_1.jsonl"
    assert blimp_path("passive_2") == env_dir / "passive_2.jsonl.gz"
    p1, p2 = load_blimp(["passive_1", "passive_2"])
    # sha256 is of the uncompressed bytes, however the file is stored.
    assert p2.sha256 == blimp_mod.BLIMP_SHA256["passive_2"] and len(p2.pairs) == 1000
    assert blimp_taxonomy()["passive_2"]["linguistics_term"] == "argument_structure"

    other = _blimp_dir_copy(tmp_path / "set")
    set_blimp_dir(other)
    try:
        assert blimp_source_dir() == (other, "set_blimp_dir")  # the setter beats the env var
        assert blimp_source_dir(env_dir) == (env_dir, "blimp_dir argument")  # the argument beats both
        assert select_tasks("passive_2", blimp_dir=env_dir)[0] == p2
    finally:
        set_blimp_dir(None)
    assert blimp_source_dir()[1] == "$LMGRAD_BLIMP_DIR"


@needs_blimp
def test_blimp_dir_missing_paradigm_or_absent(tmp_path, monkeypatch, no_blimp_config):
    partial = _blimp_dir_copy(tmp_path / "partial", skip={"wh_island", "passive_1"})
    monkeypatch.setenv("LMGRAD_BLIMP_DIR", str(partial))
    with pytest.raises(TaskDataError) as e:
        load_blimp(["passive_2"])  # any use checks the whole directory
    msg = str(e.value)
    assert str(partial) in msg and "LMGRAD_BLIMP_DIR" in msg and "2 of the 67" in msg
    assert "passive_1, wh_island" in msg
    clone = tmp_path / "clone"  # a clone's root rather than its data/ folder
    clone.mkdir()
    (clone / "data").symlink_to(SHARED_BLIMP)
    monkeypatch.setenv("LMGRAD_BLIMP_DIR", str(clone))
    with pytest.raises(TaskDataError, match=f"did you mean {clone / 'data'}"):
        blimp_taxonomy()
    monkeypatch.setenv("LMGRAD_BLIMP_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(TaskDataError, match=r"nowhere.*does not exist"):
        select_tasks("term:binding")


def test_blimp_download_failure_names_both_options(no_blimp_config, monkeypatch):
    def unreachable(url, *a, **k):
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(TaskDataError) as e:
        load_blimp(["passive_1"])
    msg = str(e.value)
    assert f"{blimp_mod.BLIMP_BASE_URL}/passive_1.jsonl" in msg and "no route to host" in msg
    assert "LMGRAD_BLIMP_DIR" in msg and "github.com/alexwarstadt/blimp" in msg and "download" in msg
    assert str(no_blimp_config) in msg
    assert not no_blimp_config.exists() or not any(no_blimp_config.iterdir())
    # A selection that needs no BLiMP works offline.
    assert select_tasks("file:" + str(_write(no_blimp_config.parent.parent / "x.jsonl", [_row()])))


@needs_blimp
def test_blimp_download_to_cache_end_to_end(tmp_path, monkeypatch, no_blimp_config):
    mirror = tmp_path / "mirror"  # a stand-in for raw.githubusercontent.com
    mirror.mkdir()
    for uid in ("passive_1", "wh_island"):
        shutil.copy(SHARED_BLIMP / f"{uid}.jsonl", mirror / f"{uid}.jsonl")
    monkeypatch.setattr(blimp_mod, "BLIMP_BASE_URL", mirror.as_uri())
    fetched, written = [], []
    real_urlopen, real_write = urllib.request.urlopen, blimp_mod.atomic_write

    def counting_urlopen(url, *a, **k):
        fetched.append(url)
        return real_urlopen(url, *a, **k)

    def spy_write(path, data):
        written.append(pathlib.Path(path))
        return real_write(path, data)
    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    monkeypatch.setattr(blimp_mod, "atomic_write", spy_write)

    p1, wh = load_blimp(["passive_1", "wh_island"])
    assert fetched == [f"{mirror.as_uri()}/passive_1.jsonl", f"{mirror.as_uri()}/wh_island.jsonl"]
    assert written == [no_blimp_config / "passive_1.jsonl", no_blimp_config / "wh_island.jsonl"]
    assert sorted(os.listdir(no_blimp_config)) == ["passive_1.jsonl", "wh_island.jsonl"]  # no temp files
    assert (no_blimp_config / "passive_1.jsonl").read_bytes() == (SHARED_BLIMP / "passive_1.jsonl").read_bytes()
    assert p1.sha256 == blimp_mod.BLIMP_SHA256["passive_1"] and len(wh.pairs) == 1000
    assert blimp_source_dir() == (no_blimp_config, "cache")

    # Second use: read from the cache, nothing downloaded again.
    assert blimp_path("passive_1") == no_blimp_config / "passive_1.jsonl"
    assert load_blimp(["passive_1"]) == [p1] and len(fetched) == 2

    # A paradigm the mirror lacks fails with the URL; a corrupt one is refused and not cached.
    with pytest.raises(TaskDataError, match=r"passive_2\.jsonl.*LMGRAD_BLIMP_DIR"):
        load_blimp(["passive_2"])
    (mirror / "wh_questions_object_gap.jsonl").write_bytes(b'{"sentence_good": "a", "sentence_bad": "b"}\n')
    with pytest.raises(TaskDataError, match="sha256.*expected"):
        load_blimp(["wh_questions_object_gap"])
    assert sorted(os.listdir(no_blimp_config)) == ["passive_1.jsonl", "wh_island.jsonl"]


# ---------------------------------------------------------------- selection


def test_select_kinds():
    tax = blimp_taxonomy()
    assert [t.uid for t in select_tasks("blimp")] == blimp_uids()
    assert [t.uid for t in select_tasks("blimp:passive_1,anaphor_gender_agreement")] == \
        ["anaphor_gender_agreement", "passive_1"]
    assert [t.uid for t in select_tasks("passive_2")] == ["passive_2"]
    islands = sorted(u for u, v in tax.items() if v["linguistics_term"] == "island_effects")
    assert [t.uid for t in select_tasks("term:island_effects")] == islands
    npi = sorted(u for u, v in tax.items() if v["linguistics_term"] == "npi_licensing")
    assert [t.uid for t in select_tasks("linguistics_term:npi_licensing")] == npi
    syn = sorted(u for u, v in tax.items() if v["field"] == "syntax")
    assert [t.uid for t in select_tasks("field:syntax")] == syn
    ss = [t.uid for t in select_tasks("field:syntax/semantics")]
    assert "principle_A_case_2" in ss and len(ss) == 14
    # union, de-duplicated, sorted
    both = [t.uid for t in select_tasks("term:island_effects+field:syntax,blimp:passive_1,adjunct_island")]
    assert both == sorted(set(islands) | set(syn) | {"passive_1"})


def test_select_file_and_conflicts(tmp_path):
    p = _write(tmp_path / "mine.jsonl", [_row(UID="zz_custom"), _row(UID="aa_custom")])
    got = select_tasks(f"file:{p}+blimp:passive_1,file:{p}")
    assert [t.uid for t in got] == ["aa_custom", "passive_1", "zz_custom"]
    assert got[0].source == str(p)
    clash = _write(tmp_path / "clash.jsonl", [_row(UID="passive_1")])
    with pytest.raises(TaskDataError, match="both"):
        select_tasks(f"blimp:passive_1,file:{clash}")


@pytest.mark.parametrize("sel, match", [
    ("blimp:nope", "valid.*passive_1"),
    ("term:islands", "valid.*island_effects"),
    ("field:pragmatics", "valid.*morphology"),
    ("term:", "needs a value"),
    ("", "selects no tasks"),
    (" , + ", "selects no tasks"),
])
def test_select_errors(sel, match):
    with pytest.raises(TaskDataError, match=match):
        select_tasks(sel)


def test_select_sampling_reproducible_independent_subset():
    a = select_tasks("blimp:passive_1,passive_2", max_pairs_per_task=50, seed=3)
    b = select_tasks("blimp:passive_1,passive_2", max_pairs_per_task=50, seed=3)
    assert a == b
    assert all(len(t.pairs) == 50 for t in a)
    # Independent per task: passive_1's sample does not depend on what else is selected.
    alone = select_tasks("blimp:passive_1", max_pairs_per_task=50, seed=3)[0]
    assert alone.pairs == a[0].pairs
    # Subset of the task, original order kept, no repeats.
    full = load_blimp(["passive_1"])[0]
    pos = {p.pairID: i for i, p in enumerate(full.pairs)}
    idx = [pos[p.pairID] for p in a[0].pairs]
    assert idx == sorted(set(idx)) and all(full.pairs[i] == p for i, p in zip(idx, a[0].pairs))
    # Another seed gives another sample; the two tasks are not sampled in lockstep.
    c = select_tasks("blimp:passive_1", max_pairs_per_task=50, seed=4)[0]
    assert c.pairs != a[0].pairs
    idx2 = [int(p.pairID) for p in a[1].pairs]
    assert idx2 != [int(p.pairID) for p in a[0].pairs]
    # Provenance still describes the source; task_provenance pins the sample.
    assert a[0].sha256 == full.sha256
    pa, pf = task_provenance([a[0], full])
    assert pa["n_pairs"] == 50 and pf["n_pairs"] == 1000 and pa["pair_ids_sha256"] != pf["pair_ids_sha256"]
    json.dumps(task_provenance(a))


def test_subsample_small_task_and_bad_args():
    t = load_blimp(["passive_1"])[0]
    assert subsample(t, 1000) is t and subsample(t, 5000) is t
    with pytest.raises(ValueError):
        subsample(t, 0)
    with pytest.raises(ValueError):
        subsample(t, 5, seed=-1)


def test_unicode_line_separator_inside_string(tmp_path):
    p = tmp_path / "u.jsonl"
    rows = [{"sentence_good": "a\u2028b", "sentence_bad": "c\u0085d"}, {"sentence_good": "e", "sentence_bad": ""}]
    p.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"u\.jsonl:2: field 'sentence_bad' is empty"):
        load_jsonl(p)
    p.write_text(json.dumps(rows[0], ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_jsonl(p)[0].pairs[0].sentence_good == "a\u2028b"


# ---------------------------------------------------------------- selector: bare paths


def test_select_bare_path_is_a_file(tmp_path):
    p = _write(tmp_path / "mine.jsonl", [_row(UID="zz_custom")])
    gz = tmp_path / "other.jsonl.gz"
    gz.write_bytes(gzip.compress(_row(UID="aa_custom").encode()))
    assert select_tasks(str(p)) == select_tasks(f"file:{p}")
    got = select_tasks(f"{p},{gz}+passive_2")
    assert [t.uid for t in got] == ["aa_custom", "passive_2", "zz_custom"]
    assert got[0].source == str(gz)


@pytest.mark.parametrize("item", ["/no/such/pairs.jsonl", "pairs.jsonl.gz", "data/passive_1"])
def test_select_path_like_uid_suggests_file(item):
    with pytest.raises(TaskDataError, match=f"did you mean file:{item}\\?"):
        select_tasks(f"blimp:passive_2,{item}")


# ---------------------------------------------------------------- degenerate pairs


def _old_subsample_ids(task: Task, n: int, seed: int) -> list[str]:
    """`subsample` as it was before degenerate pairs were dropped (commit cb84206): the reference."""
    if len(task.pairs) <= n:
        return [p.pairID for p in task.pairs]
    h = int.from_bytes(hashlib.sha256(task.uid.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([seed, h])
    idx = np.sort(rng.choice(len(task.pairs), size=n, replace=False))
    return [task.pairs[i].pairID for i in idx]


def test_degenerate_pair_dropped_before_sampling_and_recorded(tmp_path):
    rows = [_row(UID="t", pairID=str(i), sentence_good=f"Cats {i} sleep.", sentence_bad=f"Cats {i} sleeps.")
            for i in range(6)]
    rows[2] = _row(UID="t", pairID="2", sentence_good="Cats sleep. ", sentence_bad=" Cats sleep.")
    p = _write(tmp_path / "deg.jsonl", rows)
    with pytest.warns(UserWarning, match=r"'t'.*1 pair.*\['2'\]"):
        (t,) = select_tasks(f"file:{p}")
    assert [q.pairID for q in t.pairs] == ["0", "1", "3", "4", "5"] and t.degenerate_pair_ids == ("2",)
    (row,) = task_provenance([t])
    assert row["n_degenerate_dropped"] == 1 and row["degenerate_pair_ids"] == ["2"] and row["n_pairs"] == 5
    json.dumps(row)
    with pytest.warns(UserWarning):
        (s,) = select_tasks(f"file:{p}", max_pairs_per_task=3, seed=1)
    assert "2" not in {q.pairID for q in s.pairs} and len(s.pairs) == 3
    assert task_provenance([s])[0]["degenerate_pair_ids"] == ["2"]
    # A task without degenerate pairs is untouched and says so.
    clean = load_jsonl(_write(tmp_path / "clean.jsonl", [_row(), _row(pairID="1", sentence_bad="Cat sleep.")]))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drop_degenerate(clean) is clean
    assert task_provenance([clean])[0]["n_degenerate_dropped"] == 0


@needs_blimp
def test_default_blimp_sample_has_no_degenerate_pairs():
    with pytest.warns(UserWarning, match=r"principle_A_case_2.*'105'"):
        tasks = select_tasks("blimp", max_pairs_per_task=12, seed=0)
    assert len(tasks) == 67 and all(len(t.pairs) == 12 for t in tasks)
    assert not [(t.uid, p.pairID) for t in tasks for p in t.pairs
                if p.sentence_good.strip() == p.sentence_bad.strip()]
    prov = {r["uid"]: r for r in task_provenance(tasks)}
    assert prov["principle_A_case_2"]["degenerate_pair_ids"] == ["105", "287", "372", "816", "967"]
    assert prov["passive_1"]["n_degenerate_dropped"] == 2
    assert sum(r["n_degenerate_dropped"] for r in prov.values()) == 7


@needs_blimp
@pytest.mark.parametrize("n, seed", [(12, 0), (50, 3), (12, 7)])
def test_sample_unchanged_for_tasks_without_degenerate_pairs(n, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tasks = select_tasks("blimp", max_pairs_per_task=n, seed=seed)
    full = {t.uid: t for t in load_blimp()}
    checked = 0
    for t in tasks:
        if t.degenerate_pair_ids:
            continue
        assert [p.pairID for p in t.pairs] == _old_subsample_ids(full[t.uid], n, seed), t.uid
        checked += 1
    assert checked == 65


def test_degenerate_pairs_on_token_ids():
    a = [np.array([1, 5, 6], np.int32), np.array([1, 7]), np.array([1, 2, 3]), np.array([1, 2])]
    b = [np.array([1, 5, 6], np.int32), np.array([1, 8]), np.array([1, 2]), np.array([1, 2])]
    assert degenerate_pairs(a, b) == [0, 3]
    assert degenerate_pairs([], []) == []
    with pytest.raises(ValueError):
        degenerate_pairs(a, b[:2])
