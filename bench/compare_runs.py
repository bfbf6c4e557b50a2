r"""Compare two pipeline workdirs: are the store rows and the task-space arrays the same?

  python bench/compare_runs.py --a=RUN_BEFORE --b=RUN_AFTER --out=bench/results/NAME.json \
      [--note="what changed between the two runs"]

For each store (`sketches/`, `sketches_seed*/`) it compares rows (bitwise, then max |difference|),
per-row metadata and layout block names; for `task_space/task_space.npz` every array both files
hold; for `eval/scores.jsonl` the per-pair log-probs. Writes one JSON record, prints a table.
Used to show that a refactoring left the main job's outputs unchanged.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings
from typing import Any

import numpy as np

from lmgrad import io as lio
from lmgrad import store as lstore


def _arrays(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"shape_a": list(a.shape), "shape_b": list(b.shape)}
    if a.shape != b.shape:
        return {**out, "equal": False}
    out["bitwise_equal"] = bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if a.dtype.kind == "f":
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)  # e.g. an undefined entry
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scale = float(np.nanmax(np.abs(a))) if a.size else 0.0
        out["max_abs_diff"] = float(np.nanmax(d)) if d.size else 0.0
        out["max_rel_diff"] = out["max_abs_diff"] / scale if scale else 0.0
    return out


def compare(a: pathlib.Path, b: pathlib.Path) -> dict[str, Any]:
    """Every comparable output of two pipeline workdirs."""
    report: dict[str, Any] = {"a": str(a), "b": str(b), "stores": {}, "task_space": {}}
    for store in sorted(p.name for p in a.iterdir() if p.name.startswith("sketches")):
        sa, sb = lstore.open(a / store), lstore.open(b / store)
        rec = _arrays(np.asarray(sa.sketches), np.asarray(sb.sketches))
        rec["meta_equal"] = sa.meta_records() == sb.meta_records()
        rec["layout_names_equal"] = [e["name"] for e in sa.layout] == [e["name"] for e in sb.layout]
        report["stores"][store] = rec
    za, zb = np.load(a / "task_space/task_space.npz"), np.load(b / "task_space/task_space.npz")
    for k in sorted(set(za.files) & set(zb.files)):
        report["task_space"][k] = _arrays(za[k], zb[k])
    report["task_space_only_in_a"] = sorted(set(za.files) - set(zb.files))
    report["task_space_only_in_b"] = sorted(set(zb.files) - set(za.files))
    la = [json.loads(line) for line in (a / "eval/scores.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (b / "eval/scores.jsonl").read_text().splitlines()]
    report["scores"] = _arrays(np.array([[r["logprob_good"], r["logprob_bad"]] for r in la]),
                               np.array([[r["logprob_good"], r["logprob_bad"]] for r in lb]))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, type=pathlib.Path)
    ap.add_argument("--b", required=True, type=pathlib.Path)
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    report = compare(args.a, args.b)
    report["note"] = args.note
    rows = [(f"store {k}", v) for k, v in report["stores"].items()]
    rows += [(f"npz {k}", v) for k, v in report["task_space"].items()] + [("scores", report["scores"])]
    for name, v in rows:
        print(f"{name:40s} bitwise={v.get('bitwise_equal')!s:5s} max|d|={v.get('max_abs_diff', 0.0):.3g}")
    if args.out:
        lio.write_json(args.out, report)


if __name__ == "__main__":
    main()
