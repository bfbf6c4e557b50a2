"""lmgrad.tasks: JSONL loader, packaged BLiMP, selector language and sampling."""
import collections
import gzip
import json
import os
import pathlib

import pytest

from lmgrad.tasks import (
    Pair, Task, TaskDataError, blimp_taxonomy, blimp_uids, load_blimp, load_jsonl,
    select_tasks, subsample, task_provenance,
)

# CI checks out the project with the team's shared/ folder beside it.
SHARED_BLIMP = pathlib.Path(os.environ.get(
    "LMGRAD_BLIMP_DIR", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp"))


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


@pytest.mark.skipif(not SHARED_BLIMP.is_dir(), reason="no uncompressed BLiMP copy to compare with")
def test_blimp_matches_source_copy():
    files = sorted(SHARED_BLIMP.glob("*.jsonl"))
    assert [f.name[:-6] for f in files] == blimp_uids()
    for f, task in zip(files, load_blimp()):
        src = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert len(src) == len(task.pairs)
        for r, p in zip(src, task.pairs):
            got = {"sentence_good": p.sentence_good, "sentence_bad": p.sentence_bad, "UID": p.UID,
                   "pairID": p.pairID, "field": p.field, "linguistics_term": p.linguistics_term, **p.meta}
            want = dict(r, field="syntax_semantics" if r["field"] == "syntax/semantics" else r["field"])
            assert got == want


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
